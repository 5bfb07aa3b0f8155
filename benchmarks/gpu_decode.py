"""GPU decode benchmark at Llama-3.2-1B shape (synthetic bf16 weights, no checkpoint): one command, a few minutes.

    python benchmarks/gpu_decode.py --out out/bench-gpu          # or: bash benchmarks/gpu_decode.sh
    python benchmarks/gpu_decode.py --device cpu --shape tiny --context 256 --batch 4 \
        --attn-batches 2 --attn-context 512 --budget-gb 0.02      # wiring check on a CPU (no kernel)

Prints, with the card named:
1. copy bandwidth (a 2 GiB device copy, read + write);
2. one layer's decode attention, 32 heads, context 8k: the Triton absorbed-MLA kernel and the SDPA
   formulation for latents 64+32 and 128+32, and GQA SDPA (8 x 64), in GB/s and % of copy bandwidth
   (target: kernel >= 80%);
3. the whole model at batch 128, context 8k, 64+32 (`ecomla bench`): MLA absorbed (kernel), absorbed-sdpa,
   and GQA through transformers' StaticCache / DynamicCache and the fair preallocated SDPA of
   benchmarks/gqa_baselines.py (target: >= 10x transformers' static-cache tokens/s);
4. max batch at context 8k under one memory budget, by real allocation (benchmarks/capacity.py; target:
   MLA >= 9x GQA).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ecomla.bench.decode import copy_bandwidth, device_name
from ecomla.bench.report import columns_table
from ecomla.bench.run import BenchArgs, bench, select_runs
from ecomla.bench.runs import RUNS
from ecomla.bench.shapes import PRESETS, parse_sizes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also run as a script: `benchmarks` importable
from benchmarks import capacity, gqa_baselines
from benchmarks.layer_attention import attention_rows, attention_table


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="llama-3.2-1b", choices=tuple(PRESETS))
    p.add_argument("--kv-rank", type=int, default=64)
    p.add_argument("--rope-dim", type=int, default=32)
    p.add_argument("--context", default="8k")
    p.add_argument("--batch", default="128")
    p.add_argument("--attn-batches", default="32,128", help="batches for the attention-only table")
    p.add_argument("--attn-context", default="8k")
    p.add_argument("--budget-gb", type=float, default=40.0, help="memory budget of the max-batch search")
    p.add_argument("--runs", default="absorbed,absorbed-sdpa,gqa-static,gqa-fair,gqa-dynamic")
    p.add_argument("--out", default=None)
    return p.parse_args()


def attention_section(args, dtype, copy_gbps) -> list[dict]:
    cfg = PRESETS[args.shape]
    rows = []
    for b in parse_sizes(args.attn_batches, "--attn-batches"):
        rows += attention_rows(batch=b, context=parse_sizes(args.attn_context, "--attn-context")[0],
                               heads=cfg["num_attention_heads"], latents=[(64, 32), (128, 32)],
                               kv_heads=cfg["num_key_value_heads"], head_dim=cfg["head_dim"], dtype=dtype,
                               device=args.device, copy_gbps=copy_gbps)
    print(attention_table(rows))
    kern = [r for r in rows if r["impl"] == "triton"]
    if kern:
        worst = min(r["roofline_fraction"] for r in kern)
        verdict = "met" if worst >= 0.8 else "NOT met"
        print(f"target: kernel >= 80% of copy bandwidth -> {verdict} (lowest {100 * worst:.0f}%)")
    return rows


def ratios(rows: list[dict]) -> list[str]:
    dec = {r["run"]: r for r in rows if r["kind"] == "decode" and r.get("tokens_per_s")}
    cap = {r["run"]: r for r in rows if r["kind"] == "max_batch"}
    out = []
    if "absorbed" in dec:
        for g in ("gqa-static", "gqa-fair", "gqa-dynamic"):
            if g in dec:
                x = dec["absorbed"]["tokens_per_s"] / dec[g]["tokens_per_s"]
                goal = f" (target >= 10x: {'met' if x >= 10 else 'NOT met'})" if g == "gqa-static" else ""
                out.append(f"whole model tokens/s, absorbed vs {g}: {x:.2f}x{goal}")
    if "absorbed" in cap:
        for g in ("gqa-static", "gqa-fair"):
            if cap.get(g, {}).get("batch"):
                x = cap["absorbed"]["batch"] / cap[g]["batch"]
                out.append(f"max batch at equal memory, absorbed vs {g}: {x:.2f}x "
                           f"(target >= 9x: {'met' if x >= 9 else 'NOT met'})")
    return out


def run() -> None:
    args = parse()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible; pass --device cpu for a wiring check")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    copy_gbps = copy_bandwidth(args.device)
    print(f"# {device_name(args.device)}, torch {torch.__version__}, "
          f"copy bandwidth {copy_gbps:.0f} GB/s (read + write)")
    attn = attention_section(args, dtype, copy_gbps)
    fair = gqa_baselines.register()
    bench_args = BenchArgs(shape=args.shape, kv_rank=args.kv_rank, rope_dim=args.rope_dim, contexts=args.context,
                           batches=args.batch, runs=args.runs, device=args.device, dtype=str(dtype).split(".")[-1],
                           fill="synthetic", warmup=3, steps=10, out=args.out)
    rows = bench(bench_args, extra_runs=fair)
    cap = capacity.max_batch_rows(bench_args, select_runs("absorbed,gqa-fair,gqa-static", {**RUNS, **fair}),
                                  args.budget_gb, copy_gbps)
    print(columns_table(cap, capacity.COLS))
    lines = ratios(rows + cap)
    print("\n".join(lines))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "attention.json").write_text(json.dumps(attn, indent=2))
        (Path(args.out) / "capacity.json").write_text(json.dumps(cap, indent=2))
        with open(Path(args.out) / "report.md", "a") as f:
            f.write("\n## Max batch at equal memory\n\n" + columns_table(cap, capacity.COLS, markdown=True)
                    + "\n## One layer's decode attention\n\n```\n" + attention_table(attn) + "\n```\n\n"
                    + "\n".join(f"- {line}" for line in lines) + "\n")


if __name__ == "__main__":
    run()
