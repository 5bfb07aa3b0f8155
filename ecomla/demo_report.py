"""The demo's report: OUT/results.json (the `ecomla eval` schema plus a "demo" section), OUT/report.md with the
table, plots (training curve, quality vs KV size, the frontier beside KV quantization, tokens/s vs context), chat answers and the exact commands,
and the one-screen summary printed at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .bench.report import plot as plot_bench
from .eval.report import plot_frontier, plot_quality_vs_kv, table
from .plots import pyplot, save


def training_info(folder: Path) -> dict:
    info = json.loads((folder / "ecomla_train.json").read_text()) if (folder / "ecomla_train.json").is_file() else {}
    rows = []
    if (folder / "metrics.jsonl").is_file():
        rows = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {"tokens": info.get("tokens"), "minutes": info.get("minutes"), "stopped": info.get("stopped"),
            "curve": [r for r in rows if "loss" in r]}


def points(curve: list[dict], stage: str) -> list[tuple[int, float]]:
    """(tokens, loss) of `stage`'s steps that have a loss. A missing value is left out rather than drawn as 0, and
    so is a KD step without target tokens (none since targetless blocks are skipped; an older run logged its loss
    as exactly 0, which no real KL step gives)."""
    out = []
    for r in curve:
        loss = r.get("loss")
        if r["stage"] != stage or loss is None or not math.isfinite(loss) or r.get("targets") == 0:
            continue
        if stage == "kd" and loss == 0:
            continue
        out.append((r["tokens"], loss))
    return out


def plot_training(curve: list[dict], path: Path) -> bool:
    plt = pyplot()
    stages = [s for s in ("ild", "kd") if points(curve, s)]
    if not stages:
        return False
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5), squeeze=False)
    labels = {"ild": "layer-wise alignment: relative attention error", "kd": "end-to-end KD: KL(teacher || student)"}
    for ax, s in zip(axes[0], stages):
        pts = points(curve, s)
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_xlabel("training tokens")
        ax.set_title(labels[s], fontsize=9)
    return save(fig, path)


def bench_lines(rows: list[dict]) -> list[str]:
    lines = ["| run | context | batch | tokens/s | cache B/token | peak MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("kind") != "decode" or r.get("status") != "ok":
            continue
        peak = r.get("peak_memory_bytes")
        lines.append(f"| {r['run']} | {r['context']} | {r['batch']} | {r['tokens_per_s']:.1f} | "
                     f"{r.get('cache_bytes_per_token')} | {'-' if peak is None else f'{peak / 2**20:.0f}'} |")
    return lines


# the GQA source's quantized caches, as the results page records them (a source checkout has the file)
GQA_RECORD = Path(__file__).resolve().parents[1] / "docs" / "results" / "kv-quant.json"


def frontier_lines(results: dict, out: Path) -> list[str]:
    """A small frontier plot: this run's students beside the GQA source's quantized caches from the committed record
    (measured on other held-out tokens of the same sources, with the CPU and commit the record names)."""
    pts = [{"label": m["name"], "kind": "trained" if m.get("tokens_trained") else "0 tokens",
            "x": m["bytes_compression"], "chat": m.get("kl_to_teacher"), "text": m.get("kl_text")}
           for m in results["models"] if m["name"] != "teacher" and m.get("bytes_compression")]
    note = "no GQA baselines: docs/results/kv-quant.json is not in this install"
    if GQA_RECORD.is_file():
        rec = json.loads(GQA_RECORD.read_text())
        gqa = rec["result"]
        pts += [{"label": r["spec"], "kind": "gqa", "x": gqa["bf16_bytes_per_token"] / r["bf16"]["bytes_per_token"],
                 "chat": r["chat"]["kl"], "text": r["text"]["kl"]} for r in gqa["rows"] if "chat" in r]
        note = (f"grey: the GQA source with transformers' quantized caches, from docs/results/kv-quant.json "
                f"({rec['cpu']}, commit {rec['commit']}; its own held-out tokens of the same sources)")
    if not plot_frontier(pts, out / "frontier.png", small=True):
        return []
    return ["![KL against cache compression, beside KV quantization](frontier.png)", "", f"Frontier: {note}.", ""]


def write_report(demo, results: dict, chat: dict, bench: list[dict], models: dict, minutes: float) -> str:
    out = demo.out
    train = training_info(Path(models["student-kd"]))
    for m in results["models"]:
        if m["name"] == "student-kd":
            m.update(tokens_trained=train["tokens"], train_minutes=train["minutes"])
        elif m["name"] == "student-0tok":
            m.update(tokens_trained=0)
    results["demo"] = {"args": {k: getattr(demo.a, k) for k in demo.a.__dataclass_fields__},
                       "stage_minutes": demo.state.get("minutes", {}), "total_minutes_this_run": round(minutes, 2),
                       "training": {k: v for k, v in train.items() if k != "curve"}, "bench": bench, "chat": chat,
                       "commands": demo.commands}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [f"# ecomla demo: {demo.a.model} -> MLA at {demo.a.ratio}", "",
             f"Init `{demo.a.init}`; {train['tokens']:,} training tokens in {train['minutes']} of "
             f"{demo.a.budget_minutes} training minutes (stopped: {train['stopped']}); stage minutes: "
             f"{demo.state.get('minutes')}.", "", *table(results), "",
             "KV B/token is read from the live cache of a generate() call (float32); KL and top-1 agreement are "
             "against the teacher on held-out chat; task cells are % ± stderr on fixed seeded subsets "
             f"(documents per task: {json.dumps({t: r.get('n') for t, r in results['models'][-1]['tasks'].items()})}).", ""]
    if plot_training(train["curve"], out / "training.png"):
        lines += ["![training curve](training.png)", ""]
    if plot_quality_vs_kv(results, out / "quality_vs_kv.png"):
        lines += ["![quality vs KV size](quality_vs_kv.png)", ""]
    lines += frontier_lines(results, out)
    lines += ["## Decode speed and cache", "", *bench_lines(bench), ""]
    if plot_bench(bench, out / "tokens_per_s.png"):  # the bench's own plot
        lines += ["![tokens/s vs context](tokens_per_s.png)", ""]
    lines += ["## Chat", ""]
    for i, p in enumerate(chat["prompts"]):
        lines.append(f"**{p}**")
        lines += [f"- *{name}*: {ans[i][:300]!r}" for name, ans in chat["answers"].items()]
        lines.append("")
    lines += ["## Reproduce each stage by hand", "", "```bash", *demo.commands.values(), "```", ""]
    (out / "report.md").write_text("\n".join(lines))
    return summary(results, chat, bench, train, out, minutes)


def summary(results, chat, bench, train, out, minutes) -> str:
    rows = []
    for m in results["models"]:
        ppl = m.get("ppl") or {}
        avg, kl_text = m.get("average"), m.get("kl_text")
        rows.append(f"  {m['name']:<14} KV {m['kv_bytes_per_token']:>6} B/tok ({m['compression']:.1f}x)  "
                    f"KL chat {m['kl_to_teacher']:.3f} text {float('nan') if kl_text is None else kl_text:.3f}  "
                    f"ppl chat {ppl.get('chat', float('nan')):8.2f}  "
                    f"tasks {'-' if avg is None else f'{100 * avg:.1f}'}")
    speed = {r["run"]: r["tokens_per_s"] for r in bench if r.get("kind") == "decode" and r.get("tokens_per_s")
             and r["context"] == max(b["context"] for b in bench if b.get("kind") == "decode")}
    lines = ["", "=" * 78, f"ecomla demo finished in {minutes:.1f} min; trained {train['tokens']:,} tokens in "
             f"{train['minutes']} min (stopped: {train['stopped']})", *rows]
    if speed:
        lines.append("  decode tokens/s at the longest context: " + ", ".join(f"{k} {v:.1f}" for k, v in speed.items()))
    first = chat["prompts"][0]
    lines.append(f"  Q: {first}")
    lines += [f"    {name:>13}: {ans[0][:90]!r}" for name, ans in chat["answers"].items()]
    lines += [f"report: {out / 'report.md'}", "=" * 78]
    return "\n".join(lines)
