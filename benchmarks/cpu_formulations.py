"""Which exact formulation of decode attention is fastest on CPU, and where a decode step's time goes.

    python benchmarks/cpu_formulations.py --threads 2
    python benchmarks/cpu_formulations.py --threads 2 --profile runs/smollm2-8x

Notation: B batch, S cached tokens, H query heads, G KV heads, d_h head dim, W = r_kv + d_rope.
Default shape: SmolLM2-135M (H=9, G=3, d_h=64, 30 layers) with the 8x latent 16+32, B=8, S=4k, fp32.
Each variant runs over `--layers` distinct caches, as a decode step does (30 layers of an 8x latent cache at
B 8 / 4k hold 189 MB, the GQA K/V 1.5 GB: read from memory, not from the last-level cache as a one-layer loop
would be), and reports the total per step. Variants are timed in interleaved rounds (median of rounds), so
machine drift hits all alike; every variant is checked against the first of its group.
1. Absorbed MLA: two GEMMs (ecomla's CPU decode path), torch.softmax instead of the in-place form, scores as
   latent @ q^T, SDPA with heads as query rows; and a plain sum over the same caches, the memory-read floor.
2. GQA: SDPA with enable_gqa=True (what transformers uses without a mask), the packed layout (query heads of a
   KV group as rows) through SDPA (`gqa-fair-sdpa`) and as two GEMMs (`gqa-fair`); and the read floor.
3. The latent cache's widths at 4x (64 + 32): the CPU path over fp32 rows, and over 8- and 4-bit byte rows
   (`ecomla.mla.quant`, dequantized a few sequences at a time), checked against the 16-bit path over the rows'
   dequantized values; and the read floor of the 4-bit rows.
4. The scores GEMM alone (q [H, W] against each sequence's S rows), as torch's weight-only integer CPU kernels
   would compute it straight from the codes (the int8 one with a scale per row, the int4 one with a scale and zero
   per 32 values, as ecomla's 4-bit rows hold them; its packed layout made once, untimed), with fp32 and bf16
   activations, against the fp32 GEMM over dequantized rows: half of a decode over codes, a lower bound on it.
5. With --profile DIR: torch-profiler totals of one absorbed decode step of that MLA checkpoint.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ecomla.bench.gqa_fair import packed_gqa_attention, packed_gqa_sdpa_attention
from ecomla.kernels.mla_decode import mla_decode_torch


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


@torch.inference_mode()
def report(name: str, variants: dict, rounds: int, n: int = 3) -> None:
    outs = {label: fn() for label, fn in variants.items()}  # also the warm-up
    ref = next(iter(outs.values()))
    times = {label: [] for label in variants}
    for _ in range(rounds):
        for label, fn in variants.items():
            times[label].append(median_ms(fn, n))
    for label, out in outs.items():
        diff = "" if out is None else f"max |diff| {(out - ref).abs().max().item():.1e}"
        ts = times[label]
        print(f"{name:5s} {label:36s} {statistics.median(ts):8.2f} ms/step  ({min(ts):.1f}-{max(ts):.1f})   {diff}")


def mla_variants(B, H, r, d_rope, S, layers):
    # views of reserved buffers, as the cache returns them
    lat = [torch.randn(B, S + 64, r + d_rope)[:, :S] for _ in range(layers)]
    q_lat, q_rope = torch.randn(B, H, r) * 0.1, torch.randn(B, H, d_rope) * 0.1
    q = torch.cat([q_lat, q_rope], -1)

    def each(fn):  # one step: every layer's attention; the last layer's output is compared
        return lambda: [fn(x) for x in lat][-1]

    def floor():
        for x in lat:
            x.sum()

    return {
        "two GEMMs (ecomla CPU path)": each(lambda x: mla_decode_torch(q_lat, q_rope, x, 1.0)),
        "two GEMMs, torch.softmax": each(lambda x: torch.bmm(torch.softmax(torch.bmm(q, x.transpose(1, 2)), -1),
                                                             x[..., :r])),
        "scores as latent @ q^T": each(lambda x: torch.bmm(torch.softmax(torch.bmm(x, q.transpose(1, 2)), 1)
                                                           .transpose(1, 2), x[..., :r])),
        "SDPA, heads as query rows": each(lambda x: F.scaled_dot_product_attention(
            q[:, None], x[:, None], x[:, None, :, :r], scale=1.0)[:, 0]),
        "read floor (sum of the caches)": floor,
    }


def latent_width_variants(B, H, r, d_rope, S, layers):
    from ecomla.mla.quant import LatentFormat

    lat = [torch.randn(B, S, r + d_rope) for _ in range(layers)]
    q_lat, q_rope = torch.randn(B, H, r) * 0.1, torch.randn(B, H, d_rope) * 0.1
    fmts = {bits: LatentFormat(r, d_rope, bits) for bits in (8, 4)}
    rows = {bits: [f.quantize(x) for x in lat] for bits, f in fmts.items()}
    back = [fmts[4].dequantize(x, torch.float32) for x in rows[4]]  # what the 4-bit rows read as

    def each(caches, fmt=None):
        return lambda: [mla_decode_torch(q_lat, q_rope, x, 1.0, fmt=fmt) for x in caches][-1]

    def floor():
        for x in rows[4]:
            x.sum(dtype=torch.int32)

    return {
        "16-bit path over the 4-bit values": each(back),
        "4-bit rows": each(rows[4], fmts[4]),
        "8-bit rows (compared to the above)": each(rows[8], fmts[8]),
        "read floor of the 4-bit rows": floor,
    }


def int_kernel_variants(B, H, W, S, layers):
    """Scores [B, H, S] per layer from codes by torch's weight-only int8 / int4 CPU GEMMs (one call a sequence),
    against the fp32 GEMM; timing only (other values: not compared), and the bf16 rows round q and the scales to
    bf16, which ecomla's decode does not."""
    codes = [torch.randint(0, 16, (B, S, W), dtype=torch.int32) for _ in range(layers)]
    packed = [[torch._convert_weight_to_int4pack_for_cpu(c[b], 1) for b in range(B)] for c in codes]
    scale_zero = [torch.rand(W // 32, S, 2) for _ in range(B)]  # per sequence: [groups, rows, (scale, zero)]
    signed = [(c - 8).to(torch.int8) for c in codes]
    row_scale = torch.rand(S)
    back = [c.float() for c in codes]  # what a dequantized cache holds (values aside)
    q = torch.randn(B, H, W) * 0.1

    def int4(dtype):
        qd, sz = q.to(dtype), [x.to(dtype) for x in scale_zero]
        return lambda: [[torch._weight_int4pack_mm_for_cpu(qd[b], pk[b], 32, sz[b]) for b in range(B)]
                        for pk in packed] and None

    def int8(dtype):
        qd, rs = q.to(dtype), row_scale.to(dtype)
        return lambda: [[torch._weight_int8pack_mm(qd[b], c[b], rs) for b in range(B)] for c in signed] and None

    return {
        "fp32 GEMM over fp32 rows": lambda: [torch.bmm(q, x.transpose(1, 2)) for x in back][-1][-1],
        "int4 kernel, fp32 q": int4(torch.float32),
        "int4 kernel, bf16 q": int4(torch.bfloat16),
        "int8 kernel, fp32 q": int8(torch.float32),
        "int8 kernel, bf16 q": int8(torch.bfloat16),
    }


def gqa_variants(B, H, G, d, S, layers):
    kv = [(torch.randn(B, G, S + 64, d)[:, :, :S], torch.randn(B, G, S + 64, d)[:, :, :S]) for _ in range(layers)]
    q = torch.randn(B, H, 1, d)

    def each(fn):
        return lambda: [fn(k, v) for k, v in kv][-1]

    def floor():
        for k, v in kv:
            k.sum(), v.sum()

    return {
        "SDPA enable_gqa=True": each(lambda k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                                     .transpose(1, 2)),
        "packed, SDPA (gqa-fair-sdpa)": each(lambda k, v: packed_gqa_sdpa_attention(None, q, k, v)[0]),
        "packed, two GEMMs (gqa-fair)": each(lambda k, v: packed_gqa_attention(None, q, k, v)[0]),
        "read floor (sum of the caches)": floor,
    }


@torch.inference_mode()
def profile_step(path: str, B: int, S: int) -> None:
    from ecomla.bench.runs import fill_synthetic, latent_cache
    from ecomla.io import load_model

    model = load_model(path, dtype="float32")[0].prepare_for_decode()
    cache = latent_cache(model, B, S + 8, torch.float32, "cpu")
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
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--layers", type=int, default=30, help="distinct layer caches per step (SmolLM2-135M: 30)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median reported)")
    p.add_argument("--profile", default=None, help="an MLA checkpoint to profile one decode step of")
    a = p.parse_args()
    if min(a.layers, a.rounds, a.batch, a.context) < 1:
        p.error("--layers, --rounds, --batch and --context must be at least 1")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"B={a.batch} S={a.context} fp32, {a.layers} layers per step, {a.threads} thread(s), "
          f"median of {a.rounds} rounds (range)")
    report("mla", mla_variants(a.batch, 9, 16, 32, a.context, a.layers), a.rounds)
    report("gqa", gqa_variants(a.batch, 9, 3, 64, a.context, a.layers), a.rounds)
    report("lat", latent_width_variants(a.batch, 9, 64, 32, a.context, a.layers), a.rounds)
    report("int", int_kernel_variants(a.batch, 9, 96, a.context, a.layers), a.rounds)
    if a.profile:
        profile_step(a.profile, a.batch, a.context)


if __name__ == "__main__":
    main()
