#!/usr/bin/env bash
# The GPU session's one command for issue #6, sized to finish inside TOTAL_S (default 460 s, ~8 min):
#   1. versions and nvidia-smi                                    -> OUT_DIR/env.txt
#   2. bench/sanitize_case.py plainly (compiles the kernels, checks them against float64), then
#      once more under compute-sanitizer memcheck                  -> OUT_DIR/sanitizer.log
#   3. bench/side_by_side.py: the full grid (fwd, fwdbwd, prefill, decode; T = 1k..64k; D = 64, 128;
#      H = 16; B*T = 32768; bf16), FLA at D = 64 only (its runtime autotuning costs minutes per head
#      width), with the time left as its budget                    -> OUT_DIR/results.{json,md,png}, grid.log
#   4. if 3 was cut short: the markdown and the plot redrawn from the JSON it saved after every cell.
# Six files in all (the device tool brings back at most eight).
#
# From the repository root, with the package on PYTHONPATH (nothing is installed from a registry):
#   bash bench/gpu_run.sh OUT_DIR [TOTAL_S]
# FLA is optional: a wheel in .whl/ (fla_core-0.6.0-py3-none-any.whl, see bench/README.md) is installed
# into /tmp/fla_site and used; without one the FLA columns say why they are empty.
set -uo pipefail
OUT_DIR=${1:?usage: bash bench/gpu_run.sh OUT_DIR [TOTAL_S]}
TOTAL_S=${2:-460}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

shopt -s nullglob
fla_whl=(.whl/fla_core-*.whl)
if ((${#fla_whl[@]})); then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fla_site \
    "${fla_whl[@]}" && export PYTHONPATH="$PYTHONPATH:/tmp/fla_site"
fi

{
  date -u
  nvidia-smi
  "$PY" - <<'EOF'
import torch, triton, lintx_triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "lintx_triton", lintx_triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
try:
    import fla
    print("fla", fla.__version__)
except Exception as e:
    print("fla absent:", type(e).__name__, e)
EOF
  command -v compute-sanitizer || echo "compute-sanitizer not on PATH"
} >"$OUT_DIR/env.txt" 2>&1
echo "== env"; tail -n 4 "$OUT_DIR/env.txt"

# 2. sanitizer (plain first: kernels compiled once, cached on disk, and the grid reuses them)
{
  echo "== plain"
  timeout 150 "$PY" bench/sanitize_case.py
  echo "exit $?"
  echo "== compute-sanitizer --tool memcheck (PYTORCH_NO_CUDA_MEMORY_CACHING=1)"
  if command -v compute-sanitizer >/dev/null; then
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 compute-sanitizer --tool memcheck --error-exitcode 3 \
      --print-limit 50 "$PY" bench/sanitize_case.py
    echo "exit $? (0: clean; 3: memcheck found errors; 1: a result off; 124: timed out)"
  fi
} >"$OUT_DIR/sanitizer.log" 2>&1
echo "== sanitizer ($SECONDS s)"; grep -E "^== |^exit|ERROR SUMMARY|FAIL|failed" "$OUT_DIR/sanitizer.log" | tail -n 12

# 3. the grid, with what is left; the last cell started may run on (FLA's first backward at a head
#    width autotunes for about a minute), hence the margin between the budget and the hard stop
left=$((TOTAL_S - SECONDS - 15))
budget=$((left - 75))
if ((budget < 30)); then budget=30; fi
echo "== grid: budget ${budget} s, hard stop ${left} s"
# GRID_ARGS (e.g. a tiny grid to try the script on a CPU) is appended: click keeps an option's last value
# shellcheck disable=SC2086
timeout "$left" "$PY" bench/side_by_side.py --out "$OUT_DIR" --budget-s "$budget" --fla-D 64 --time-failures \
  ${GRID_ARGS:-} >"$OUT_DIR/grid.log" 2>&1
rc=$?
echo "grid exit $rc ($SECONDS s)"

# 4. a run cut short left its JSON: draw the table and the plot from it
if [[ $rc -ge 124 || ! -s "$OUT_DIR/results.md" ]] && [[ -s "$OUT_DIR/results.json" ]]; then
  "$PY" bench/side_by_side.py --report-only "$OUT_DIR/results.json" --out "$OUT_DIR" >>"$OUT_DIR/grid.log" 2>&1
fi
rm -f "$OUT_DIR/results.json.tmp"
tail -n 25 "$OUT_DIR/grid.log"
sed -n '/^## Targets/,/^## fwd/p' "$OUT_DIR/results.md" 2>/dev/null
echo "== done in $SECONDS s: $(ls "$OUT_DIR" | tr '\n' ' ')"
