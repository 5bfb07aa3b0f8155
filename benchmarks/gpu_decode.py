"""GPU decode benchmark at Llama-3.2-1B shape (synthetic bf16 weights, no checkpoint): one command, a few minutes.

    python benchmarks/gpu_decode.py --out runs/bench-gpu         # or: bash benchmarks/gpu_decode.sh
    python benchmarks/gpu_decode.py --device cpu --shape tiny --kv-rank 8 --rope-dim 8 --context 256 --batch 4 \
        --attn-batches 2 --attn-context 512 --budget-gb 0.02      # wiring check on a CPU (no kernel)

Prints, with the card named:
1. copy bandwidth (a 2 GiB device copy, read + write);
2. one layer's decode attention, 32 heads, context 8k: the Triton absorbed-MLA kernel and the SDPA
   formulation for latents 64+32 and 128+32, and GQA SDPA (8 x 64), in GB/s and % of copy bandwidth
   (target: kernel >= 80%);
3. the whole model at batch 128, context 8k, 64+32 (`ecomla bench`): MLA absorbed (kernel), absorbed-sdpa,
   and GQA through transformers' StaticCache / DynamicCache and the fair preallocated SDPA (`gqa-fair`)
   (target: >= 10x transformers' static-cache tokens/s);
4. max batch at context 8k under one memory budget, by real allocation (benchmarks/capacity.py; target:
   MLA >= 9x GQA).

Section 2, one layer's attention alone (`attention_rows`). Bytes one call must read: MLA B*S*(r_kv + d_rope)*elem
(the latent, once for all heads), GQA 2*B*G*S*d_h*elem; GB/s = bytes / time per call, `roofline_fraction` divides
by the measured copy bandwidth. Implementations:
- triton: ecomla.kernels.mla_decode.mla_decode_triton (CUDA only).
- sdpa-absorbed: the SDPA formulation of MLAAttention.absorbed (heads folded into query rows, one shared
  key/value head, V = the first r_kv columns of the latent): what the model runs without a decode kernel.
- torch-gemm: ecomla.kernels.mla_decode.mla_decode_torch (fp32 only: it upcasts other dtypes).
- sdpa-gqa: F.scaled_dot_product_attention(q [B, H, 1, d_h], K/V [B, G, S, d_h], enable_gqa=True).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ecomla.bench.decode import copy_bandwidth, device_name, step_seconds
from ecomla.bench.report import columns_table
from ecomla.bench.run import BenchArgs, bench, select_runs
from ecomla.bench.runs import RUNS
from ecomla.bench.shapes import PRESETS, parse_sizes
from ecomla.common import UserError
from ecomla.kernels.mla_decode import mla_decode_torch, mla_decode_triton, triton_available

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo root importable
from benchmarks import capacity  # noqa: E402


def sdpa_absorbed(q_lat, q_rope, latent, scale):
    """[B, H, r_kv] via one SDPA call over the latent [B, S, W] (as in MLAAttention.absorbed)."""
    B, H, r = q_lat.shape
    q = torch.cat([q_lat, q_rope], dim=-1)[:, None]  # [B, 1, H, W]: heads as query rows
    kv = latent[:, None]  # [B, 1, S, W]
    return F.scaled_dot_product_attention(q, kv, kv[..., :r], scale=scale)[:, 0]


def time_call(fn, device, iters: int) -> float:
    """Mean seconds per call after two warm-up calls (CUDA events on GPU)."""
    step_seconds(fn, 2, device)
    return statistics.mean(step_seconds(fn, iters, device))


def mla_impls(device, dtype) -> dict:
    impls = {"sdpa-absorbed": sdpa_absorbed}
    if torch.device(device).type == "cuda" and triton_available():
        impls["triton"] = mla_decode_triton
    if dtype == torch.float32:
        impls["torch-gemm"] = mla_decode_torch
    return impls


@torch.inference_mode()
def attention_rows(batch: int, context: int, heads: int, latents: list[tuple[int, int]], kv_heads: int, head_dim: int,
                   dtype, device, copy_gbps: float | None = None, iters: int = 20) -> list[dict]:
    """One row per (implementation, latent shape) plus one GQA row; MLA rows carry their error vs SDPA."""
    g = torch.Generator(device=device).manual_seed(0)
    shape = dict(batch=batch, context=context, heads=heads)
    rows = []
    for r, d_rope in latents:
        rows += _mla_rows(g, r, d_rope, head_dim**-0.5, shape, dtype, device, copy_gbps, iters)
    q = torch.randn(batch, heads, 1, head_dim, generator=g, device=device, dtype=dtype)
    k = torch.randn(batch, kv_heads, context, head_dim, generator=g, device=device, dtype=dtype)
    v = torch.randn_like(k)
    sec = time_call(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), device, iters)
    rows.append(_row("sdpa-gqa", f"gqa {kv_heads}x{head_dim}", 2 * k.numel() * k.element_size(), sec, shape, copy_gbps))
    return rows


def _mla_rows(g, r, d_rope, scale, shape, dtype, device, copy_gbps, iters) -> list[dict]:
    B, S, H = shape["batch"], shape["context"], shape["heads"]
    q_lat = torch.randn(B, H, r, generator=g, device=device, dtype=dtype)
    q_rope = torch.randn(B, H, d_rope, generator=g, device=device, dtype=dtype)
    latent = torch.randn(B, S, r + d_rope, generator=g, device=device, dtype=dtype)
    ref = sdpa_absorbed(q_lat, q_rope, latent, scale).float()
    rows = []
    for name, fn in mla_impls(device, dtype).items():
        err = (fn(q_lat, q_rope, latent, scale).float() - ref).abs().max().item()
        sec = time_call(lambda: fn(q_lat, q_rope, latent, scale), device, iters)  # noqa: B023 (called right here)
        nbytes = latent.numel() * latent.element_size()
        rows.append(_row(name, f"mla {r}+{d_rope}", nbytes, sec, shape, copy_gbps, max_abs_err_vs_sdpa=err))
    return rows


def _row(impl, shape_name, nbytes, seconds, shape, copy_gbps, **extra) -> dict:
    gbps = nbytes / seconds / 1e9
    return {"kind": "attention", "impl": impl, "shape": shape_name, **shape, "us_per_call": seconds * 1e6,
            "bytes": nbytes, "gb_per_s": gbps, "roofline_fraction": gbps / copy_gbps if copy_gbps else None, **extra}


def attention_table(rows: list[dict]) -> str:
    head = f"{'shape':>14} {'impl':>14} {'B':>5} {'S':>6} {'us/call':>9} {'GB/s':>8} {'% copy':>7} {'max err':>9}"
    lines = [head]
    for r in rows:
        frac = "-" if r["roofline_fraction"] is None else f"{100 * r['roofline_fraction']:.0f}%"
        err = r.get("max_abs_err_vs_sdpa")
        lines.append(f"{r['shape']:>14} {r['impl']:>14} {r['batch']:>5} {r['context']:>6} {r['us_per_call']:>9.1f} "
                     f"{r['gb_per_s']:>8.1f} {frac:>7} {'-' if err is None else f'{err:.1e}':>9}")
    return "\n".join(lines)


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
    bench_args = BenchArgs(shape=args.shape, kv_rank=args.kv_rank, rope_dim=args.rope_dim, contexts=args.context,
                           batches=args.batch, runs=args.runs, device=args.device, dtype=str(dtype).split(".")[-1],
                           fill="synthetic", warmup=3, steps=10, out=args.out)
    rows = bench(bench_args)
    cap = capacity.max_batch_rows(bench_args, select_runs("absorbed,gqa-fair,gqa-static", RUNS),
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
    try:
        run()
    except UserError as err:
        sys.exit(f"gpu_decode.py: error: {err}")
