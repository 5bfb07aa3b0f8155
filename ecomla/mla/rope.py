"""Rotary position embedding: the frequencies of every layer, built once per model, applied per layer.

The inverse frequencies come from transformers' own RoPE initialisers (default, linear, llama3, yarn), so
a source model's `rope_parameters` (theta, Llama-3 "llama3" scaling) are honoured exactly.
Layout is transformers' rotate-half: dim i pairs with dim i + d/2 and both use frequency inv_freq[i].

Which frequencies a layer uses (`layer_frequencies`):
- a kept GQA layer: the source's d_h/2 frequencies;
- an MLA layer: a fresh d_rope-dim RoPE built from the source's parameters (the paper; `rope_pairs=None`,
  `mla_rope_parameters` overrides them), or a subset of the source's own frequency pairs (`rope_pairs=[...]`,
  RoPE-aware init), frequencies unchanged.

`RotaryTables` (one per model, as DeepSeek's `freqs_cis`) holds every layer's [inv_freq | inv_freq] side by
side and turns positions into cos/sin for all layers in one pass; each layer gets views of its columns.
The frequencies are kept as float32 whatever the model's dtype: they are stored as their float32 bit
pattern (an int32 buffer), which `model.to(device)` moves and `model.to(dtype)` leaves alone.
"""

from __future__ import annotations

import torch
from torch import nn
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
    if rope_type == "default":
        theta = params["rope_theta"]
        # Same float32 formula as transformers' Llama, so kept layers reproduce the source bit for bit.
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq, 1.0
    # A throw-away config whose head_dim is the rotary width: lets transformers compute the frequencies.
    cfg = LlamaConfig(
        hidden_size=dim, num_attention_heads=1, head_dim=dim, num_hidden_layers=1,
        max_position_embeddings=max_position_embeddings, rope_parameters=params,
    )
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    return inv_freq.float(), float(scaling)


def layer_frequencies(config, layer_idx: int) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention scaling) of one layer of an EcoMLAConfig (see the module docstring)."""
    spec, max_pos = config.mla_spec(layer_idx), config.max_position_embeddings
    if spec is None:
        return rope_inv_freq(config.rope_parameters, config.head_dim, max_pos)
    if spec.rope_pairs is None:
        return rope_inv_freq(config.mla_rope_parameters or config.rope_parameters, spec.qk_rope_head_dim, max_pos)
    inv_freq, scaling = rope_inv_freq(config.rope_parameters, config.head_dim, max_pos)
    return inv_freq[torch.tensor(spec.rope_pairs)], scaling


class RotaryTables(nn.Module):
    """cos/sin of every layer for given positions, computed once per forward and shared by all layers."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.spans: list[tuple[int, int]] = []  # layer -> its columns [lo, hi) of the table
        width = 0
        for i in range(config.num_hidden_layers):
            spec = config.mla_spec(i)
            n = config.head_dim if spec is None else spec.qk_rope_head_dim  # rotary dims of the layer
            self.spans.append((width, width + n))
            width += n
        # [2, width] float32 bits: row 0 = per-column frequency, row 1 = per-column attention scaling
        self.register_buffer("table", torch.empty(2, width, dtype=torch.int32, device="cpu"), persistent=False)
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """(Re)compute the table in place, on the buffer's device (after a meta-device build or a load)."""
        freqs, scales = [], []
        with torch.device("cpu"):  # real values even while the model is being built on the meta device
            for i in range(self.config.num_hidden_layers):
                inv_freq, scaling = layer_frequencies(self.config, i)
                freqs.append(torch.cat([inv_freq, inv_freq]))
                scales.append(torch.full((2 * len(inv_freq),), scaling, dtype=torch.float32))
            table = torch.stack([torch.cat(freqs), torch.cat(scales)]).view(torch.int32)
        self.table = table.to(self.table.device if self.table.device.type != "meta" else "cpu")

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (cos, sin), each [B, T, 2 * n_freq], from integer positions [B, T]."""
        freq, scale = self.table.view(torch.float32)  # [width] each
        emb = position_ids[..., None].float() * freq  # [B, T, width]
        cos, sin = (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)
        return [(cos[..., lo:hi], sin[..., lo:hi]) for lo, hi in self.spans]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate x [B, T, ..., d] by rope = (cos, sin) [B, T, d]; middle dims (heads) broadcast."""
    cos, sin = rope
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + rotate_half(x) * sin
