"""Tables, markdown report, JSON and plot for `ecomla bench` rows (no measuring here).

A decode row has kind "decode" (see run.py and decode.py for the fields). `columns_table` formats any rows
(benchmarks/capacity.py uses it for its max-batch rows).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ..plots import pyplot, save


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_<gqa run> = MLA tokens/s / GQA tokens/s at the same (batch, context), on every MLA decode row.

    With repeats (`step_ms_repeats`, in run order, MLA and GQA alternating) it is the median over repeats of the
    paired ratio GQA step / MLA step of the same repeat, and `speedup_vs_<run>_range` holds the lowest and
    highest paired ratio: on a machine whose speed drifts between repeats, pairing cancels the drift."""
    gqa = {(r["run"], r["batch"], r["context"]): r for r in rows
           if r["kind"] == "decode" and r["path"] == "gqa" and r.get("tokens_per_s")}
    for r in rows:
        if r["kind"] != "decode" or r["path"] == "gqa" or not r.get("tokens_per_s"):
            continue
        for (run, b, c), g in gqa.items():
            if (b, c) != (r["batch"], r["context"]):
                continue
            mine, theirs = r.get("step_ms_repeats"), g.get("step_ms_repeats")
            if mine and theirs and len(mine) == len(theirs):
                paired = sorted(t / m for m, t in zip(mine, theirs))
                r[f"speedup_vs_{run}"] = statistics.median(paired)
                r[f"speedup_vs_{run}_range"] = [round(paired[0], 3), round(paired[-1], 3)]
            else:
                r[f"speedup_vs_{run}"] = r["tokens_per_s"] / g["tokens_per_s"]


DECODE_COLS = [("run", "run", None), ("impl", "impl", None), ("B", "batch", None), ("context", "context", None),
               ("fill", "fill", None), ("tok/s", "tokens_per_s", "{:.1f}"), ("tok/s range", "_range", "range"),
               ("step ms", "step_ms", "{:.2f}"),
               ("prefill s", "prefill_s", "{:.2f}"), ("cache B/tok", "cache_bytes_per_token", None),
               ("peak MiB", "peak_memory_bytes", "mb"), ("GB/s", "gb_per_s", "{:.1f}"),
               ("% copy BW", "roofline_fraction", "pct")]


def _cell(r: dict, key: str, fmt: str | None) -> str:
    v = r.get(key)
    if r.get("status") == "oom" and key == "tokens_per_s":
        return "OOM"
    if fmt == "range":
        lo, hi = r.get("tokens_per_s_min"), r.get("tokens_per_s_max")
        return "-" if lo is None else f"{lo:.1f}-{hi:.1f}"
    if v is None:
        return "-"
    if fmt == "mb":
        return f"{v / 2**20:.0f}"
    if fmt == "speedup":  # with repeats: median paired ratio (lowest-highest)
        span = r.get(f"{key}_range")
        return f"{v:.2f}" + (f" ({span[0]:.2f}-{span[1]:.2f})" if span else "")
    if fmt == "pct":
        return f"{100 * v:.0f}%"
    return (fmt or "{:.1f}").format(v) if isinstance(v, float) else str(v)


def _speedup_cols(rows: list[dict]) -> list[tuple[str, str, str]]:
    keys = sorted({k for r in rows for k in r if k.startswith("speedup_vs_") and not k.endswith("_range")})
    return [(f"x vs {k[len('speedup_vs_'):]}", k, "speedup") for k in keys]


def columns_table(rows: list[dict], cols: list[tuple[str, str, str | None]], markdown: bool = False) -> str:
    """`rows` as aligned text or markdown; `cols` are (header, row key, format)."""
    cells = [[h for h, _, _ in cols]] + [[_cell(r, k, f) for _, k, f in cols] for r in rows]
    if markdown:
        return "\n".join(["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cols)]
                         + ["| " + " | ".join(c) + " |" for c in cells[1:]]) + "\n"
    w = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c[i].rjust(w[i]) for i in range(len(cols))) for c in cells) + "\n"


def table(rows: list[dict], markdown: bool = False) -> str:
    """The decode rows, with a column per GQA run the MLA rows are compared with."""
    rows = [r for r in rows if r["kind"] == "decode"]
    if not rows:
        return ""
    cols = DECODE_COLS if any("tokens_per_s_min" in r for r in rows) else [c for c in DECODE_COLS if c[2] != "range"]
    return columns_table(rows, [("system", "system", None), *cols, *_speedup_cols(rows)], markdown)


def markdown_report(rows: list[dict], meta: dict) -> str:
    lines = [f"# ecomla bench: {meta['mla_model']} vs {meta['gqa_model']}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", table(rows, markdown=True),
              "GB/s = (weight bytes read + B x context x cache bytes/token) / step time; % copy BW compares it "
              "with the measured device copy bandwidth (read + write). Cache bytes are read from the live cache "
              "tensors. Peak memory: `torch.cuda.max_memory_allocated` on CUDA; weights + cache tensors on CPU. "
              "`fill: synthetic` = random rows written into the reserved cache instead of a prefill.", ""]
    if any(r["kind"] == "decode" for r in rows):
        lines.append("![tokens/s vs context](tokens_per_s.png)")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> bool:
    """tokens/s vs context, one line per (run, batch); False when there is nothing to plot."""
    plt = pyplot()
    series: dict[tuple, list] = {}
    for r in rows:
        if r["kind"] == "decode" and r.get("tokens_per_s"):
            series.setdefault((r["system"], r["run"], r["batch"]), []).append((r["context"], r["tokens_per_s"]))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (system, run, b), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls="-" if system == "gqa" else "--",
                label=f"{run} B={b}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (cached tokens per sequence)")
    ax.set_ylabel("decode tokens/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save(fig, path)


def write(out_dir: str, rows: list[dict], meta: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot(rows, out / "tokens_per_s.png")
    (out / "report.md").write_text(markdown_report(rows, meta))
    return out
