"""The caches each benchmark run decodes with, and a synthetic fill for contexts too long to prefill.

Runs (row fields `path` / `impl`):
- absorbed, absorbed-sdpa, decompressed: the MLA model over its latent cache ([B, 1, S, r_kv + d_rope] per
  layer), reserved for the whole run, so a step writes one row in place.
- gqa-dynamic: transformers' default, `DynamicCache` (K/V concatenated every step), SDPA attention.
- gqa-static: transformers' `StaticCache` (in place; decode attends over the whole buffer with a mask).
- gqa-fair: the fair GQA baseline (gqa.py): K/V [B, G, S, d_h] preallocated and written in place, query heads
  of a KV group packed as query rows (no repeat_kv copy, no mask); two GEMMs on CPU fp32, SDPA elsewhere.
- gqa-fair-sdpa: the same with SDPA on every device (the faster of the two on some CPUs).
Kept GQA layers of a hybrid MLA model use transformers' DynamicLayer in the MLA runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache

from ..mla.cache import LatentCacheLayer, reserve_latent
from .gqa import PACKED_GQA, PACKED_GQA_SDPA, PreallocKVLayer


@dataclass(frozen=True)
class Run:
    name: str
    kind: str  # "mla" or "gqa": which model it needs
    path: str  # "absorbed", "decompressed" or "gqa"
    cache: str  # "latent", "dynamic", "static" or "prealloc"
    decode_kernel: bool = True  # MLA: use ecomla.kernels.mla_decode for one-token steps
    attn: str | None = None  # GQA: transformers attention implementation for this run (None: the model's own)


RUNS = {r.name: r for r in (
    Run("absorbed", "mla", "absorbed", "latent"),
    Run("absorbed-sdpa", "mla", "absorbed", "latent", decode_kernel=False),
    Run("decompressed", "mla", "decompressed", "latent"),
    Run("gqa-dynamic", "gqa", "gqa", "dynamic"),
    Run("gqa-static", "gqa", "gqa", "static"),
    Run("gqa-fair", "gqa", "gqa", "prealloc", attn=PACKED_GQA),
    Run("gqa-fair-sdpa", "gqa", "gqa", "prealloc", attn=PACKED_GQA_SDPA),
)}


def make_cache(model, run: Run, batch: int, max_len: int, dtype: torch.dtype, device) -> Cache:
    config = model.config
    if run.cache == "latent":
        cache = DynamicCache(config=config)
        reserve_latent(cache, batch, max_len, config, dtype, device)
        return cache
    if run.cache == "dynamic":
        return DynamicCache(config=config)
    if run.cache == "static":
        return StaticCache(config=config, max_cache_len=max_len)
    if run.cache == "prealloc":
        return Cache(layers=[PreallocKVLayer(max_len) for _ in range(config.num_hidden_layers)])
    raise ValueError(f"unknown cache kind {run.cache!r}")


def allocated_bytes(cache: Cache) -> int:
    """Bytes the cache's tensors hold now, including reserved-but-unused rows."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "allocated_bytes"):
            total += layer.allocated_bytes()
        elif getattr(layer, "is_initialized", False) and layer.keys is not None:
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total


def _row_shapes(config, layer_idx: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((heads, key width), (heads, value width)) of one cached token in layer `layer_idx`."""
    spec = config.mla_spec(layer_idx) if hasattr(config, "mla_spec") else None
    if spec is not None:
        return (1, spec.cache_elements), (1, 0)
    d_h = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    G = config.num_key_value_heads or config.num_attention_heads
    return (G, d_h), (G, d_h)


def fill_synthetic(cache: Cache, config, batch: int, context: int, dtype, device, chunk_bytes: int = 256 << 20):
    """Write `context` random rows per sequence into every layer through the Cache API (no prefill).

    Rows go in chunks of about `chunk_bytes` so the transient tensor stays small next to the cache; a
    concatenating DynamicLayer gets one chunk (chunks would re-copy the growing cache each time).
    """
    gen = torch.Generator(device=device).manual_seed(0)
    for i, layer in enumerate(cache.layers):
        (gk, wk), (gv, wv) = _row_shapes(config, i)
        per_token = batch * (gk * wk + gv * wv) * torch.empty((), dtype=dtype).element_size()
        concatenates = type(layer) is DynamicLayer
        step = context if concatenates else max(1, min(context, chunk_bytes // max(per_token, 1)))
        for start in range(0, context, step):
            n = min(step, context - start)
            k = torch.randn((batch, gk, n, wk), generator=gen, dtype=dtype, device=device)
            v = k[..., :0] if isinstance(layer, LatentCacheLayer) else torch.randn(
                (batch, gv, n, wv), generator=gen, dtype=dtype, device=device)
            cache.update(k, v, i)
