"""A/B of the pre-multiplied decode weights: absorbed decode of one MLA model with and without the fold.

    python benchmarks/decode_fold_ab.py --student runs/smollm2-8x --threads 2 --repeats 5  # bench_decode_cpu's

`model.prepare_for_decode()` folds W_UK into the query up-projection and W_UV into o_proj where r_kv is
smaller than d_nope / d_v (ecomla/mla/decode.py); `fold=False` keeps the plain weights with the same kernel.
This loads the model once and times the `absorbed` bench run (`ecomla.bench.decode.time_decode`: synthetic
cache fill, warm-up, median of timed steps) prepared both ways, alternating, so machine drift hits both alike.
Prints each repeat, the medians and the median of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from ecomla.bench.decode import DecodeOpts, time_decode
from ecomla.bench.runs import RUNS, prepare
from ecomla.bench.shapes import parse_sizes
from ecomla.io import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="MLA checkpoint (e.g. the 8x: --kv-rank 16 --rope-dim 32)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", default="4k")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, _ = load_model(a.student, dtype=torch.float32)
    if not any(attn.prepared.replaced for attn in model.prepare_for_decode().mla_attention()):
        raise SystemExit(f"{a.student}: r_kv >= d_nope and d_v in every layer, nothing is folded")
    context = parse_sizes(a.context, "--context")[0]
    opts = DecodeOpts(warmup=a.warmup, steps=a.steps, fill="synthetic")
    runs = {"fold": RUNS["absorbed"], "no fold": dataclasses.replace(RUNS["absorbed"], fold=False)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(a.repeats):
        for name, run in runs.items():
            prepare(model, run, "cpu", torch.float32)
            m = time_decode(model, run, a.batch, context, opts, "cpu", torch.float32)
            times[name].append(m["step_s"] * 1e3)
            print(f"repeat {rep + 1}: {name:>7} {times[name][-1]:7.1f} ms/step", flush=True)
    f, n = statistics.median(times["fold"]), statistics.median(times["no fold"])
    print(f"B={a.batch} context={context}, {a.threads} threads, median of {a.repeats} repeats: "
          f"fold {f:.1f} ms/step ({a.batch / f * 1e3:.1f} tok/s), no fold {n:.1f} ms/step "
          f"({a.batch / n * 1e3:.1f} tok/s): {n / f:.2f}x; paired per repeat: median "
          f"{statistics.median(x / y for x, y in zip(times['no fold'], times['fold'])):.2f}x")


if __name__ == "__main__":
    main()
