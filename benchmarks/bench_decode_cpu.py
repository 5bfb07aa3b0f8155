"""CPU decode benchmark: the 8x SmolLM2-135M student vs its GQA source, fp32, batch 8, context 4k, one run.

    python benchmarks/bench_decode_cpu.py                  # converts runs/smollm2-8x if missing
    python benchmarks/bench_decode_cpu.py --threads 2 --repeats 7 --out runs/bench-cpu

The student is `ecomla convert default runs/smollm2-8x --kv-rank 16 --rope-dim 32` (16 + 32 = 48 cached
elements per token per layer vs 2 * 3 * 64 = 384: 8x). Both models decode from a cache of `--context`
tokens filled with random rows (a real prefill of 8 x 4k tokens takes minutes on a laptop CPU; decode
cost does not depend on the cached values), then `--steps` real decode steps are timed (median).
Prints the `ecomla bench` table and the ratio the issue targets: student tokens/s >= 2x the GQA source's,
against each GQA baseline (transformers' default DynamicCache, StaticCache, and the fair preallocated,
head-packed baseline of ecomla/bench/gqa_fair.py as two GEMMs, `gqa-fair`, and through SDPA,
`gqa-fair-sdpa`; which is faster depends on the CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ecomla.bench.run import BenchArgs, bench
from ecomla.convert.convert import ConvertArgs, convert


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default="runs/smollm2-8x", help="MLA checkpoint (converted here if missing)")
    p.add_argument("--context", default="4k")
    p.add_argument("--batch", default="8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5, help="MLA and GQA timed alternately this many times; "
                   "tokens/s is the median repeat, the ratio the median of the per-repeat (paired) ratios "
                   "(a shared machine drifts between repeats: docs/BENCH.md)")
    p.add_argument("--runs", default="absorbed,absorbed-sdpa,decompressed,gqa-dynamic,gqa-static,gqa-fair,gqa-fair-sdpa")
    p.add_argument("--out", default=None, help="folder for report.md / results.json / tokens_per_s.png")
    return p.parse_args()


def summary(rows: list[dict]) -> str:
    mla = {r["run"]: r for r in rows if r["system"] == "mla" and r.get("tokens_per_s")}
    gqa = {r["run"]: r for r in rows if r["system"] == "gqa" and r.get("tokens_per_s")}
    lines = []
    for m in mla.values():
        for g in gqa.values():
            x = m[f"speedup_vs_{g['run']}"]
            span = m.get(f"speedup_vs_{g['run']}_range")
            spread = f"  (median of {m['repeats']} paired repeats; range {span[0]:.2f}x-{span[1]:.2f}x)" if span else ""
            lines.append(f"{m['run']:>13} ({m['tokens_per_s']:.1f} tok/s) vs {g['run']:<13} "
                         f"({g['tokens_per_s']:.1f} tok/s): {x:.2f}x{spread}")
    a = mla.get("absorbed")
    if a and gqa:
        worst = min(a[f"speedup_vs_{g['run']}"] for g in gqa.values())
        lines.append(f"target: absorbed >= 2x every GQA baseline -> {'met' if worst >= 2 else 'NOT met'} "
                     f"(lowest ratio {worst:.2f}x)")
    return "\n".join(lines)


def run() -> None:
    args = parse()
    if not (Path(args.student) / "config.json").is_file():
        convert(ConvertArgs(src="default", out=args.student, kv_rank=16, rope_dim=32))
    rows = bench(BenchArgs(model=args.student, contexts=args.context, batches=args.batch, runs=args.runs,
                           device="cpu", dtype="float32", fill="synthetic", warmup=args.warmup, steps=args.steps,
                           repeats=args.repeats, threads=args.threads, out=args.out))
    print(summary(rows))


if __name__ == "__main__":
    run()
