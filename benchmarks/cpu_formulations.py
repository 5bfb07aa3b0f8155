"""Which exact formulation of one decode-attention layer is fastest on CPU, and where a decode step's time goes.

    .venv/bin/python benchmarks/cpu_formulations.py --threads 1
    .venv/bin/python benchmarks/cpu_formulations.py --threads 1 --profile out/smollm2-8x

Notation: B batch, S cached tokens, H query heads, G KV heads, d_h head dim, W = r_kv + d_rope.
Default shape: SmolLM2-135M (H=9, G=3, d_h=64) with the 8x latent 16+32, B=8, S=4k, fp32.
1. Absorbed MLA, one layer: two GEMMs (ecomla's CPU decode path), scores as latent @ q^T, and SDPA.
2. GQA, one layer: SDPA with enable_gqa=True (what transformers uses without a mask), the packed layout
   (query heads of a KV group as rows) through SDPA, and the packed layout as two GEMMs (ecomla's fair baseline).
3. With --profile DIR: torch-profiler totals of one absorbed decode step of that MLA checkpoint.
Times are medians; every variant is checked against the first of its group.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ecomla.kernels.mla_decode import mla_decode_torch


def median_ms(fn, n: int = 15) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2] * 1e3


def report(name: str, variants: dict) -> None:
    ref = None
    for label, fn in variants.items():
        out = fn()
        ref = out if ref is None else ref
        print(f"{name:5s} {label:28s} {median_ms(fn):8.2f} ms   max |diff| {(out - ref).abs().max().item():.1e}")


def mla_layer(B, H, r, d_rope, S):
    latent = torch.randn(B, S + 64, r + d_rope)[:, :S]  # a view of a reserved buffer, as the cache returns
    q_lat, q_rope = torch.randn(B, H, r) * 0.1, torch.randn(B, H, d_rope) * 0.1
    q = torch.cat([q_lat, q_rope], -1)

    def lat_qt():
        p = torch.softmax(torch.bmm(latent, q.transpose(1, 2)), dim=1)  # [B, S, H]
        return torch.bmm(p.transpose(1, 2), latent[..., :r])

    report("mla", {
        "two GEMMs (ecomla CPU path)": lambda: mla_decode_torch(q_lat, q_rope, latent, 1.0),
        "scores as latent @ q^T": lat_qt,
        "SDPA, heads as query rows": lambda: F.scaled_dot_product_attention(
            q[:, None], latent[:, None], latent[:, None, :, :r], scale=1.0)[:, 0],
    })


def gqa_layer(B, H, G, d, S):
    k = torch.randn(B, G, S + 64, d)[:, :, :S]
    v = torch.randn(B, G, S + 64, d)[:, :, :S]
    q = torch.randn(B, H, 1, d)
    packed = q.view(B, G, H // G, d)

    def gemm():
        return torch.matmul(torch.softmax(torch.matmul(packed * d**-0.5, k.transpose(-1, -2)), -1), v)

    report("gqa", {
        "SDPA enable_gqa=True": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True).view(B, G, H // G, d),
        "SDPA packed (pack_gqa)": lambda: F.scaled_dot_product_attention(packed, k, v),
        "two GEMMs packed (gqa-fair)": gemm,
    })


@torch.inference_mode()
def profile_step(path: str, B: int, S: int) -> None:
    from ecomla.bench.caches import RUNS, fill_synthetic, make_cache
    from ecomla.io import load_model

    model, _ = load_model(path, dtype="float32")
    cache = make_cache(model, RUNS["absorbed"], B, S + 8, torch.float32, "cpu")
    fill_synthetic(cache, model.config, B, S, torch.float32, "cpu")
    tok = torch.randint(0, model.config.vocab_size, (B, 1))
    step = lambda: model(tok, cache=cache, logits_to_keep=1, mla_path="absorbed")  # noqa: E731
    step()
    with torch.profiler.profile() as prof:
        t0 = time.perf_counter()
        for _ in range(3):
            step()
    print(f"one absorbed decode step: {(time.perf_counter() - t0) / 3 * 1e3:.1f} ms (under the profiler), per step:")
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:6]:
        print(f"  {e.key:20s} {e.self_cpu_time_total / 3 / 1e3:8.1f} ms  ({e.count // 3} calls)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--profile", default=None, help="an MLA checkpoint to profile one decode step of")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"B={a.batch} S={a.context} fp32, {a.threads} thread(s)")
    mla_layer(a.batch, 9, 16, 32, a.context)
    gqa_layer(a.batch, 9, 3, 64, a.context)
    if a.profile:
        profile_step(a.profile, a.batch, a.context)


if __name__ == "__main__":
    main()
