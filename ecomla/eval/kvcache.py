"""The KV cache a model decodes through, for decode-style fidelity (`ecomla eval --kv-cache SPEC`).

    ecomla eval default --teacher default --kv-cache quanto:4 --tasks none --out runs/eval-quanto4
    ecomla eval default --teacher default --kv-cache hqq:2:axis=1 --tasks none --out runs/eval-hqq2

SPEC is one of
- `dynamic`: the model's own cache, what `generate()` builds (ordinary K/V for a GQA model, the latent cache for an
  ecomla model);
- `fp8`: transformers' fp8 cache (one scale per layer and tensor);
- `quanto:BITS[:OPTION=V...]`, `hqq:BITS[:OPTION=V...]`: transformers' `QuantizedCache` with that backend, a KIVI-style
  cache that keeps a quantized store and the most recent tokens in full precision (the window). OPTIONs are `axis`
  (keys and values), `key_axis`, `value_axis`, `group` and `window`: transformers' axis_key / axis_value /
  q_group_size / residual_length, whose defaults (0, 0, 64, 128) hold where unset. It is the cache a user gets from
  `model.generate(..., cache_implementation="quantized", cache_config=spec.cache_config())`.

Decode-style means that every position reads its keys and values back from the cache, as in generation: a block is
fed one token at a time (teacher forcing), its B rows stepping together.

Notation: B batch, T block length, C context, G KV heads, d_h head dim, R window (residual_length).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache, QuantizedCache
from transformers.utils import is_hqq_available, is_optimum_quanto_available

from ..common import UserError
from ..generate.generate import prepared
from ..mla.cache import cache_stats
from ..mla.config import SourceShape

FLAG = "--kv-cache"
# what transformers' quantized layers accept; a spec outside it is refused before any model loads
BACKENDS = {
    "quanto": {"bits": (2, 4), "axes": (0, -1), "package": "optimum-quanto", "installed": is_optimum_quanto_available},
    "hqq": {"bits": (1, 2, 3, 4, 8), "axes": (0, 1), "package": "hqq", "installed": is_hqq_available},
}
OPTIONS = {"key_axis": "axis_key", "value_axis": "axis_value", "group": "q_group_size", "window": "residual_length"}


@dataclass(frozen=True)
class KVCacheSpec:
    """A parsed --kv-cache; None fields keep transformers' defaults."""

    backend: str  # dynamic | fp8 | quanto | hqq
    nbits: int | None = None
    axis_key: int | None = None
    axis_value: int | None = None
    q_group_size: int | None = None
    residual_length: int | None = None
    text: str = "dynamic"

    @classmethod
    def parse(cls, text: str) -> KVCacheSpec:
        backend, *rest = text.split(":")
        if backend in ("dynamic", "fp8"):
            if rest:
                raise UserError(f"{FLAG} {text}: '{backend}' takes no bits or options")
            return cls(backend, text=text)
        if backend not in BACKENDS:
            raise UserError(f"{FLAG} {text}: unknown cache; use dynamic, fp8, quanto:BITS or hqq:BITS[:axis=..]")
        rule = BACKENDS[backend]
        bits = _int(rest[0], text, "bits") if rest else None
        if bits not in rule["bits"]:
            raise UserError(f"{FLAG} {text}: {backend} stores {'/'.join(map(str, rule['bits']))} bits")
        fields = {"nbits": bits}
        for item in rest[1:]:
            name, _, value = item.partition("=")
            if name not in ("axis", *OPTIONS) or not value:
                raise UserError(f"{FLAG} {text}: unknown option {item!r}; use axis=, {'=, '.join(OPTIONS)}=")
            for field in ("axis_key", "axis_value") if name == "axis" else (OPTIONS[name],):
                fields[field] = _int(value, text, name)
        for field in ("axis_key", "axis_value"):
            if fields.get(field) not in (None, *rule["axes"]):
                raise UserError(f"{FLAG} {text}: {backend} quantizes along axis {' or '.join(map(str, rule['axes']))}")
        if fields.get("q_group_size", 1) < 1 or fields.get("residual_length", 0) < 0:
            raise UserError(f"{FLAG} {text}: group must be >= 1 and window >= 0")
        if not rule["installed"]():
            raise UserError(f"{FLAG} {text} needs {rule['package']}: pip install 'ecomla[kvquant]'")
        return cls(backend, **fields, text=text)

    def cache_config(self) -> dict | None:
        """`generate()`'s cache_config for this cache (with cache_implementation="quantized"); None for `dynamic`."""
        if self.backend == "dynamic":
            return None
        return {k: v for k, v in asdict(self).items() if v is not None and k != "text"}

    def make(self, model) -> Cache:
        """A fresh, empty cache for `model`, built as `generate()` builds it."""
        if self.backend == "dynamic":
            return DynamicCache(config=model.config)
        return QuantizedCache(config=model.config, **self.cache_config())


def _int(value: str, text: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{FLAG} {text}: {what} must be an integer, got {value!r}") from None


def check_runs(spec: KVCacheSpec, model, batch_sizes: set[int], length: int) -> None:
    """Refuse, with the backend's own reason, a cache that cannot hold decode-style blocks of `length` tokens at
    these batch sizes (before any heavy compute). Every call that quantizes is replayed on layer 0 with random
    keys and values: the first token, then each window flush (1 + k R tokens), then one step that dequantizes."""
    try:
        window = getattr(spec.make(model).layers[0], "residual_length", None)
    except (ValueError, ImportError) as err:
        raise UserError(f"{FLAG} {spec.text} does not fit this model: {err}".splitlines()[0]) from err
    if window is None:
        return
    G = SourceShape.of(model.config).num_kv_heads
    for B in sorted(batch_sizes):
        for n in range(1, length + 1, max(window, 1)):
            layer = spec.make(model).layers[0]
            kv = _random_kv(model, B, n, model.dtype)
            try:
                layer.update(kv, kv)
                layer.update(kv[:, :, :1], kv[:, :, :1])
            except (ValueError, AssertionError, RuntimeError) as err:
                why = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise UserError(f"{FLAG} {spec.text}: {spec.backend} refuses batch {B} x {G} KV heads x {n} "
                                f"tokens ({why}); change group=, axis= or --batch-size") from err


@torch.no_grad()
def decode_hidden(model, input_ids: torch.Tensor, spec: KVCacheSpec) -> tuple[torch.Tensor, Cache]:
    """Final normed hidden states [B, T, D] with the model fed one token at a time through a fresh cache (the MLA
    students prepared for decoding, as `ecomla generate` runs them), and the cache it leaves."""
    model = prepared(model)
    cache = spec.make(model)
    base = getattr(model, model.base_model_prefix)
    steps = [base(input_ids=input_ids[:, t : t + 1], cache=cache, use_cache=True).last_hidden_state
             for t in range(input_ids.shape[1])]  # T x [B, 1, D]
    return torch.cat(steps, dim=1), cache


@torch.no_grad()
def cache_at(model, spec: KVCacheSpec, context: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> Cache:
    """A cache for (GQA) `model` in `dtype` as decoding leaves it after `context` tokens, filled with random keys and
    values (its bytes depend on their shapes only), cheaply. A window of R tokens is flushed into the store as it
    fills, so decoding leaves w = (C - 1) mod R tokens in it (0 without a window): one update of C - w tokens (all
    quantized), then one of w tokens (kept in the window) leave the same store and window. Tests pin this state to
    a model's own token-by-token decoding."""
    cache = spec.make(model)
    window = getattr(cache.layers[0], "residual_length", 0)
    w = (context - 1) % window if window else 0
    for i in range(len(cache.layers)):
        for n in (context - w, w) if w else (context,):
            kv = _random_kv(model, batch, n, dtype)
            cache.update(kv, kv, i)
    return cache


def _random_kv(model, batch: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    shape = SourceShape.of(model.config)
    return torch.randn(batch, shape.num_kv_heads, n, shape.head_dim, dtype=dtype, device=model.device)  # [B, G, n, d_h]


def bytes_summary(cache: Cache, batch: int) -> dict:
    """What the live cache holds per token and sequence, the window included and excluded."""
    s = cache_stats(cache, batch=batch)
    return {"context": s["seq_len"], "bytes_per_token": s["bytes_per_token"],
            "window_tokens": s["window_tokens"], "bytes_per_token_no_window": s["store_bytes_per_token"]}
