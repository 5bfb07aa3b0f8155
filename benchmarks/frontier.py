"""The frontier: held-out KL against KV-cache bytes, the GQA source's quantized caches beside ecomla's students.

    python benchmarks/kv_quant_baselines.py --out runs/kv-quant                      # the GQA rows, decode-style
    python benchmarks/frontier.py --students 4x=out/s4x,8x=out/s8x --cache-bits 16,8,4 \
        --baselines runs/kv-quant --out runs/frontier                            # the students, then the plot

Students are measured on the baselines' held-out batches (`kv_quant_baselines.corpora`, the same --blocks, --seq-len
and --batch-size; the target-token counts are checked against the baselines' rows), at each --cache-bits, by the
full forward reading the latent through the cache's fake quantization: that is what decoding over the latent cache
reads (tests/test_quant.py pins cached == uncached), so no token-by-token pass is needed. A student whose
checkpoint records a quantized cache (`ecomla distill --cache-bits`) is measured at that width only. Bytes per token
come from the live cache of a short generate() with the student in bf16, against the GQA source's bf16 cache; the
latent cache has no full-precision window, so its bytes per token hold at any context. The baselines' bytes are
theirs at their --context (window included).

Writes OUT/results.jsonl (one line per student and width, appended as each finishes; a rerun skips those there),
OUT/results.json (the students' rows), OUT/table.md and OUT/frontier.png (KL on held-out chat and on plain text against how many times smaller the cache is
than the bf16 GQA cache), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo root importable
from benchmarks.kv_quant_baselines import bf16_bytes, corpora, instrument_args  # noqa: E402
from ecomla.common import UserError  # noqa: E402
from ecomla.eval.fidelity import fidelity  # noqa: E402
from ecomla.eval.kvcache import KVCacheSpec  # noqa: E402
from ecomla.eval.report import plot_frontier  # noqa: E402
from ecomla.eval.run import kv_measurement  # noqa: E402
from ecomla.io import load_model, load_tokenizer  # noqa: E402

CORPORA = ("chat", "text")


def trained_tokens(path: Path) -> int:
    """KD tokens behind a checkpoint: its `ecomla distill` summary, or 0 for a conversion."""
    f = path / "ecomla_train.json"
    return json.loads(f.read_text()).get("tokens", 0) if f.is_file() else 0


def student_rows(name: str, path: str, widths: list[int], teacher, batches: dict, done: set):
    model, folder = load_model(path, dtype="float32")
    recorded = model.config.cache_bits
    tok = load_tokenizer(folder)
    for bits in [recorded] if recorded != 16 else widths:
        if (name, bits) in done:
            continue
        model.set_cache_bits(bits)
        row = {"student": name, "path": str(path), "cache_bits": bits, "trained_with_bits": recorded,
               "kd_tokens": trained_tokens(Path(folder))}
        for corpus in CORPORA:
            res = fidelity({name: model}, teacher, batches[corpus], desc=f"{name}@{bits}/{corpus}")[name]
            row[corpus] = {k: res[k] for k in ("kl", "top1_agreement", "ppl", "tokens")}
        bf16, _ = load_model(folder, dtype="bfloat16")
        row["bytes_per_token"] = kv_measurement(bf16.set_cache_bits(bits), tok)["kv_bytes_per_token"]
        yield row


def points(baselines: list[dict], students: list[dict], ref: float) -> list[dict]:
    """One point per row: label, kind, x (times smaller than the bf16 GQA cache), KL per corpus."""
    out = []
    for r in baselines:
        if "chat" in r:
            out.append({"label": r["spec"], "kind": "gqa", "x": ref / r["bf16"]["bytes_per_token"],
                        **{c: r[c]["kl"] for c in CORPORA}})
    for r in students:
        bits = f"int{r['cache_bits']}"
        label = r["student"] if r["cache_bits"] == 16 or bits in r["student"] else f"{r['student']} {bits}"
        out.append({"label": label,
                    "kind": "trained" if r["kd_tokens"] else "0 tokens", "x": ref / r["bytes_per_token"],
                    **{c: r[c]["kl"] for c in CORPORA}})
    return sorted(out, key=lambda p: p["x"])


def table(pts: list[dict], context: int) -> str:
    lines = [f"| cache | kind | x smaller than bf16 GQA (at {context} tokens) | chat KL | text KL |", "|---" * 5 + "|"]
    lines += [f"| {p['label']} | {p['kind']} | {p['x']:.2f}x | {p['chat']:.4f} | {p['text']:.4f} |" for p in pts]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--students", required=True, help="NAME=FOLDER,...: MLA checkpoints")
    p.add_argument("--cache-bits", default="16,8,4", help="latent cache widths for students without recorded ones")
    p.add_argument("--baselines", help="a kv_quant_baselines.py --out folder: its rows join the table and the plot")
    p.add_argument("--source", default="default", help="the GQA source (the teacher of every KL)")
    instrument_args(p)  # as kv_quant_baselines.py is run
    a = p.parse_args(argv)
    pairs = [s.split("=", 1) for s in a.students.split(",")]
    if any(len(pair) != 2 or not all(pair) for pair in pairs):
        raise SystemExit(f"frontier: --students {a.students!r}: give NAME=FOLDER pairs separated by commas")
    students = dict(pairs)
    widths = [int(b) for b in a.cache_bits.split(",")]
    baselines = read_baselines(a.baselines)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    done_file = out / "results.jsonl"
    rows = [json.loads(line) for line in done_file.read_text().splitlines()] if done_file.is_file() else []
    teacher, path = load_model(a.source, dtype="float32")
    batches = corpora(load_tokenizer(path), a)
    src_bf16, _ = load_model(a.source, dtype="bfloat16")
    ref = bf16_bytes(KVCacheSpec.parse("dynamic"), src_bf16, a)["bytes_per_token"]
    for name, folder in students.items():
        done = {(r["student"], r["cache_bits"]) for r in rows}
        try:
            for row in student_rows(name, folder, widths, teacher, batches, done):
                rows.append(row)
                with done_file.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(table(points([], [row], ref), a.context), flush=True)
        except UserError as err:
            raise SystemExit(f"frontier: student {name}: {err}") from err
    rows = [r for r in rows if r["student"] in students]
    check_tokens(baselines, rows)
    (out / "results.json").write_text(json.dumps({"bf16_gqa_bytes_per_token": ref, "context": a.context,
                                                  "rows": rows}, indent=1) + "\n")
    pts = points(baselines, rows, ref)
    (out / "table.md").write_text(table(pts, a.context) + "\n")
    plot_frontier(pts, out / "frontier.png")
    print(table(pts, a.context))


def read_baselines(folder: str | None) -> list[dict]:
    if folder is None:
        return []
    f = Path(folder) / "results.jsonl"
    if not f.is_file():
        raise SystemExit(f"frontier: {f} not found; run benchmarks/kv_quant_baselines.py --out {folder} first")
    return [json.loads(line) for line in f.read_text().splitlines()]


def check_tokens(baselines: list[dict], rows: list[dict]) -> None:
    """The students and the baselines were measured on the same target tokens (same --blocks and --seq-len)."""
    for corpus in CORPORA:
        counts = {r[corpus]["tokens"] for r in [*baselines, *rows] if corpus in r}
        if len(counts) > 1:
            raise SystemExit(f"frontier: {corpus} target tokens differ ({sorted(counts)}): run both scripts with the "
                             "same --blocks and --seq-len")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
