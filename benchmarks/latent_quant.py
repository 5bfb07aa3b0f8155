"""Which quantized latent cache to build: c_kv group size and the rotary part's format, by KL per byte.

    OMP_NUM_THREADS=1 python benchmarks/latent_quant.py runs/s2x runs/s4x --out runs/latent-quant
    python benchmarks/latent_quant.py runs/s8x --variants "16-bit,int8 g32,int4 g32" --max-tokens 8192

For each MLA student, every variant below is applied as the fake quantization an uncached forward reads (which is
what decoding over that cache reads: tests/test_quant.py), and measured on held-out chat and plain text as
`ecomla eval --tasks none` measures them (KL to the teacher, perplexities; --max-tokens target tokens each). Bytes
are per token and layer of the cache, scales included, against the bf16 GQA source (2 * 2 * G * d_h).

Variants: c_kv in per-token groups of 32 or 64 at 8 and 4 bits; the rotary part in fp16, in per-token 8- or 4-bit
groups (exact: no window), or 4-bit with a static per-pair scale (a rotated pair keeps its radius: the largest radius
of each pair over --calib-tokens training tokens, symmetric codes; it needs calibration and ships in the weights,
so it is measured here before anything is built for it). Below 4 bits: c_kv at 3 bits (groups of 32) and 2 bits
(32 or 64), also after a fixed random rotation of c_kv (`rotated`, an exact fold): what a wider latent would need to
reach 12x (the 2x student at 2 bits in groups of 64 is 10.7x). They break (docs/notebook/LOG.md, 2026-12-07), so
the cache has no 3- or 2-bit format.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ecomla.data.chat import load_chat, split_chat
from ecomla.data.packing import PackedChat
from ecomla.eval.fidelity import fidelity
from ecomla.eval.run import EvalArgs, heldout_batches
from ecomla.io import load_model, load_tokenizer
from ecomla.mla.config import SourceShape
from ecomla.mla.quant import LatentFormat


@dataclass(frozen=True)
class StaticRope:
    """c_kv as `base`; the rotary part in `bits` symmetric codes with one scale per rotary pair (from calibration)."""

    base: LatentFormat
    radius: torch.Tensor  # [d_rope / 2]: the largest radius of each pair
    bits: int = 4

    @property
    def row_bytes(self) -> int:
        return self.base.row_bytes - 2 * self.base.d_rope + self.base.d_rope * self.bits // 8

    def fake(self, latent: torch.Tensor) -> torch.Tensor:
        out = self.base.fake(latent)
        r = latent[..., self.base.r_kv:]
        top = (1 << (self.bits - 1)) - 1
        step = (self.radius.repeat(2) / top).to(r.dtype)  # rotate-half layout: dim i pairs with i + d_rope / 2
        out[..., self.base.r_kv:] = (r / step).round().clamp(-top, top) * step
        return out


def variants(r_kv: int, d_rope: int, radius: torch.Tensor) -> dict:
    f = lambda bits, group=32, rope=16: LatentFormat(r_kv, d_rope, bits, rope_bits=rope, group=group)  # noqa: E731
    return {"16-bit": None, "int8 g32": f(8), "int8 g64": f(8, 64), "int4 g32": f(4), "int4 g64": f(4, 64),
            "int4 g32 rope8": f(4, rope=8), "int4 g32 rope4": f(4, rope=4),
            "int4 g32 rope4-static": StaticRope(f(4), radius),
            "int3 g32 rope4": f(3, rope=4), "int2 g32 rope4": f(2, rope=4), "int2 g64 rope4": f(2, 64, rope=4),
            "rotated int3 g32 rope4": f(3, rope=4), "rotated int2 g64 rope4": f(2, 64, rope=4)}


def rotated(model, seed: int = 0) -> torch.nn.Module:
    """A copy of `model` with each layer's c_kv turned by a fixed random orthogonal R (an exact fold: kv_a_proj's
    c_kv rows become R W, kv_b_proj's columns W R^T; no latent norm), so every per-token group mixes all channels
    instead of holding the latent's strongest (or weakest) directions together. Measured as the `rotated` variants."""
    m, g = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    for attn in m.mla_attention():
        r = attn.spec.kv_lora_rank
        if attn.kv_a_layernorm is not None:
            raise SystemExit("the rotated variants fold R through the latent; a latent norm's gains do not commute")
        R = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))[0].to(attn.kv_b_proj.weight.dtype)
        with torch.no_grad():
            a = attn.kv_a_proj_with_mqa
            a.weight[:r] = R @ a.weight[:r]
            if a.bias is not None:
                a.bias[:r] = R @ a.bias[:r]
            attn.kv_b_proj.weight.copy_(attn.kv_b_proj.weight @ R.T)
    return m


def rope_radius(model, tok, tokens: int) -> dict[int, torch.Tensor]:
    """Per MLA layer, the largest radius of each rotary pair of the cached k_rope over `tokens` training tokens."""
    blocks = PackedChat(split_chat(load_chat("default"))["train"], tok, 512, seed=0).take_tokens(tokens, 8)
    radius, hooks = {}, []
    for attn in model.mla_attention():
        def grab(latent, attn=attn):
            k = latent[..., attn.spec.kv_lora_rank:].float()  # [B, T, d_rope]
            half = k.shape[-1] // 2
            r = (k[..., :half] ** 2 + k[..., half:] ** 2).sqrt().amax(dim=(0, 1))
            radius[attn.layer_idx] = torch.maximum(radius.get(attn.layer_idx, r), r)
            return latent
        hooks.append(attn)
        attn.latent = (lambda f, g: lambda x, rope: g(f(x, rope)))(attn.latent, grab)
    with torch.no_grad():
        for b in blocks:
            model(b["input_ids"], use_cache=False)
    for attn in hooks:
        del attn.latent  # back to the class's method
    return radius


def with_formats(model, make) -> torch.nn.Module:
    """A copy of `model` sharing its weights, each MLA layer reading its latent through `make(attn)`."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    twin = copy.deepcopy(model, memo=shared)
    for attn in twin.mla_attention():
        attn.latent_format = make(attn)
    return twin


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--teacher", default="default")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--variants", default=None, help="comma list of variant names (default: all)")
    p.add_argument("--out", default="runs/latent-quant")
    a = p.parse_args()
    names = list(variants(1, 2, torch.ones(1))) if a.variants is None else a.variants.split(",")
    teacher, _ = load_model(a.teacher, dtype="float32")
    src_bytes = 2 * SourceShape.of(teacher.config).kv_elements_per_layer
    rows = []
    for spec in a.models:
        model, path = load_model(spec, dtype="float32")
        tok = load_tokenizer(path)
        batches = heldout_batches(tok, EvalArgs(models=[spec], tasks="none", max_tokens=a.max_tokens))
        radius = rope_radius(model, tok, a.calib_tokens) if any("static" in n for n in names) else {}
        twins, row_bytes = {}, {}
        turned = rotated(model) if any(n.startswith("rotated") for n in names) else None
        for name in names:
            def make(attn, name=name):
                s = attn.spec
                return variants(s.kv_lora_rank, s.qk_rope_head_dim, radius.get(attn.layer_idx))[name]
            twins[name] = with_formats(turned if name.startswith("rotated") else model, make)
            fmts = [attn.latent_format for attn in twins[name].mla_attention()]
            row_bytes[name] = sum(2 * (a.spec.cache_elements) if f is None else f.row_bytes
                                  for f, a in zip(fmts, model.mla_attention())) / len(fmts)
        fid = {c: fidelity(twins, teacher, bs, desc=f"{Path(spec).name}/{c}") for c, bs in batches.items()}
        for name in twins:
            rows.append({"model": Path(spec).name, "variant": name, "bytes_per_token_layer": row_bytes[name],
                         "vs_bf16_gqa": src_bytes / row_bytes[name],
                         **{f"{k}_{c}": fid[c][name][k] for c in fid for k in ("kl", "ppl")}})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))
    (out / "table.md").write_text(table(rows) + "\n")


def table(rows: list[dict]) -> str:
    lines = ["| student | latent cache | B/token/layer | vs bf16 GQA | KL chat | ppl chat | KL text | ppl text |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['bytes_per_token_layer']:.1f} | {r['vs_bf16_gqa']:.2f}x | "
                     f"{r['kl_chat']:.4f} | {r['ppl_chat']:.2f} | {r['kl_text']:.4f} | {r['ppl_text']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
