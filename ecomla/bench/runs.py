"""What one benchmark run times: a `Run` names the model it needs, the cache it decodes with, and the state the
model is put in first. A synthetic fill writes rows into a cache for contexts too long to prefill.

Core runs (row fields `path` / `impl`):
- absorbed: the MLA model after `model.prepare_for_decode(kernel="auto")` (folded weights, the device's decode
  kernel), over its latent cache ([B, 1, S, r_kv + d_rope] per layer) reserved for the whole run, so a step
  writes one row in place.
- absorbed-sdpa: the same preparation with `kernel="sdpa"` (the SDPA formulation, no kernel).
- decompressed: the unprepared MLA model, K/V up-projected from the latent every step.
- gqa-dynamic: transformers' default, `DynamicCache` (K/V concatenated every step), SDPA attention.
- gqa-static: transformers' `StaticCache` (in place; decode attends over the whole buffer with a mask).
- gqa-fair, gqa-fair-sdpa: the fair GQA baselines (gqa_fair.py): K/V preallocated and written in place, query heads
  of a KV group packed as rows (two GEMMs on CPU float32, SDPA elsewhere; `-sdpa`: SDPA everywhere).
Kept GQA layers of a hybrid MLA model use transformers' DynamicLayer in the MLA runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache

from ..mla.cache import LatentCacheLayer, append_latent, reserve_latent
from ..mla.config import SourceShape
from . import gqa_fair

# (model, batch, max_len, dtype, device) -> an empty cache with room for max_len tokens per sequence
CacheFactory = Callable[[torch.nn.Module, int, int, torch.dtype, torch.device], Cache]


@dataclass(frozen=True)
class Run:
    name: str
    system: str  # "mla" or "gqa": which model it needs
    cache: CacheFactory
    mla_path: str | None = None  # MLA: the path of one-token steps, "absorbed" or "decompressed"
    kernel: str | None = None  # MLA: model.prepare_for_decode(kernel=...) before timing; None: unprepared
    fold: bool = True  # MLA with a kernel: prepare_for_decode(fold=...)
    attn_implementation: str | None = None  # GQA: transformers attention implementation (None: the model's own)
    impl: str | Callable[[torch.device, torch.dtype], str] | None = None  # GQA: the `impl` reported
    cache_bits: int | None = None  # MLA: model.set_cache_bits(...) first (`--cache-bits`); None: the model's own

    @property
    def path(self) -> str:
        return self.mla_path or "gqa"


def latent_cache(model, batch: int, max_len: int, dtype: torch.dtype, device) -> Cache:
    cache = DynamicCache(config=model.config)
    reserve_latent(cache, batch, max_len, model.config, dtype, device)
    return cache


RUNS = {r.name: r for r in (
    Run("absorbed", "mla", latent_cache, mla_path="absorbed", kernel="auto"),
    Run("absorbed-sdpa", "mla", latent_cache, mla_path="absorbed", kernel="sdpa"),
    Run("decompressed", "mla", latent_cache, mla_path="decompressed"),
    Run("gqa-dynamic", "gqa", lambda model, *_: DynamicCache(config=model.config), impl="hf-dynamic"),
    Run("gqa-static", "gqa", lambda model, batch, max_len, *_: StaticCache(config=model.config, max_cache_len=max_len),
        impl="hf-static"),
    Run("gqa-fair", "gqa", gqa_fair.prealloc_cache, attn_implementation=gqa_fair.PACKED_GQA,
        impl=lambda device, dtype: "packed-gqa-gemm" if gqa_fair.uses_gemm(device, dtype) else "packed-gqa-sdpa"),
    Run("gqa-fair-sdpa", "gqa", gqa_fair.prealloc_cache, attn_implementation=gqa_fair.PACKED_GQA_SDPA,
        impl="packed-gqa-sdpa"),
)}


def at_cache_bits(runs: list[Run], bits: list[int] | None) -> list[Run]:
    """Every MLA run once per latent cache width in `bits` (named e.g. absorbed-int4, absorbed-16bit); GQA runs once.
    None: the runs as they are (the MLA model's own cache)."""
    if not bits:
        return runs
    out = []
    for r in runs:
        if r.system != "mla":
            out.append(r)
            continue
        out += [replace(r, name=f"{r.name}-{'16bit' if b == 16 else f'int{b}'}", cache_bits=b) for b in bits]
    return out


def prepare(model, run: Run, device, dtype: torch.dtype) -> str:
    """Put `model` in the state `run` times (an explicit decode preparation, or none); returns the `impl` name."""
    if run.system == "gqa":
        return run.impl(torch.device(device), dtype) if callable(run.impl) else run.impl
    if run.cache_bits is not None:
        model.set_cache_bits(run.cache_bits)
    if run.kernel is None:
        model.drop_decode_preparation()  # an earlier run may have prepared it
        return f"sdpa-{run.mla_path}"
    return model.prepare_for_decode(kernel=run.kernel, fold=run.fold).decode_kernel()


@contextlib.contextmanager
def attention_implementation(model, name: str | None):
    """Run a transformers model with attention implementation `name` (None: leave it), then restore it."""
    if name is None:
        yield
        return
    if name in gqa_fair.FUNCTIONS:
        gqa_fair.register()
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _row_shapes(config, layer_idx: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((heads, key width), (heads, value width)) of one cached token in layer `layer_idx`."""
    spec = config.mla_spec(layer_idx) if hasattr(config, "mla_spec") else None
    if spec is not None:
        return (1, spec.cache_elements), (1, 0)
    src = SourceShape.of(config)
    return (src.num_kv_heads, src.head_dim), (src.num_kv_heads, src.head_dim)


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
            if isinstance(layer, LatentCacheLayer):  # rows as the attention writes them (quantized or not)
                fmt = config.latent_format(i)
                append_latent(cache, i, k[:, 0] if fmt is None else fmt.quantize(k[:, 0]))
                continue
            cache.update(k, torch.randn((batch, gv, n, wv), generator=gen, dtype=dtype, device=device), i)
