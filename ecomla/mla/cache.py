"""The latent KV cache, inside Hugging Face's Cache API.

An MLA layer caches one row per token: [c_kv (r_kv) | roped k_rope (d_rope)], shared by all heads.
`LatentCacheLayer` registers itself as the cache layer for `layer_types[i] == "latent_attention"`, so
`DynamicCache(config=model.config)` -- what `model.generate()` builds -- holds latent rows for MLA layers
and ordinary per-KV-head K/V (`DynamicLayer`) for layers that stayed attention.

Shapes: keys [B, 1, S, X] (one shared "head"); values is a zero-width view [B, 1, S, 0]. A row is the latent
[c_kv | k_rope] in the model's dtype (X = r_kv + d_rope), or with `cache_bits` 8 or 4 its quantized byte row (uint8,
X = row_bytes, `ecomla.mla.quant`): the layer stores whatever rows the attention appends (`append_latent`), so the
Cache API's own operations (crop, beam reordering, batch selection) work on either.
The rows live in a preallocated buffer that grows geometrically, so a decode step writes one row in
place instead of concatenating the whole cache. `reserve()` sizes it exactly up front.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .config import LATENT_LAYER_TYPE


class LatentCacheLayer(DynamicLayer):
    _layer_type = LATENT_LAYER_TYPE  # transformers maps this layer type to this class

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        self.device = key_states.device
        self._buf = key_states.new_empty((key_states.shape[0], 1, 0, key_states.shape[-1]))
        self.keys, self.values = self._buf, self._buf[..., :0]
        self.is_initialized = True

    def reserve(self, batch_size: int, max_len: int, width: int, dtype: torch.dtype, device) -> None:
        """Allocate room for `max_len` tokens now (benchmarks and generate with a known length)."""
        if not self.is_initialized:
            self.lazy_initialization(torch.empty(batch_size, 1, 0, width, dtype=dtype, device=device))
        self._grow(max_len, exact=True)

    def _grow(self, needed: int, exact: bool = False) -> None:
        seen = self.keys.shape[-2]
        owns = (self.keys.untyped_storage().data_ptr() == self._buf.untyped_storage().data_ptr()
                and self.keys.shape[0] == self._buf.shape[0])
        if owns and self._buf.shape[-2] >= needed:
            return
        capacity = needed if exact else needed + max(256, needed // 4)  # amortised O(1) copies per row
        buf = self.keys.new_empty((self.keys.shape[0], 1, capacity, self.keys.shape[-1]))
        buf[..., :seen, :] = self.keys
        self._buf = buf
        self.keys = buf[..., :seen, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None, *args, **kwargs):
        """Append latent rows [B, 1, T, r_kv + d_rope]; returns (all rows [B, 1, S, W], zero-width values)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        seen, new = self.keys.shape[-2], key_states.shape[-2]
        self._grow(seen + new)
        self._buf[..., seen : seen + new, :] = key_states
        self.keys = self._buf[..., : seen + new, :]
        self.values = self.keys[..., :0]
        return self.keys, self.values

    def allocated_bytes(self) -> int:
        return self._buf.numel() * self._buf.element_size() if self.is_initialized else 0


def append_latent(cache: Cache, layer_idx: int, rows: torch.Tensor) -> torch.Tensor:
    """Append one MLA layer's new rows [B, T, X] to `cache`; returns all its rows [B, S, X].

    The Cache API's `update(keys, values)` expects per-head keys and values: a latent layer has one "head" shared by
    all query heads, and no values (they are read from the same rows), so the rows go in as keys [B, 1, T, X] and
    the values as a zero-width view of them."""
    rows = rows[:, None]  # [B, 1, T, X]
    return cache.update(rows, rows[..., :0], layer_idx)[0][:, 0]


def row_shape(config, layer_idx: int, dtype: torch.dtype) -> tuple[int, torch.dtype]:
    """(width, dtype) of one cached row of MLA layer `layer_idx`: the latent in the model's `dtype`, or the quantized
    byte row of `config.cache_bits`."""
    fmt = config.latent_format(layer_idx)
    return (config.mla_spec(layer_idx).cache_elements, dtype) if fmt is None else (fmt.row_bytes, torch.uint8)


def reserve_latent(cache: Cache, batch_size: int, max_len: int, config, dtype, device) -> None:
    """Preallocate every latent layer of `cache` for `max_len` tokens."""
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, LatentCacheLayer) and config.mla_spec(i) is not None:
            layer.reserve(batch_size, max_len, *row_shape(config, i, dtype), device)


def allocated_bytes(layer) -> int:
    """Bytes a cache layer holds now, reserved rows included: a layer that preallocates says so through its own
    `allocated_bytes()`; for any other layer (DynamicLayer, StaticLayer) it is what its keys and values hold."""
    if hasattr(layer, "allocated_bytes"):
        return layer.allocated_bytes()
    if not getattr(layer, "is_initialized", False) or layer.keys is None:
        return 0
    return held_bytes([layer.keys, layer.values, *_store(layer)])


def held_bytes(obj) -> int:
    """Bytes of the tensors in `obj`: a tensor, a quantized tensor (a tensor subclass over inner tensors: quanto's
    packed data, scales and shifts) or a tuple / list / dict of them (HQQ: packed data, then a meta dict with its
    scales and zeros; fp8: data and scale)."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            return sum(held_bytes(getattr(obj, name)) for name in obj.__tensor_flatten__()[0])
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        obj = list(obj.values())
    return sum(held_bytes(x) for x in obj) if isinstance(obj, (tuple, list)) else 0


def _store(layer) -> tuple:
    """A quantized layer's store (transformers' `BaseQuantizedLayer`): its quantized keys and values."""
    return getattr(layer, "_quantized_keys", None), getattr(layer, "_quantized_values", None)


def _per_token(nbytes: int, rows: int):
    return nbytes // rows if nbytes % rows == 0 else nbytes / rows


def cache_stats(cache: Cache, batch: int | None = None) -> dict:
    """Measured from the live cache tensors: tokens held, bytes held (and allocated), bytes per token per sequence.

    A quantized layer (transformers' `QuantizedCache`) holds a quantized store (its layout is the backend's) and a
    window of recent tokens in full precision: both are counted; `window_tokens` is the largest window and
    `store_bytes_per_token` the bytes per token with windows left out. Its rows are not in the tensors' shapes:
    pass `batch` for such a cache (otherwise it is read from the keys)."""
    live, per_token, store_per_token, window_max, batch_seen, seq = 0, 0, 0, 0, 0, 0
    layers = []
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False) or layer.keys is None:
            continue
        k, v = layer.keys, layer.values
        store, plain = held_bytes(_store(layer)), held_bytes([k, v])
        window = k.shape[-2] if store and k.dim() == 4 else 0
        if batch is None and store:
            raise ValueError("cache_stats: pass batch= for a quantized cache")
        b, s = batch or k.shape[0], layer.get_seq_length() if store else k.shape[-2]
        live += store + plain
        row = _per_token(store + plain, max(b * s, 1))
        per_token += row
        store_per_token += _per_token(store, max(b * (s - window), 1)) if store else row
        batch_seen, seq, window_max = max(batch_seen, b), max(seq, s), max(window_max, window)
        layers.append({"type": type(layer).__name__, "bytes_per_token": row, "window_tokens": window,
                       "dtype": str(k.dtype).split(".")[-1],
                       "elements_per_token": None if store else row // k.element_size()})
    return {"batch": batch_seen, "seq_len": seq, "live_bytes": live, "bytes_per_token": per_token,
            "store_bytes_per_token": store_per_token, "window_tokens": window_max,
            "allocated_bytes": sum(allocated_bytes(layer) for layer in cache.layers), "layers": layers}
