"""The fair GQA decode baselines (runs `gqa-fair`, `gqa-fair-sdpa`): the care the MLA path gets, given to the source.

    ecomla bench out/smollm2-8x --contexts 4k --batches 8 --runs absorbed,gqa-fair,gqa-fair-sdpa,gqa-static

Notation: B batch, T new tokens, S cached tokens, H query heads, G KV heads, n_rep = H / G, d_h head dim.

- `PreallocKVLayer`: K/V [B, G, max_len, d_h] allocated once; a step writes its rows in place (no torch.cat).
- `packed_gqa_attention`: for one new token, the n_rep query heads that share a KV head become n_rep query
  rows of that head (q [B, H, 1, d_h] -> [B, G, n_rep, d_h]; head h uses KV head h // n_rep, as in
  repeat_kv), so attention reads K/V once with no repeat_kv copy and no mask. That is transformers' own
  `pack_gqa` layout, and the GQA twin of folding MLA heads into query rows. On CPU float32 it runs as two
  GEMMs with an fp32 softmax, on other devices as one SDPA call: the rule of the MLA decode kernel
  (`ecomla.mla.decode.pick_kernel`). Which of packed GEMMs and packed SDPA is faster depends on the CPU
  (docs/BENCH.md), so `gqa-fair-sdpa` keeps the packed layout with SDPA on every device.
  Prefill (T > 1, empty cache) is causal SDPA with enable_gqa. Batches must be unpadded: transformers
  builds no mask for a custom attention function.
The attention functions reach transformers' AttentionInterface through `register()`, which the bench calls when
a run uses them (`runs.attention_implementation`), never at import.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer

PACKED_GQA = "ecomla_packed_gqa"
PACKED_GQA_SDPA = "ecomla_packed_gqa_sdpa"


class PreallocKVLayer(DynamicLayer):
    """K/V [B, G, max_len, d_h] allocated once; `update` writes rows in place and returns views [B, G, S, d_h]."""

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len = max_len

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, G, _, d = key_states.shape
        self.device = key_states.device
        self._k = key_states.new_empty((B, G, self.max_len, d))
        self._v = value_states.new_empty((B, G, self.max_len, value_states.shape[-1]))
        self.keys, self.values = self._k[..., :0, :], self._v[..., :0, :]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        seen, new = self.keys.shape[-2], key_states.shape[-2]
        if seen + new > self.max_len:
            raise ValueError(f"PreallocKVLayer holds {self.max_len} tokens; {seen + new} requested")
        self._k[..., seen : seen + new, :] = key_states
        self._v[..., seen : seen + new, :] = value_states
        self.keys, self.values = self._k[..., : seen + new, :], self._v[..., : seen + new, :]
        return self.keys, self.values

    def allocated_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()


def prealloc_cache(model, batch: int, max_len: int, dtype: torch.dtype, device) -> Cache:
    return Cache(layers=[PreallocKVLayer(max_len) for _ in range(model.config.num_hidden_layers)])


def uses_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    """The device rule of `gqa-fair`: two GEMMs on CPU float32, SDPA elsewhere."""
    return device.type == "cpu" and dtype == torch.float32


def packed_gqa_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """A transformers attention function: query [B, H, T, d_h], key/value [B, G, S, d_h] -> ([B, T, H, d_h], None)."""
    return _packed(query, key, value, scaling, uses_gemm(query.device, query.dtype))


def packed_gqa_sdpa_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """`packed_gqa_attention` with SDPA on every device (`gqa-fair-sdpa`)."""
    return _packed(query, key, value, scaling, gemm=False)


def _packed(query, key, value, scaling, gemm: bool):
    B, H, T, d = query.shape
    G = key.shape[1]
    if T > 1:
        if key.shape[2] != T:
            raise ValueError("packed_gqa_attention prefills an empty cache only (the benchmark's case)")
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2), None
    q = query.view(B, G, H // G, d)  # [B, G, n_rep, d_h]: query heads of a group as rows
    if gemm:
        scale = scaling if scaling is not None else d**-0.5
        scores = torch.matmul(q * scale, key.transpose(-1, -2))  # [B, G, n_rep, S]
        if torch.is_grad_enabled():
            out = torch.matmul(torch.softmax(scores, dim=-1), value)  # [B, G, n_rep, d_h]
        else:  # the MLA CPU kernel's inference form (mla_decode_torch): exp in place, normalise the output
            p = scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
            out = torch.matmul(p, value).div_(p.sum(dim=-1, keepdim=True))
    else:
        out = F.scaled_dot_product_attention(q, key, value, scale=scaling)
    return out.reshape(B, H, 1, d).transpose(1, 2), None  # [B, 1, H, d_h]


FUNCTIONS = {PACKED_GQA: packed_gqa_attention, PACKED_GQA_SDPA: packed_gqa_sdpa_attention}


def register() -> None:
    """Make the packed attention functions known to transformers (what `set_attn_implementation` looks up)."""
    for name, fn in FUNCTIONS.items():
        AttentionInterface.register(name, fn)
