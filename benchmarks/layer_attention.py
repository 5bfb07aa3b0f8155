"""One layer's decode attention alone: absorbed MLA (Triton kernel / PyTorch) vs GQA SDPA, in GB/s.

Used by benchmarks/gpu_decode.py (section 2 of its table):
    from benchmarks.layer_attention import attention_rows
    rows = attention_rows(batch=128, context=8192, heads=32, latents=[(64, 32), (128, 32)], kv_heads=8, head_dim=64,
                          dtype=torch.bfloat16, device="cuda", copy_gbps=copy_bandwidth("cuda"))

Notation: B batch, S cached tokens, H query heads, G KV heads, d_h head dim, r_kv + d_rope latent row.
Bytes one call must read: MLA B*S*(r_kv + d_rope)*elem (the latent, once for all heads), GQA 2*B*G*S*d_h*elem.
GB/s = bytes / time per call; `roofline_fraction` divides by the measured copy bandwidth.
Implementations:
- triton: ecomla.kernels.mla_decode.mla_decode_triton (CUDA only).
- sdpa-absorbed: the SDPA formulation of MLAAttention.absorbed (heads folded into query rows, one shared
  key/value head, V = the first r_kv columns of the latent): what the model runs without a decode kernel.
- torch-gemm: ecomla.kernels.mla_decode.mla_decode_torch (fp32 only: it upcasts other dtypes).
- sdpa-gqa: F.scaled_dot_product_attention(q [B, H, 1, d_h], K/V [B, G, S, d_h], enable_gqa=True).
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from ecomla.bench.decode import step_seconds
from ecomla.kernels.mla_decode import mla_decode_torch, mla_decode_triton, triton_available


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
