"""Training throughput on this machine: layer-wise alignment, end-to-end KD, KD from cached top-k teacher
log-probs, and a plain cross-entropy step of the same student (the goal: KD >= 0.85x CE).

    ecomla convert default runs/smollm2-4x-fitted --kv-rank 64 --rope-dim 32 --init fitted
    python benchmarks/distill_speed.py --student runs/smollm2-4x-fitted      # minutes on 2 cores
    python benchmarks/distill_speed.py --student runs/smollm2-4x-fitted --steps 6 --threads 2

Each configuration runs `ecomla distill` in-process for warmup + steps optimizer steps (batch 4 x 256 tokens,
--precision, all parameters trainable unless the row says otherwise) and reports the median tokens/s of the timed
steps, as logged in its metrics.jsonl. Run it on an otherwise idle machine: other processes distort CPU timings badly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from ecomla.distill import DistillArgs, distill

CONFIGS = {  # --configs name: (label, DistillArgs fields)
    "ild": ("ILD (layer-wise alignment)", dict(stage="ild")),
    "kd": ("KD, live teacher (full vocabulary)", dict(stage="kd")),
    "kd-topk": ("KD, cached teacher top-64", dict(stage="kd", teacher_topk=64)),
    "kd-attention": ("KD, live teacher, attention trainable", dict(stage="kd", trainable="attention")),
    "kd-mla": ("KD, live teacher, MLA projections trainable", dict(stage="kd", trainable="mla")),
    "ce": ("CE (no teacher)", dict(stage="kd", kl_weight=0.0, ce_weight=1.0)),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="auto", help="bf16, fp32 or auto (one per process: accelerate's rule)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"a subset of {', '.join(CONFIGS)}")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tokens = (a.steps + a.warmup) * 4 * 256
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, key in enumerate(a.configs.split(",")):
            name, kw = CONFIGS[key]
            budget = {"ild_tokens": tokens, "max_tokens": 1} if kw["stage"] == "ild" else {"max_tokens": tokens}
            args = DistillArgs(student=a.student, out=str(Path(tmp) / f"run{i}"), precision=a.precision,
                               eval_tokens=0, progress=False, save_every=10**6, **budget, **kw)
            distill(args)
            rows = [json.loads(line) for line in (Path(args.out) / "metrics.jsonl").read_text().splitlines()]
            speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][a.warmup:]
            results[name] = statistics.median(speeds)
    ce = results.get("CE (no teacher)")
    print(f"\n{'configuration':<38} {'tokens/s':>9} {'vs CE':>6}   ({a.threads} threads, {args.precision}, 4 x 256)")
    for name, v in results.items():
        print(f"{name:<38} {v:9.1f} {v / ce if ce else float('nan'):6.2f}")


if __name__ == "__main__":
    main()
