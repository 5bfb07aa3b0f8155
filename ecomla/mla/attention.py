"""MLA attention (decompressed and absorbed paths side by side in one forward) and the kept GQA attention.

Notation: B batch, T new tokens, S cached + new tokens, D hidden, H query heads, G KV heads,
r_q / r_kv ranks, d_nope / d_rope / d_v per-head dims, W = r_kv + d_rope (one latent cache row).

MLA, per token:
    c_q   = q_a_proj(x)                      [B, T, r_q]   (x itself when r_q is None: q_proj reads x)
    q     = q_b_proj(norm(c_q))              [B, T, H, d_nope + d_rope]
    [c_kv | k_rope] = kv_a_proj_with_mqa(x)  [B, T, r_kv + d_rope]; k_rope is shared by all heads
    cache <- [norm(c_kv) | rope(k_rope)]     [B, S, W], or its quantized byte rows (cache_bits 8 / 4, quant.py)
Decompressed (training, prefill): k_nope, v = kv_b_proj(c_kv) per head; SDPA over H heads.
Absorbed (decode): W_UK folded into the query (q_lat = q_nope W_UK), heads folded into query rows, so attention
is one call with a single shared key/value head over the latent cache; W_UV and o_proj after. Its weights are an
`AbsorbedWeights` (decode.py): views of the projections, or the pre-multiplied copies and decode kernel that
`model.prepare_for_decode()` sets once.
The path is the `mla_path` argument or, when None, a rule on the query length (`absorb_max_query_len`).
With a quantized cache (`latent_format`, set from config.cache_bits by `EcoMLAPreTrainedModel.set_cache_bits`) both
paths read the latent as the cache returns it; without a cache the same values come from `fake_quantize`
(straight-through gradients), so training, eval and prefill see what decoding sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .config import EcoMLAConfig, MLASpec
from .cache import append_latent
from .decode import AbsorbedWeights
from .quant import LatentFormat, fake_quantize
from .rope import apply_rope

PATHS = ("absorbed", "decompressed")
Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin) [B, T, d], from RotaryTables


def build_mask(attention_mask: torch.Tensor | None, q_len: int, past_len: int, window: int | None, device):
    """Boolean attention mask [B or 1, 1, T, S] (True = attend), or None when every key is visible.

    `attention_mask` is the usual 2-D padding mask over all S = past_len + q_len positions.
    Rows with no visible key (queries at left-padding positions) are opened up so SDPA never
    produces NaN; their outputs are never used.
    """
    total = past_len + q_len
    padded = attention_mask is not None and not bool(attention_mask[:, -total:].all())
    if q_len == 1 and not padded and window is None:
        return None
    q_pos = torch.arange(past_len, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask = mask & (k_pos > q_pos - window)
    mask = mask[None, None]
    if padded:
        if attention_mask.shape[-1] < total:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, need {total}")
        mask = mask & attention_mask[:, None, None, -total:].bool()
    return mask | ~mask.any(dim=-1, keepdim=True)


class MLAAttention(nn.Module):
    def __init__(self, config: EcoMLAConfig, layer_idx: int, spec: MLASpec):
        super().__init__()
        self.layer_idx, self.spec = layer_idx, spec
        self.num_heads = config.num_attention_heads
        self.absorb_max_query_len = config.absorb_max_query_len
        D, H, bias = config.hidden_size, config.num_attention_heads, config.qkv_bias
        r_q, r_kv = spec.q_lora_rank, spec.kv_lora_rank
        if r_q is None:
            self.q_proj = nn.Linear(D, H * spec.qk_head_dim, bias=bias)
        else:
            self.q_a_proj = nn.Linear(D, r_q, bias=False)
            self.q_a_layernorm = LlamaRMSNorm(r_q, eps=config.rms_norm_eps) if spec.latent_norm else None
            self.q_b_proj = nn.Linear(r_q, H * spec.qk_head_dim, bias=bias)
        self.kv_a_proj_with_mqa = nn.Linear(D, r_kv + spec.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = LlamaRMSNorm(r_kv, eps=config.rms_norm_eps) if spec.latent_norm else None
        self.kv_b_proj = nn.Linear(r_kv, H * (spec.qk_nope_head_dim + spec.v_head_dim), bias=bias)
        self.o_proj = nn.Linear(H * spec.v_head_dim, D, bias=config.o_bias)
        self.prepared: AbsorbedWeights | None = None  # set only by model.prepare_for_decode()
        # quantized cache rows (None: the latent in the model's dtype); set from config.cache_bits, changed only by
        # model.set_cache_bits()
        self.latent_format: LatentFormat | None = config.latent_format(layer_idx)

    # ---- projections ---------------------------------------------------------------------------
    @property
    def q_up_proj(self) -> nn.Linear:
        """The projection that produces per-head queries: q_b_proj, or q_proj for a full-rank query."""
        return self.q_proj if self.spec.q_lora_rank is None else self.q_b_proj

    def q_latent(self, x: torch.Tensor) -> torch.Tensor:
        """What q_up_proj reads: norm(q_a_proj(x)) [B, T, r_q], or x itself for a full-rank query."""
        if self.spec.q_lora_rank is None:
            return x
        c_q = self.q_a_proj(x)
        return c_q if self.q_a_layernorm is None else self.q_a_layernorm(c_q)

    def latent(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        """Cache rows [B, T, r_kv + d_rope] = [norm(c_kv) | rope(k_rope)]."""
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.spec.kv_lora_rank, self.spec.qk_rope_head_dim], -1)
        if self.kv_a_layernorm is not None:
            c_kv = self.kv_a_layernorm(c_kv)
        return torch.cat([c_kv, apply_rope(k_rope, rope)], dim=-1)

    def up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, d_nope, r_kv] and W_UV [H, d_v, r_kv], views of kv_b_proj."""
        s = self.spec
        w = self.kv_b_proj.weight.view(self.num_heads, s.qk_nope_head_dim + s.v_head_dim, s.kv_lora_rank)
        return w[:, : s.qk_nope_head_dim], w[:, s.qk_nope_head_dim :]

    # ---- forward -------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        rope: Rope,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        mla_path: str | None = None,
    ) -> torch.Tensor:
        B, T, _ = hidden_states.shape
        if mla_path is None:
            mla_path = "absorbed" if (not self.training and T <= self.absorb_max_query_len) else "decompressed"
        if mla_path not in PATHS:
            raise ValueError(f"mla_path must be one of {PATHS}, got {mla_path!r}")
        latent = self.latent(hidden_states, rope)  # [B, T, W]
        fmt = self.latent_format
        if cache is None:  # the values a cache of this format would return, without the bytes
            latent, fmt = fake_quantize(latent, fmt), None
        else:
            latent = append_latent(cache, self.layer_idx, latent if fmt is None else fmt.quantize(latent))  # [B, S, .]
        if mla_path == "decompressed":
            return self.decompressed(hidden_states, self.read(latent, fmt, hidden_states.dtype), rope, attention_mask)
        return self.absorbed(hidden_states, latent, fmt, rope, attention_mask)

    @staticmethod
    def read(rows: torch.Tensor, fmt: LatentFormat | None, dtype: torch.dtype) -> torch.Tensor:
        """The latent [B, S, W] from cached rows: dequantized when `fmt` says they are quantized."""
        return rows if fmt is None else fmt.dequantize(rows, dtype)

    def decompressed(self, x: torch.Tensor, latent: torch.Tensor, rope: Rope, mask) -> torch.Tensor:
        s, H = self.spec, self.num_heads
        (B, T, _), S = x.shape, latent.shape[1]
        q = self.q_up_proj(self.q_latent(x)).view(B, T, H, s.qk_head_dim)
        q_nope, q_rope = q.split([s.qk_nope_head_dim, s.qk_rope_head_dim], -1)
        q = torch.cat([q_nope, apply_rope(q_rope, rope)], dim=-1)  # [B, T, H, d_qk]
        c_kv, k_rope = latent.split([s.kv_lora_rank, s.qk_rope_head_dim], -1)
        k_nope, v = self.kv_b_proj(c_kv).view(B, S, H, -1).split([s.qk_nope_head_dim, s.v_head_dim], -1)
        k = torch.cat([k_nope, k_rope[:, :, None].expand(B, S, H, s.qk_rope_head_dim)], dim=-1)  # [B, S, H, d_qk]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=s.scale
        )  # [B, H, T, d_v]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * s.v_head_dim))

    def absorbed(self, x: torch.Tensor, rows: torch.Tensor, fmt: LatentFormat | None, rope: Rope, mask) -> torch.Tensor:
        s, H = self.spec, self.num_heads
        B, T, _ = x.shape
        w = self.prepared
        if w is None:
            w = AbsorbedWeights.plain(self)
        else:
            w.check(x)
        # query: q_first is q_lat [.., r_kv] when W_UK is folded into q_w, else q_nope [.., d_nope]
        q = F.linear(x if w.q_from_hidden else self.q_latent(x), w.q_w, w.q_b).view(B, T, H, -1)
        q_first, q_rope = q.split([q.shape[-1] - s.qk_rope_head_dim, s.qk_rope_head_dim], -1)
        q_lat = q_first if w.w_uk is None else torch.einsum("bthd,hdc->bthc", q_first, w.w_uk)  # [B, T, H, r_kv]
        q_rope = apply_rope(q_rope, rope)
        if T == 1 and w.kernel is not None:  # the decode kernel reads the rows as cached; a mask is per key row
            keys = None if mask is None else mask[:, 0, 0].expand(B, -1)  # [B, S]
            o_lat = w.kernel.fn(q_lat[:, 0], q_rope[:, 0], rows, s.scale, key_mask=keys, fmt=fmt)  # [B, H, r_kv]
        else:
            latent = self.read(rows, fmt, x.dtype)  # [B, S, W]
            q_cat = torch.cat([q_lat, q_rope], dim=-1).reshape(B, 1, T * H, -1)  # heads folded into query rows
            if mask is not None:
                mask = mask.repeat_interleave(H, dim=2)  # [B, 1, T*H, S], row t*H + h
            kv = latent[:, None]  # [B, 1, S, W]: one key/value head shared by all query rows
            o_lat = F.scaled_dot_product_attention(q_cat, kv, kv[..., : s.kv_lora_rank], attn_mask=mask,
                                                   scale=s.scale)  # [B, 1, T*H, r_kv]
        o = o_lat.reshape(B, T, H, s.kv_lora_rank)
        if w.w_uv is not None:  # per-head values [B, T, H, d_v]; the k bias shifts every score of a row equally
            o = torch.einsum("bthc,hvc->bthv", o, w.w_uv)
            o = o if w.v_bias is None else o + w.v_bias
        return F.linear(o.reshape(B, T, -1), w.o_w, w.o_b)


class GQAAttention(nn.Module):
    """A layer that stays ordinary grouped-query attention (hybrid models); weights keep HF Llama names."""

    def __init__(self, config: EcoMLAConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim,
        )
        D, H, G, d = config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(D, H * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(D, G * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(D, G * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(H * d, D, bias=config.o_bias)

    def qkv(self, hidden_states: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, T, d], k and v [B, G, T, d], rotary applied."""
        B, T, _ = hidden_states.shape
        q = apply_rope(self.q_proj(hidden_states).view(B, T, self.num_heads, self.head_dim), rope)
        k = apply_rope(self.k_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim), rope)
        v = self.v_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def probabilities(self, hidden_states: torch.Tensor, rope: Rope, attention_mask=None) -> torch.Tensor:
        """The attention weights [B, H, T, T] that forward's SDPA applies (no cache; calibration only)."""
        q, k, _ = self.qkv(hidden_states, rope)
        k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        s = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5  # [B, H, T, T]
        if attention_mask is not None:
            s = s.masked_fill(~attention_mask, float("-inf"))
        return s.softmax(-1)

    def forward(self, hidden_states, rope: Rope, attention_mask=None, cache=None, **kwargs):
        B, T, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states, rope)  # [B, heads, T, d]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, G, S, d]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, scale=self.head_dim**-0.5, enable_gqa=self.num_heads != self.num_kv_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
