"""Rotary position embedding for kept GQA layers and for the decoupled rotary dims of MLA layers.

The inverse frequencies come from transformers' own RoPE initialisers (default, linear, llama3, yarn), so
a source model's `rope_parameters` (theta, Llama-3 "llama3" scaling) are honoured exactly.
Layout is transformers' rotate-half: dim i pairs with dim i + d/2 and both use frequency inv_freq[i].

An MLA layer's rotary dims use either
- a fresh d_rope-dim RoPE built from the source's parameters (the paper; `rope_pairs=None`), or
- a subset of the source's own frequency pairs (`rope_pairs=[...]`, RoPE-aware init), frequencies unchanged.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_inv_freq(rope_parameters: dict, dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2], attention_scaling) for a `dim`-wide rotary block under `rope_parameters`."""
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"RoPE type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)}); "
            "its frequencies change with sequence length, which a cached latent cannot follow"
        )
    params = {k: v for k, v in rope_parameters.items() if k != "type"}
    params["rope_type"] = rope_type
    # A throw-away config whose head_dim is the rotary width: lets transformers compute the frequencies.
    cfg = LlamaConfig(
        hidden_size=dim, num_attention_heads=1, head_dim=dim, num_hidden_layers=1,
        max_position_embeddings=max_position_embeddings, rope_parameters=params,
    )
    if rope_type == "default":
        theta = params["rope_theta"]
        # Same float32 formula as transformers' Llama, so kept layers reproduce the source bit for bit.
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq, 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    return inv_freq.float(), float(scaling)


def cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, scaling: float, dtype: torch.dtype):
    """cos, sin of shape [B, T, 2*len(inv_freq)] for integer positions [B, T] (rotate-half layout)."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device, torch.float32)  # [B, T, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, ..., d] by cos/sin [B, T, d]; middle dims (heads) broadcast."""
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + rotate_half(x) * sin
