#!/usr/bin/env bash
# bench/gpu_run.sh OUT_DIR [TOTAL_S]: the one command to run first whenever a GPU is lent (issue #15).
#
# Six stages in priority order. Each has its own time budget, derived from TOTAL_S (default 660 s) and
# enforced with `timeout`, and writes its result file into OUT_DIR as soon as it ends, so a run killed
# at any point keeps what finished. The device machine brings back at most 8 files, no deeper than
# OUT_DIR/a/file: this writes 7 (during stage 5, up to three configs sit in OUT_DIR/<gpu>/ before they
# are packed into autotune.tar: still 8 at most). Every file says its stage's status.
#
#   stage          budget (share of TOTAL_S)   at 660 s   file               what
#   1 env            4 %                         26 s     env.txt            GPU, driver, versions, lintx info
#   2 correctness   31 %                        204 s     correctness.txt    case set x 3 dtypes, fuzz, memcheck
#   3 first call    11 %                         72 s     first_call.json    cold process, empty caches, T = 4096
#   4 grid          30 %                        198 s     results.json       side by side with SDPA (and FLA)
#   5 tuner         what is left less 6's    >= 88 s     autotune.tar       configs, the tuner's output, journal
#   6 feature maps  10 %                         66 s     feature_maps.json  FAVOR+ (M = 2D) vs elu+1
#   closing          1 %, at least 5 s            6 s     log.txt            every stage's output, the summary
# Why this split (the seconds are estimates: no GPU has run this yet):
#   1  seconds of work (two torch imports, a CUDA start, nvidia-smi); the cap guards against a hung driver.
#   2  first and largest: every later number is worthless if a kernel is wrong on this GPU (an early
#      prototype's 32-wide value block ran in the interpreter and faulted on an H200). Its parts run side
#      by side, since compiling is CPU work, single-threaded per process, the machine has 16 cores and the
#      GPU work is tiny: bench/sanitize_case.py in bf16, fp16 and fp32 (D = 64 and 128: fused and chunked
#      forward, backward, prefill, decode, FAVOR+, grouped heads, packed sequences, the state alone; each
#      checked against float64); the property fuzzer on CUDA (`python -m lintx_triton fuzz`, one process
#      per kernel family and dtype: random shapes, every map) for the budget less 30 % (its last draw, its
#      JSON, a failure's shrinking); compute-sanitizer memcheck over the bf16 case set. One after the
#      other, the previous script gave the bf16 case set and memcheck 150 s each. A FAIL (a wrong result,
#      a memcheck error, a crash of the case set) stops stages 3-6; a fuzzer ERROR (the fuzzer or the
#      environment broke, not a kernel) and a cut do not: stages 4 and 6 check every cell against
#      float64 before they time it anyway.
#   3  two cold processes (forward; forward+backward), each a torch import, CUDA's start and the compiles:
#      the goal is 3 s a call (FLA's first calls: 25 s and 63 s); a call of 30 s would still fit.
#   4  24 rows (fwd, fwdbwd, decode x D = 64, 128 x T = 1k, 4k, 16k, 32k; H = 16, B*T = 32768) x lintx and
#      SDPA, and FLA at D = 64 when its wheel is carried. lintx's bf16 kernels come compiled from stage 2,
#      so a cell is its float64 check and do_bench's 125 ms; FLA's runtime autotuning (25 s forward, 63 s
#      backward at a new head width) runs after every other cell (--fla-last), so a cut loses FLA first.
#   5  the rest: the tuner stops starting candidates at --budget-minutes and writes the best so far, so
#      any time helps, and stages that end early hand it theirs; its margin (a quarter, at least 30 s)
#      covers the candidates being compiled when the budget ends. It leaves stage 6 its share.
#   6  3 lengths x 2 maps, forward+backward; only FAVOR+'s kernels are new: well under a minute.
# One device `run` may last 600 s at most: there, pass TOTAL_S = 570 (bench/README.md), or split the
# stages over two runs with STAGES.
#
# Usage, from anywhere (it runs from the repository root, with the repo on PYTHONPATH; nothing is
# installed from a registry; FLA comes from a wheel in .whl/, see bench/README.md):
#   bash bench/gpu_run.sh OUT_DIR [TOTAL_S]
# Environment:
#   STAGES="1 4"        only these stages (a rerun; the others' files in OUT_DIR are left as they are)
#   BUDGET_<k>=S        stage k's cap in seconds instead of its share (still within the time left)
#   GRID_ARGS="..."     appended to stage 4's side_by_side.py options (the last value of an option wins)
#   AUTOTUNE_JOURNAL=F  the tuner's resume file (default: in the kernel cache; it comes back in the tar)
#   GPU_RUN_CPU=1       the dry run even where a GPU is found. Without a GPU the dry run is what runs:
#                       tiny shapes on the CPU (Triton's interpreter), GPU-only parts `skipped: no GPU`
#   PYTHON=python3      the interpreter
# Exit code: 0 when no stage failed (cut or skipped stages allowed), 1 when one failed.
set -uo pipefail

usage="usage: bash bench/gpu_run.sh OUT_DIR [TOTAL_S]"
OUT_DIR=${1:?$usage}
TOTAL_S=${2:-660}
[[ $TOTAL_S =~ ^[0-9]+$ ]] || { echo "TOTAL_S must be whole seconds, got '$TOTAL_S'; $usage" >&2; exit 2; }
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd) || exit 2
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
export OUT_DIR TOTAL_S
export PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STAGES=" ${STAGES:-1 2 3 4 5 6} "
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_run.XXXXXX") || exit 2
export SCRATCH
trap 'rm -rf "$SCRATCH"' EXIT
LOG="$OUT_DIR/log.txt"
MIN_S=5  # a stage given less than this is not started
CLOSE_S=$((TOTAL_S / 100 > 5 ? TOTAL_S / 100 : 5))
declare -A NAME=([1]=env [2]=correctness [3]=first_call [4]=grid [5]=autotune [6]=feature_maps)
declare -A FILE=([1]=env.txt [2]=correctness.txt [3]=first_call.json [4]=results.json [5]=autotune.tar
                 [6]=feature_maps.json)
declare -A SHARE=([1]=4 [2]=31 [3]=11 [4]=30 [6]=10)
declare -A STATUS NOTE USED
GATE=""  # why stages 3-6 do not run (stage 2 failed)

say() { echo "$*" | tee -a "$LOG"; }
cap() {  # cap K: stage K's budget before the time left is applied
  local var="BUDGET_$1"
  if [[ -n ${!var:-} ]]; then echo "${!var}"; else echo $((TOTAL_S * ${SHARE[$1]:-0} / 100)); fi
}
left() { echo $((TOTAL_S - SECONDS - CLOSE_S)); }
minutes() { printf '%d.%02d' $(($1 / 60)) $(($1 % 60 * 100 / 60)); }  # seconds -> decimal minutes
# run_limited S CMD...: CMD under `timeout`, its process group killed 5 s after a SIGTERM it ignored
run_limited() { local s=$1; shift; timeout -k 5 "$s" "$@"; }
verdict() {  # verdict RC: finished / cut / failed from an exit code
  case $1 in 0) echo finished ;; 124 | 137 | 143) echo cut ;; *) echo failed ;; esac
}
stamp() {  # stamp K: put stage K's status into its JSON file (made if absent or unreadable)
  "$PY" - "$OUT_DIR/${FILE[$1]}" "$1" "${NAME[$1]}" "${STATUS[$1]}" "${NOTE[$1]:-}" "${USED[$1]:-0}" \
    "${BUDGET[$1]:-0}" <<'EOF'
import json, os, sys
path, k, name, status, note, used, budget = sys.argv[1:]
try:
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict):
        doc = {"content": doc}
except (OSError, ValueError):
    doc = {}
doc["gpu_run"] = dict(stage=int(k), name=name, status=status, note=note, seconds=int(used), budget_s=int(budget))
with open(path + ".tmp", "w") as f:
    json.dump(doc, f, indent=1)
os.replace(path + ".tmp", path)
EOF
}
declare -A BUDGET

# ------------------------------------------------------------------------------------------------
# where we are: a GPU, or the dry run
DRY=0
if [[ ${GPU_RUN_CPU:-0} == 1 ]]; then
  DRY=1
elif ! timeout 120 "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  DRY=1
fi
export DRY
FLA=0
shopt -s nullglob
fla_whl=(.whl/fla_core-*.whl)
if ((DRY == 0 && ${#fla_whl[@]})); then
  # FLA travels as a wheel (the GPU machine has no registry); einops, its one need, is on the image
  timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/fla_site "${fla_whl[@]}" >"$SCRATCH/fla_install.log" 2>&1 &&
    export PYTHONPATH="$PYTHONPATH:/tmp/fla_site" && FLA=1
fi
say "== gpu_run.sh $(date -u +%FT%TZ): TOTAL_S $TOTAL_S, stages${STAGES% }, $( ((DRY)) && echo 'dry run (no GPU: tiny shapes, GPU-only parts skipped)' || echo GPU)$( ((FLA)) && echo ', FLA wheel installed')"
say "   budgets: 1 env $(cap 1) s, 2 correctness $(cap 2) s, 3 first call $(cap 3) s, 4 grid $(cap 4) s, 5 tuner the rest (>= $((TOTAL_S - $(cap 1) - $(cap 2) - $(cap 3) - $(cap 4) - $(cap 6) - CLOSE_S)) s), 6 feature maps $(cap 6) s, closing $CLOSE_S s"

# ------------------------------------------------------------------------------------------------
stage_1() {  # environment, under one time limit
  run_limited "$1" bash -c "$(declare -f env_report); env_report"
}

env_report() {
  {
    echo "== stage 1 env: $(date -u +%FT%TZ), TOTAL_S $TOTAL_S, $( ((DRY)) && echo 'dry run' || echo GPU)"
    uname -a
    echo "cpus $(nproc 2>/dev/null)"
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
      nvidia-smi
    else
      echo "nvidia-smi: not on PATH"
    fi
    if command -v compute-sanitizer >/dev/null; then compute-sanitizer --version | tail -n 2; else
      echo "compute-sanitizer: not on PATH"; fi
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo 'no git here')"
    cat "$SCRATCH/fla_install.log" 2>/dev/null
    "$PY" - <<'EOF'
import platform, torch, triton, lintx_triton
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| triton", triton.__version__, "| lintx_triton", lintx_triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}, compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory // 2**20} MiB")
else:
    print("device: no GPU")
try:
    import fla
    print("fla", fla.__version__)
except Exception as e:
    print("fla absent:", type(e).__name__, e)
EOF
    "$PY" -m lintx_triton info --json
  } >"$OUT_DIR/env.txt" 2>&1
}

stage_2() {  # correctness: parts side by side, then one verdict
  local b=$(($1 > 18 ? $1 - 8 : 10)) margin minutes_ kernels dt fuzzopt=()  # 8 s: the --help probe, the verdict
  margin=$((b * 3 / 10 > 20 ? b * 3 / 10 : 20))  # the last draw, the JSON, a FAIL's shrinking
  minutes_=$(minutes $((b - margin > 10 ? b - margin : 10)))
  part() {  # part NAME CMD...: CMD under the stage's budget; its output and exit code into SCRATCH
    local name=$1 s=$SECONDS
    shift
    { run_limited "$b" "$@" >"$SCRATCH/2_$name.out" 2>"$SCRATCH/2_$name.err"; echo "$? $((SECONDS - s))" \
      >"$SCRATCH/2_$name.rc"; } &
  }
  if ((DRY)); then
    # one fuzz process, one round, one example per variant: the plumbing, not a verdict on a GPU
    part fuzz "$PY" -m lintx_triton fuzz --kernel forward --kernel backward --kernel decode \
      --map elu --dtype fp32 --normalize --no-state -n 1 --json
  else
    # `lintx fuzz --device cuda` (issue #14: its --minutes shares the time out among the variants, and exit
    # codes 0 ok / 1 FAIL / 2 ERROR) where it exists; before it, fuzz picks CUDA itself and -n 1 makes one
    # round of its variants short
    if "$PY" -m lintx_triton fuzz --help 2>/dev/null | grep -q -- '--device'; then fuzzopt=(--device cuda); else
      fuzzopt=(-n 1); fi
    for dt in bf16 fp16 fp32; do part "case_$dt" "$PY" bench/sanitize_case.py "$dt"; done
    for kernels in forward backward decode; do
      for dt in bf16 fp16 fp32; do
        part "fuzz_${kernels}_$dt" "$PY" -m lintx_triton fuzz "${fuzzopt[@]}" --kernel "$kernels" --dtype "$dt" \
          --minutes "$minutes_" --json
      done
    done
    if command -v compute-sanitizer >/dev/null; then
      # without PyTorch's caching allocator every tensor is its own allocation, so memcheck sees overruns
      part memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 3 \
        --print-limit 50 "$PY" bench/sanitize_case.py bf16
    fi
  fi
  wait
  "$PY" - "$SCRATCH" "$DRY" "$b" "$minutes_" >"$OUT_DIR/correctness.txt" 2>&1 <<'EOF'
"""The verdict of stage 2 from its parts' outputs: exit 1 on a FAIL, 124 when a part was cut, else 0."""
import collections, json, pathlib, re, sys

scratch, dry, budget, minutes = pathlib.Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], sys.argv[4]
print(f"== stage 2 correctness: {budget} s for the parts, side by side; "
      + ("dry run: one fuzz round on the CPU, one example per variant" if dry else f"fuzz --minutes {minutes} each"))
fails, notes = [], []  # notes: said in full below; the VERDICT line says them short
cut = collections.defaultdict(list)  # kind -> the parts of that kind stopped at the budget
short = []
fuzz = collections.Counter()  # runs, variants, reached, errors


def read(name, ext):
    p = scratch / f"2_{name}.{ext}"
    return p.read_text(errors="replace") if p.exists() else ""


def rc_of(name):
    rc, secs = (read(name, "rc").split() + ["?", "?"])[:2]
    return (int(rc) if rc.lstrip("-").isdigit() else None), secs


parts = sorted(p.name[2:-3] for p in scratch.glob("2_*.rc"))
if dry:
    short.append("case set, memcheck: skipped: no GPU")
elif "memcheck" not in parts:
    short.append("memcheck: skipped: compute-sanitizer not on PATH")

for name in [p for p in parts if p.startswith("case_")]:
    rc, secs = rc_of(name)
    out = read(name, "out")
    status = {0: "ok", 124: "cut", 137: "cut"}.get(rc, "FAIL")
    print(f"\n-- {name} (bench/sanitize_case.py {name[5:]}): {status}, exit {rc}, {secs} s")
    print(out.rstrip())
    if status == "FAIL":  # a wrong result, or a crash on the GPU (an illegal address, a launch that fails)
        print("stderr:\n" + read(name, "err")[-3000:].rstrip())
        bad = "; ".join(line for line in out.splitlines() if "FAIL" in line)
        fails.append(f"case set {name[5:]}: " + (bad or (read(name, "err").strip().splitlines()
                                                          or [f"exit {rc}"])[-1])[:300])
    elif status == "cut":
        cut["case set"].append(name[5:])

for name in [p for p in parts if p.startswith("fuzz")]:
    rc, secs = rc_of(name)
    what = name[5:].replace("_", " ") or "all"
    text = read(name, "out")
    try:
        doc, _ = json.JSONDecoder().raw_decode(text[text.index("{"):])
        results = doc["results"]
    except (ValueError, KeyError):
        doc, results = None, None
    print(f"\n-- {name} (lintx fuzz): exit {rc}, {secs} s")
    fuzz["runs"] += 1
    if results is None:
        if rc in (124, 137):
            cut["fuzz, no JSON before the limit"].append(what)
            print("cut before it printed its JSON")
        else:
            fuzz["broken runs"] += 1
            notes.append(f"{name}: no JSON, exit {rc}: the fuzzer broke, not a kernel")
        print("stderr tail:\n" + read(name, "err")[-2000:].rstrip())
        continue
    by = collections.Counter(r["status"] for r in results)
    # "not run": out of time (issue #14); an old fuzz says ok with no example
    reached = [r for r in results if r["status"] != "not run" and (r.get("examples") or r["status"] != "ok")]
    fuzz["variants"] += len(results)
    fuzz["reached"] += len(reached)
    worst = max((r["worst"] for r in results if r["status"] == "ok" and r.get("examples")), default=0.0)
    print(f"device {doc.get('device')}: {len(results)} variants, {len(reached)} reached, "
          f"{sum(r.get('examples', 0) for r in results)} examples; " + ", ".join(f"{k} {v}" for k, v in by.items())
          + f"; worst ok err/bound {worst:.3g}")
    for r in results:
        lab = "/".join(str(r.get(k)) for k in ("kernel", "backend", "feature_map", "dtype", "normalize", "state"))
        if r["status"] != "ok" or not r.get("examples"):
            print(f"  {lab}: {r['status']} after {r.get('examples')} examples: {r.get('error', '')}")
        if r["status"] == "FAIL":
            fails.append(f"fuzz {lab}: {r.get('error', '')[:200]}")
            print(f"    case {r.get('case')}\n    reproducer:\n"
                  + "\n".join("      " + line for line in (r.get("snippet") or "").splitlines()))
        elif r["status"] == "ERROR":
            fuzz["errors"] += 1

if "memcheck" in parts:
    rc, secs = rc_of("memcheck")
    out, err = read("memcheck", "out"), read("memcheck", "err")
    both = out + "\n" + err
    summary = [line for line in both.splitlines() if "ERROR SUMMARY" in line]
    if rc == 0:
        status = "ok"
    elif rc in (124, 137):
        status = "cut"
        cut["memcheck"].append("bf16")
    elif rc in (1, 3):  # 3: memcheck found errors (--error-exitcode); 1: a result off under the sanitizer
        status = "FAIL"
        fails.append("memcheck: " + (summary[-1] if summary else f"exit {rc} (a result off under the sanitizer)"))
    elif re.search(r"Device not supported|not supported on this|CUDA_ERROR_NOT_SUPPORTED", both):
        status = "skipped: compute-sanitizer refused the device"
        short.append("memcheck: " + status)
    else:
        status = f"ERROR (exit {rc})"
        short.append(f"memcheck: exit {rc}, the sanitizer broke (see correctness.txt)")
    print(f"\n-- memcheck (compute-sanitizer --tool memcheck, sanitize_case.py bf16): {status}, exit {rc}, {secs} s")
    print(out.rstrip())
    print("sanitizer output (tail):\n" + err[-6000:].rstrip())

if fuzz["runs"]:
    if fuzz["variants"] > fuzz["reached"]:
        short.append(f"fuzz: {fuzz['variants'] - fuzz['reached']} of {fuzz['variants']} variants not reached in time")
    if fuzz["errors"] or fuzz["broken runs"]:
        short.append(f"fuzz: ERROR in {fuzz['errors']} variants and {fuzz['broken runs']} of {fuzz['runs']} runs "
                     "(the fuzzer or the environment, not a kernel: timing goes on)")
print()
for n in notes:
    print("note:", n)
if fails:
    print("FAIL:\n  " + "\n  ".join(fails))
cuts = "; ".join(f"{kind} ({', '.join(parts_)})" for kind, parts_ in cut.items())
detail = (([f"FAIL: {fails[0][:160]}" + (f" (and {len(fails) - 1} more)" if len(fails) > 1 else "")] if fails else [])
          + ([f"cut: {cuts}"] if cuts else []) + short)
verdict = "failed" if fails else "cut" if cut else "finished"
print(f"VERDICT {verdict}: {'; '.join(detail)}")
sys.exit(1 if fails else 124 if cut else 0)
EOF
}

stage_3() {  # first call, cold
  local b=$1 args=()
  ((DRY)) && args=(--T 32 --H 1 --D 16 --tokens 32)
  run_limited "$b" "$PY" bench/first_call.py --budget-s $((b - 5)) --out "$OUT_DIR/first_call.json" "${args[@]}"
}

stage_4() {  # the side-by-side grid
  local b=$1 margin=20 args
  ((FLA)) && margin=75  # FLA's first backward at a head width autotunes for about a minute
  if ((DRY)); then
    args=(--modes fwd,fwdbwd,decode --T 64,128 --D 16 --H 2 --tokens 256 --decode-batch 2 --impls lintx,sdpa,fla)
  else
    args=(--modes fwd,fwdbwd,decode --T 1024,4096,16384,32768 --D 64,128 --H 16 --tokens 32768 --dtype bf16
      --impls lintx,sdpa,fla,fla-raw --fla-D 64)
  fi
  # shellcheck disable=SC2086
  run_limited "$b" "$PY" bench/side_by_side.py --out "$OUT_DIR" --no-draw --fla-last --time-failures \
    --budget-s $((b - margin > 5 ? b - margin : 5)) "${args[@]}" ${GRID_ARGS:-}
}

stage_5() {  # the tuner, with what is left
  local b=$1 margin journal=() d
  for d in "$OUT_DIR"/*/; do echo "$d"; done >"$SCRATCH/dirs_before"  # pack_5 packs only the tuner's folders
  margin=$((b / 4 > 30 ? b / 4 : 30))
  [[ -n ${AUTOTUNE_JOURNAL:-} ]] && journal=(--journal "$AUTOTUNE_JOURNAL")
  run_limited "$b" "$PY" -m lintx_triton.autotune --budget-minutes "$(minutes $((b - margin > 6 ? b - margin : 6)))" \
    --out "$OUT_DIR" "${journal[@]}"
}

pack_5() {  # autotune.tar: autotune.txt (status, the tuner's output), <gpu>/<kernel>.json, the journal
  local dir="$SCRATCH/autotune" d j
  touch "$SCRATCH/dirs_before"
  rm -rf "$dir" && mkdir -p "$dir"
  {
    echo "== stage 5 autotune: ${STATUS[5]}${NOTE[5]:+: ${NOTE[5]}} (${USED[5]:-0} s of ${BUDGET[5]:-0} s)"
    cat "$SCRATCH/5.log" 2>/dev/null
  } >"$dir/autotune.txt"
  for d in "$OUT_DIR"/*/; do grep -qxF "$d" "$SCRATCH/dirs_before" || cp -r "$d" "$dir/"; done
  if [[ -f $SCRATCH/5.log ]]; then  # the tuner ran: its resume file too
    for j in ${AUTOTUNE_JOURNAL:-} "${LINTX_TRITON_CACHE_DIR:-$HOME/.cache/lintx_triton}"/autotune/*.jsonl; do
      [[ -f $j ]] && cp "$j" "$dir/journal-$(basename "$j")"
    done
  fi
  (cd "$dir" && "$PY" -m tarfile -c "$OUT_DIR/autotune.tar.tmp" ./*) && mv "$OUT_DIR/autotune.tar.tmp" \
    "$OUT_DIR/autotune.tar" && for d in "$OUT_DIR"/*/; do grep -qxF "$d" "$SCRATCH/dirs_before" || rm -rf "$d"; done
}

stage_6() {  # FAVOR+ against elu+1
  local b=$1 args=()
  ((DRY)) && args=(--T 32 --H 1 --D 16 --tokens 64)
  run_limited "$b" "$PY" bench/feature_maps.py --out "$OUT_DIR/feature_maps.json" "${args[@]}"
}

digest() {  # digest K: a few lines of stage K's result for the console
  case $1 in
    1) grep -E '^(python|device|fla)' "$OUT_DIR/env.txt" ;;
    2) grep -E '^(-- |FAIL|VERDICT|sanitize_case:|device )' "$OUT_DIR/correctness.txt" | tail -n 30 ;;
    3) grep -E '^first call' "$SCRATCH/3.log" ;;
    4) grep -E '^(target |lintx failed|wrote |[A-Za-z.]*(Error|Exception)\b)' "$SCRATCH/4.log" | tail -n 20 ;;
    5) tail -n 12 "$SCRATCH/5.log" ;;
    6) grep -E 'largest allocation|Error' "$SCRATCH/6.log" | tail -n 12 ;;
  esac
}

# ------------------------------------------------------------------------------------------------
for k in 1 2 3 4 5 6; do
  [[ $STAGES == *" $k "* ]] || continue
  if [[ $k == 5 ]]; then
    b=$(left)
    [[ $STAGES == *" 6 "* ]] && b=$((b - $(cap 6)))
    [[ -n ${BUDGET_5:-} ]] && ((BUDGET_5 < b)) && b=$BUDGET_5
  else
    b=$(cap "$k")
    (($(left) < b)) && b=$(left)
  fi
  BUDGET[$k]=$b
  USED[$k]=0
  if ((k >= 3)) && [[ -n $GATE ]]; then
    STATUS[$k]="not run"; NOTE[$k]=$GATE
  elif ((DRY)) && [[ $k == 5 ]]; then
    STATUS[$k]="skipped"; NOTE[$k]="no GPU"
  elif ((b < MIN_S)); then
    STATUS[$k]="cut"; NOTE[$k]="not started: ${b} s left of the time, under ${MIN_S} s"
  else
    say "== stage $k ${NAME[$k]}: budget $b s (at $SECONDS s)"
    rm -f "$OUT_DIR/${FILE[$k]}"  # a rerun into the same OUT_DIR: no stale result under this stage's status
    start=$SECONDS
    {
      echo "== stage $k ${NAME[$k]} (budget $b s)"
      "stage_$k" "$b" >"$SCRATCH/$k.log" 2>&1
      echo $? >"$SCRATCH/$k.rc"
      cat "$SCRATCH/$k.log"
    } >>"$LOG" 2>&1
    rc=$(cat "$SCRATCH/$k.rc")
    USED[$k]=$((SECONDS - start))
    STATUS[$k]=$(verdict "$rc")
    case $k in
      2) NOTE[2]=$(sed -n 's/^VERDICT [a-z]*: //p' "$OUT_DIR/correctness.txt" | tail -n 1)
         [[ -z ${NOTE[2]} && ${STATUS[2]} != finished ]] && NOTE[2]="exit $rc: see correctness.txt"
         [[ ${STATUS[2]} == failed ]] &&
           GATE="stage 2 found a fault (numbers of wrong kernels are worthless): fix it, or rerun with STAGES" ;;
      *) [[ ${STATUS[$k]} != finished ]] && NOTE[$k]="exit $rc$( [[ ${STATUS[$k]} == cut ]] && echo ": stopped at its budget of $b s")" ;;
    esac
    digest "$k" | tee -a "$LOG"
  fi
  # every stage leaves its file, with its status in it
  case $k in
    1 | 2) echo "== gpu_run: stage $k ${NAME[$k]}: ${STATUS[$k]}${NOTE[$k]:+: ${NOTE[$k]}} (${USED[$k]} s of $b s)" \
             >>"$OUT_DIR/${FILE[$k]}" ;;
    5) pack_5 ;;
    *) stamp "$k"; rm -f "$OUT_DIR"/*.tmp ;;
  esac
  say "== stage $k ${NAME[$k]}: ${STATUS[$k]}${NOTE[$k]:+: ${NOTE[$k]}} (${USED[$k]} s of $b s) -> ${FILE[$k]}"
done

# ------------------------------------------------------------------------------------------------
list() {  # list STATUS: the stages with that status, "-" if none
  local k out=""
  for k in 1 2 3 4 5 6; do [[ ${STATUS[$k]:-} == "$1" ]] && out+="$k ${NAME[$k]}, "; done
  if [[ -n $out ]]; then echo "${out%, }"; else echo -; fi
}
files=$(cd "$OUT_DIR" && find . -type f | sed 's|^\./||' | sort | tr '\n' ' ')
say "gpu_run SUMMARY ($SECONDS s of $TOTAL_S): finished: $(list finished) | cut: $(list cut) | failed: $(list failed) | skipped (no GPU): $(list skipped) | not run: $(list "not run")${GATE:+ ($GATE)} | files: ${files% }"
[[ $(list failed) == "-" ]]
