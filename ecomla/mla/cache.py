"""The latent KV cache, inside Hugging Face's Cache API.

An MLA layer caches one row per token: [c_kv (r_kv) | roped k_rope (d_rope)], shared by all heads.
`LatentCacheLayer` registers itself as the cache layer for `layer_types[i] == "latent_attention"`, so
`DynamicCache(config=model.config)` -- what `model.generate()` builds -- holds latent rows for MLA layers
and ordinary per-KV-head K/V (`DynamicLayer`) for layers that stayed attention.

Shapes: keys [B, 1, S, r_kv + d_rope] (one shared "head"); values is a zero-width view [B, 1, S, 0].
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


def reserve_latent(cache: Cache, batch_size: int, max_len: int, config, dtype, device) -> None:
    """Preallocate every latent layer of `cache` for `max_len` tokens."""
    for i, layer in enumerate(cache.layers):
        spec = config.mla_spec(i)
        if isinstance(layer, LatentCacheLayer) and spec is not None:
            layer.reserve(batch_size, max_len, spec.cache_elements, dtype, device)


def allocated_bytes(layer) -> int:
    """Bytes a cache layer holds now, reserved rows included: a layer that preallocates says so through its own
    `allocated_bytes()`; for any other layer (DynamicLayer, StaticLayer) it is what its keys and values hold."""
    if hasattr(layer, "allocated_bytes"):
        return layer.allocated_bytes()
    if not getattr(layer, "is_initialized", False) or layer.keys is None:
        return 0
    return layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()


def cache_stats(cache: Cache) -> dict:
    """Measured from the live cache tensors: tokens held, bytes held (and allocated), bytes per token per sequence."""
    live, per_token, batch, seq = 0, 0, 0, 0
    layers = []
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False) or layer.keys is None:
            continue
        k, v = layer.keys, layer.values
        b, s = k.shape[0], k.shape[-2]
        nbytes = k.numel() * k.element_size() + v.numel() * v.element_size()
        live += nbytes
        row = nbytes // max(b * s, 1)
        per_token += row
        batch, seq = max(batch, b), max(seq, s)
        layers.append({"type": type(layer).__name__, "bytes_per_token": row,
                       "elements_per_token": row // k.element_size()})
    return {"batch": batch, "seq_len": seq, "live_bytes": live, "bytes_per_token": per_token,
            "allocated_bytes": sum(allocated_bytes(layer) for layer in cache.layers), "layers": layers}
