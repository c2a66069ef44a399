"""Markdown tables and the log-log plot of a side-by-side run (its JSON, see ``bench/harness.py``).

Needs neither torch nor a GPU: ``python bench/side_by_side.py --report-only results.json --out DIR``
redraws both from a JSON file (e.g. one a timed-out GPU run left behind).
"""

from __future__ import annotations

from collections import defaultdict

SHORT = {"lintx": "lintx", "sdpa": "SDPA causal", "fla": "FLA norm", "fla-raw": "FLA raw", "torch": "PyTorch",
         "torch-chunked": "PyTorch chunked"}
MODE_TITLE = {"fwd": "forward", "fwdbwd": "forward + backward", "prefill": "prefill from a state, returning it",
              "decode": "decode: one token, context T"}


def _impls(results) -> list[str]:
    seen = []
    for r in results:
        if r["impl"] not in seen:
            seen.append(r["impl"])
    return seen


def _fmt(x, nd=3) -> str:
    if x is None:
        return "—"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.{nd}f}"


def _time_cell(r, lintx) -> str:
    st = r["status"]
    if st == "skip":
        return "—"
    if st in ("fail", "error") and r.get("time_ms") is None:
        return st.upper()
    t = r["time_ms"]
    cell = _fmt(t, 4 if t < 0.1 else 3)
    if r["impl"] != "lintx" and lintx is not None and lintx.get("time_ms"):
        cell += f" ({t / lintx['time_ms']:.2f}x)"
    return cell + {"loose": " *", "fail": " FAIL"}.get(st, "")


def _mem_cell(r) -> str:
    if r.get("time_ms") is None:
        return "—"
    frac = r.get("floor_frac")
    return f"{_fmt(r.get('peak_mib'), 1)} / {100 * frac:.0f}%" if frac is not None else _fmt(r.get("peak_mib"), 1)


def device_line(meta: dict) -> str:
    if meta.get("gpu"):
        where = f"{meta['gpu']} ({meta.get('sms')} SMs, CUDA {meta.get('cuda')})"
    else:
        where = (f"CPU ({meta.get('host_cpu')}, {meta.get('cpu_threads')} threads; lintx backend "
                 f"{meta.get('lintx_backend')}{', Triton interpreter' if meta.get('triton_interpret') else ''})")
    fla = meta.get("fla")
    return (f"{where}; torch {meta.get('torch')}, Triton {meta.get('triton')}, "
            f"lintx_triton {meta.get('lintx_triton')}, FLA: {fla}. Run {meta.get('started')}, "
            f"{meta.get('wall_s')} s. Device-to-device copy "
            f"{meta.get('copy_GBps', 0):.1f} GB/s (read + write).")


def to_markdown(out: dict) -> str:
    meta, results = out["meta"], out["results"]
    gpu = bool(meta.get("gpu"))
    lines = ["# Side-by-side benchmark", "", device_line(meta), ""]
    timer = "`triton.testing.do_bench` medians; decode inside a CUDA graph (`do_bench_cudagraph`)" if gpu else \
        "medians of `time.perf_counter` (CPU: these are not GPU numbers)"
    lines += [
        (f"Times in ms, {timer}. elu(x) + 1, causal, scale 1. `(2.00x)`: that implementation's time over "
         "lintx's in the same row (above 1: lintx is faster). `*`: within 8x, not 1x, of its error bound (timed "
         "anyway); FAIL: off by more (not timed, unless the run was told to time failures); —: not run (reasons "
         "below each table). Memory: peak MiB above the inputs / the memory-traffic floor (inputs read once, "
         "outputs written once, at the copy bandwidth) as a percentage of the measured time."),
        "",
    ]
    if out.get("targets"):
        lines += ["## Targets (issue #6: H200, bf16, elu+1, normalized, H = 16, D = 64)", "",
                  "| mode | T | B | lintx ms | target ms | met |", "|---|---|---|---|---|---|"]
        for t in out["targets"]:
            met = {True: "yes", False: "no", None: "n/a (no GPU)"}[t["met"]] if t.get("check", "ok") == "ok" \
                else f"n/a (check: {t['check']})"
            lines.append(f"| {t['mode']} | {t['T']} | {t['B']} | {_fmt(t['time_ms'], 4)} | {t['target_ms']} | {met} |")
        lines.append("")
    sections = defaultdict(list)
    for r in results:
        sections[(r["mode"], r["D"], r["DV"], r["H"], r["dtype"])].append(r)
    for (mode, D, DV, H, dtype), rs in sections.items():
        impls = _impls(rs)
        rows = defaultdict(dict)
        for r in rs:
            rows[(r["T"], r["B"])][r["impl"]] = r
        dims = f"D = DV = {D}" if D == DV else f"D = {D}, DV = {DV}"
        lines += [f"## {mode}: {MODE_TITLE.get(mode, mode)}; {dims}, H = {H}, {dtype}", ""]
        head = "| T | B | " + " | ".join(SHORT.get(i, i) for i in impls) + " |"
        lines += [head, "|" + "---|" * (len(impls) + 2)]
        for (T, B), cells in rows.items():
            lx_cell = cells.get("lintx")
            lines.append(f"| {T} | {B} | " + " | ".join(_time_cell(cells[i], lx_cell) if i in cells else "—"
                                                        for i in impls) + " |")
        lines += ["", "Peak MiB / % of the floor:", "", head, "|" + "---|" * (len(impls) + 2)]
        for (T, B), cells in rows.items():
            lines.append(f"| {T} | {B} | " + " | ".join(_mem_cell(cells[i]) if i in cells else "—" for i in impls)
                         + " |")
        notes = {}
        for r in rs:
            if r.get("reason"):
                notes.setdefault(f"{SHORT.get(r['impl'], r['impl'])} ({r['status']}): {r['reason']}", []).append(r["T"])
        if notes:
            lines.append("")
            for note, Ts in notes.items():
                lines.append(f"- T = {', '.join(map(str, Ts))}: {note}")
        lines.append("")
    return "\n".join(lines)


def plot(out: dict, path) -> None:
    """Time against T, log-log, one panel per mode; line style by D; the targets dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in out["results"] if r.get("time_ms") is not None]
    modes = [m for m in ("fwd", "fwdbwd", "prefill", "decode") if any(r["mode"] == m for r in out["results"])]
    if not modes:
        modes = ["fwd"]
    ncols = min(2, len(modes))
    nrows = -(-len(modes) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.6 * nrows), squeeze=False)
    impls = _impls(out["results"])
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(impls)}
    dims = sorted({r["D"] for r in out["results"]})
    styles = {D: ls for D, ls in zip(dims, ["-", "--", "-.", ":"])}
    targets = {t["mode"]: t["target_ms"] for t in out.get("targets", [])}
    for ax, mode in zip(axes.flat, modes):
        for name in impls:
            for D in dims:
                pts = sorted((r["T"], r["time_ms"]) for r in results if r["mode"] == mode and r["impl"] == name
                             and r["D"] == D)
                if pts:
                    ax.plot(*zip(*pts), styles[D], marker="o", ms=3, color=colors[name],
                            label=f"{SHORT.get(name, name)}, D={D}")
        if mode in targets:
            ax.axhline(targets[mode], color="k", ls=":", lw=1, label=f"target {targets[mode]} ms (D=64)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length T (B = 16)" if mode == "decode" else "T (B*T fixed)")
        ax.set_ylabel("ms (median)")
        ax.set_title(MODE_TITLE.get(mode, mode), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(modes):]:
        ax.set_visible(False)
    meta = out["meta"]
    fig.suptitle(f"lintx_triton side by side on {meta.get('gpu') or 'CPU (not GPU numbers)'}, "
                 f"torch {meta.get('torch')}, Triton {meta.get('triton')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
