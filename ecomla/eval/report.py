"""report.md and plots from an `ecomla eval` results dict (also used by `ecomla demo`).

Plots (PNG, matplotlib Agg): task scores per model next to the teacher; quality (KL to teacher and the
task average) against KV bytes per token when several models are compared; the frontier (KL on chat and plain
text against compression, students beside the GQA source's quantized caches: benchmarks/frontier.py, the demo).
"""

from __future__ import annotations

from pathlib import Path

from ..plots import pyplot, save

TASK_ORDER = ("arc_challenge", "arc_easy", "hellaswag", "mmlu", "openbookqa", "piqa", "winogrande")


def _fmt(v, pct=False, digits=3):
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.{digits}f}"


def _score(t: dict) -> str:
    m = t["average_metric"]
    err = t.get(f"{m}_stderr")
    return f"{100 * t[m]:.1f} ± {100 * err:.1f}" if t.get(m) is not None and err is not None else _fmt(t.get(m), True)


def table(results: dict) -> list[str]:
    models = results["models"]
    tasks = [t for t in TASK_ORDER if any(t in m["tasks"] for m in models)]
    tasks += sorted({t for m in models for t in m["tasks"]} - set(tasks))
    head = ["model", "KV B/token", "vs bf16 source", "KL to teacher", "top-1 agree", "KL text", "ppl chat",
            "ppl text", *tasks, "avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        ppl = m.get("ppl") or {}
        cells = [m["name"], str(m.get("kv_bytes_per_token")),
                 f"{m.get('bytes_compression', m.get('compression', 1)):.2f}x smaller",  # bytes, as the column before
                 _fmt(m.get("kl_to_teacher")), _fmt(m.get("top1_agreement")), _fmt(m.get("kl_text")),
                 _fmt(ppl.get("chat"), digits=2),
                 _fmt(ppl.get("text"), digits=2)]
        cells += [_score(m["tasks"][t]) if t in m["tasks"] else "-" for t in tasks]
        cells.append(_fmt(m.get("average"), True))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _percent(task: dict | None) -> float:
    """A task's score in %, NaN (no bar; not a bar at 0) when the model did not run it."""
    value = task.get(task.get("average_metric", "acc")) if task else None
    return float("nan") if value is None else 100 * value


def plot_tasks(results: dict, path: Path) -> bool:
    plt = pyplot()
    models = [m for m in results["models"] if m["tasks"]]
    if not models:
        return False
    tasks = [t for t in TASK_ORDER if any(t in m["tasks"] for m in models)] or sorted(models[0]["tasks"])
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks) * max(1, len(models)) / 2), 4))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        vals = [_percent(m["tasks"].get(t)) for t in tasks]
        ax.bar([j + i * width for j in range(len(tasks))], vals, width, label=m["name"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=20)
    ax.set_ylabel("score (%): acc_norm or acc")
    ax.legend(fontsize=8)
    ax.set_title("0-shot task scores")
    return save(fig, path)


def plot_quality_vs_kv(results: dict, path: Path) -> bool:
    plt = pyplot()
    models = [m for m in results["models"] if m.get("kv_bytes_per_token")]
    if len(models) < 2:
        return False
    panels = [("kl_to_teacher", "KL(teacher || model), nats/token"), ("average", "task average (%)")]
    panels = [(k, lab) for k, lab in panels if any(m.get(k) is not None for m in models)]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for m in models:
            if m.get(key) is None:
                continue
            y = 100 * m[key] if key == "average" else m[key]
            ax.scatter(m["kv_bytes_per_token"], y)
            ax.annotate(m["name"], (m["kv_bytes_per_token"], y), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("KV cache bytes per token (measured)")
        ax.set_ylabel(label)
    fig.suptitle("quality vs KV cache size")
    return save(fig, path)


FRONTIER_STYLE = {"gqa": dict(marker="s", color="0.45", label="GQA source, quantized cache (transformers)"),
                  "0 tokens": dict(marker="o", mfc="none", color="tab:blue", label="ecomla student, 0 tokens"),
                  "trained": dict(marker="o", color="tab:red", label="ecomla student, after KD")}


def matplotlib_null():
    from matplotlib.ticker import NullFormatter

    return NullFormatter()


def plot_frontier(points: list[dict], path: Path, small: bool = False) -> bool:
    """KL to the source on held-out chat and plain text against how many times smaller the KV cache is than the
    source's bf16 cache; points: {"label", "kind" (a FRONTIER_STYLE key), "x", "chat", "text"}."""
    if not points:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2) if small else (11, 4.2), sharey=True)
    for ax, corpus in zip(axes, ("chat", "text")):
        for kind, style in FRONTIER_STYLE.items():
            sel = [p for p in points if p["kind"] == kind and p.get(corpus) is not None]
            ys = [max(p[corpus], 1e-4) for p in sel]  # log axis: an exact cache plots at the floor
            if sel:
                ax.plot([p["x"] for p in sel], ys, ls="none", ms=6 if small else 7, **style)
            for p, y in zip(sel, ys):
                ax.annotate(p["label"], (p["x"], y), fontsize=6 if small else 7, xytext=(4, 3),
                            textcoords="offset points")
        ax.set(xscale="log", yscale="log", title=f"held-out {'chat' if corpus == 'chat' else 'plain text'}",
               xlabel="KV cache, times smaller than bf16 GQA")
        ticks = [t for t in (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32) if min(p["x"] for p in points) / 1.2 <= t
                 <= max(p["x"] for p in points) * 1.2]
        ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib_null())
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("KL to the source (nats/token)")
    axes[0].legend(fontsize=6 if small else 8, loc="upper right", bbox_to_anchor=(1, 0.38))  # the empty band
    return save(fig, path)


def write(results: dict, out: Path) -> Path:
    s = results["settings"]
    lines = ["# ecomla eval report", "",
             f"Teacher: `{results.get('teacher')}`. Tasks 0-shot via lm-eval; limits: `{s.get('limit') or 'full splits'}`"
             f" (seed {s.get('seed')}). Average: {s['average']}.",
             f"Perplexity / KL target tokens: {s.get('fidelity_tokens')}; ppl chat = assistant tokens of held-out "
             "ShareGPT, ppl text = BoolQ passages. Not available offline: "
             + ", ".join(f"{k} ({v})" for k, v in results.get("not_offline", {}).items()) + ".", ""]
    lines += table(results)
    lines += ["", "Task cells are percent ± standard error (acc_norm where defined, acc otherwise). "
              "KV bytes/token are read from the live cache of a generate() call.", ""]
    if plot_tasks(results, out / "tasks.png"):
        lines += ["![task scores](tasks.png)", ""]
    if plot_quality_vs_kv(results, out / "quality_vs_kv.png"):
        lines += ["![quality vs KV size](quality_vs_kv.png)", ""]
    n_docs = {m["name"]: {t: r.get("n") for t, r in m["tasks"].items()} for m in results["models"][:1]}
    lines += [f"Documents per task: {n_docs}", f"Versions: {results.get('versions')}; "
              f"{results.get('minutes')} min in all.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
