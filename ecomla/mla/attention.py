"""MLA attention (decompressed and absorbed paths in one module) and the kept GQA attention.

Notation: B batch, T new tokens, S cached + new tokens, D hidden, H query heads, G KV heads,
r_q / r_kv ranks, d_nope / d_rope / d_v per-head dims, W = r_kv + d_rope (one latent cache row).

MLA, per token:
    c_q   = q_a_proj(x)                      [B, T, r_q]   (q_proj(x) directly when r_q is None)
    q     = q_b_proj(norm(c_q))              [B, T, H, d_nope + d_rope]
    [c_kv | k_rope] = kv_a_proj_with_mqa(x)  [B, T, r_kv + d_rope]; k_rope is shared by all heads
    cache <- [norm(c_kv) | rope(k_rope)]     [B, S, W]
Decompressed (training, prefill): k_nope, v = kv_b_proj(c_kv) per head; SDPA over H heads.
Absorbed (decode): W_UK folded into the query (q_lat = q_nope W_UK), heads folded into query rows, so
attention is one SDPA call with a single shared key/value head over the latent cache; W_UV after.
Without autograd, when r_kv is smaller than d_nope (resp. d_v), W_UK is also pre-multiplied into the query
up-projection (resp. W_UV into o_proj), and the query down-projection into that when the product is smaller
(no q latent norm): fewer weight bytes and fewer ops per step (`DecodeFold`; at 8x on SmolLM2 a layer's
attention weights read per step shrink from 884,736 to 359,424).
The path is an explicit argument (`mla_path`) or, when None, chosen by query length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from ..kernels import mla_decode
from .config import EcoMLAConfig, MLASpec
from .rope import apply_rope, cos_sin, rope_inv_freq

PATHS = ("absorbed", "decompressed")


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


class _RopeBuffers:
    """`model.to(torch.bfloat16)` would round the rotary frequencies; recompute them in float32 instead."""

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and self.inv_freq.device.type != "meta":
            self.reset_rope()
        return out


def _version(t: torch.Tensor) -> int | None:
    """In-place version counter; None for inference tensors, which carry none (after changing such weights in
    place, drop the stale fold by hand: `attn.__dict__.pop("_decode_fold", None)`)."""
    return None if t.is_inference() else t._version


class DecodeFold:
    """Inference-only weights of one MLA layer with the up-projections pre-multiplied (no autograd).

    q:  [H * a + H * d_rope, D or r_q] (+ bias) -> [q_first | q_rope] in one GEMM, where q_first is
        q_lat (a = r_kv; rows h * r_kv + c are W_UK[h]^T applied to head h's nope rows) when `absorbs_uk`,
        else q_nope (a = d_nope, rows unchanged). With `takes_x` the query down-projection q_a_proj is
        multiplied in too, so the GEMM reads the hidden state. Each part is folded only where it makes the
        weights smaller: W_UK when r_kv < d_nope, q_a_proj when there is no q latent norm and
        rows * D < r_q * (D + rows). q_w is None when neither applies.
    o:  [D, H * r_kv] (+ bias): o_proj applied after W_UV[h] -> the layer output straight from o_lat.
        None when r_kv >= d_v.
    Computed in float32 (float64 for a float64 model) and cast back to the weights' dtype.
    `key` identifies the source weights (storage and in-place version), so training or `.to()` rebuilds it.
    """

    def __init__(self, attn: "MLAAttention", key: tuple):
        s, H = attn.spec, attn.num_heads
        r, dn, dr = s.kv_lora_rank, s.qk_nope_head_dim, s.qk_rope_head_dim
        acc = torch.promote_types(attn.kv_b_proj.weight.dtype, torch.float32)  # fp32, or fp64 for a float64 model
        w_uk, w_uv = (w.to(acc) for w in attn.up_weights())  # [H, d_nope, r_kv], [H, d_v, r_kv]
        self.key, self.q_w, self.q_b, self.o_w, self.o_b = key, None, None, None, None
        self.absorbs_uk, self.takes_x, folds_o = self.plan(attn)
        up = attn.q_proj if s.q_lora_rank is None else attn.q_b_proj
        if self.absorbs_uk or self.takes_x:
            w = up.weight.to(acc).view(H, dn + dr, -1)
            b = up.bias.to(acc).view(H, dn + dr) if up.bias is not None else None
            if self.absorbs_uk:
                first = torch.einsum("hdc,hdi->hci", w_uk, w[:, :dn])
                first_b = None if b is None else torch.einsum("hdc,hd->hc", w_uk, b[:, :dn])
            else:
                first, first_b = w[:, :dn], None if b is None else b[:, :dn]
            q_w = torch.cat([first.reshape(-1, w.shape[-1]), w[:, dn:].reshape(H * dr, -1)])
            q_b = None if b is None else torch.cat([first_b.reshape(-1), b[:, dn:].reshape(-1)])
            if self.takes_x:  # c_q = x W_a^T (+ b_a)  =>  q = x (W_q W_a)^T + (W_q b_a + b_q)
                w_a = attn.q_a_proj.weight.to(acc)
                if attn.q_a_proj.bias is not None:
                    extra = q_w @ attn.q_a_proj.bias.to(acc)
                    q_b = extra if q_b is None else q_b + extra
                q_w = q_w @ w_a
            self.q_w = q_w.to(up.weight.dtype)
            self.q_b = None if q_b is None else q_b.to(up.weight.dtype)
        if folds_o:
            w_o = attn.o_proj.weight.to(acc)
            self.o_w = torch.einsum("dhv,hvc->dhc", w_o.view(w_o.shape[0], H, -1), w_uv).reshape(w_o.shape[0], H * r)
            self.o_w = self.o_w.to(attn.o_proj.weight.dtype)
            bias = attn.o_proj.bias.to(acc) if attn.o_proj.bias is not None else None
            if attn.kv_b_proj.bias is not None:  # the v bias passes through o_proj as a constant
                b_v = attn.kv_b_proj.bias.to(acc).view(H, -1)[:, dn:].reshape(-1)
                bias = w_o @ b_v if bias is None else bias + w_o @ b_v
            self.o_b = None if bias is None else bias.to(attn.o_proj.weight.dtype)

    @staticmethod
    def plan(attn: "MLAAttention") -> tuple[bool, bool, bool]:
        """(absorbs_uk, takes_x, folds_o): which folds make this layer's decode weights smaller."""
        s, H = attn.spec, attn.num_heads
        absorbs_uk = s.kv_lora_rank < s.qk_nope_head_dim
        rows = H * (s.kv_lora_rank if absorbs_uk else s.qk_nope_head_dim) + H * s.qk_rope_head_dim
        takes_x = False
        if s.q_lora_rank is not None and attn.q_a_layernorm is None:
            D = attn.q_a_proj.in_features
            takes_x = rows * D < s.q_lora_rank * (D + rows)
        return absorbs_uk, takes_x, s.kv_lora_rank < s.v_head_dim

    def replaced(self, attn: "MLAAttention") -> list[nn.Module]:
        """The projections a folded decode step no longer reads."""
        out = []
        if self.q_w is not None:
            out.append(attn.q_proj if attn.spec.q_lora_rank is None else attn.q_b_proj)
        if self.takes_x:
            out.append(attn.q_a_proj)
        if self.absorbs_uk and self.o_w is not None:
            out.append(attn.kv_b_proj)
        if self.o_w is not None:
            out.append(attn.o_proj)
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q_w, self.q_b, self.o_w, self.o_b) if t is not None)


class MLAAttention(_RopeBuffers, nn.Module):
    decode_kernel = True  # use ecomla.kernels.mla_decode for single-token decode (set False per module to compare)

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
        self._rope_source = (config.rope_parameters, config.mla_rope_parameters, config.head_dim,
                             config.max_position_embeddings)
        self.register_buffer("inv_freq", torch.empty(spec.qk_rope_head_dim // 2), persistent=False)
        self.reset_rope()

    def reset_rope(self) -> None:
        """(Re)compute the rotary frequencies; needed after building the module on the meta device."""
        source_rope, mla_rope_params, head_dim, max_pos = self._rope_source
        s = self.spec
        with torch.device("cpu"):  # real values even when the module is being built on the meta device
            inv_freq, self.rope_scaling = self._mla_inv_freq(s, source_rope, mla_rope_params, head_dim, max_pos)
        self.inv_freq = inv_freq.to(self.inv_freq.device if self.inv_freq.device.type != "meta" else "cpu")

    @staticmethod
    def _mla_inv_freq(s, source_rope, mla_rope_params, head_dim, max_pos):
        if s.rope_pairs is None:
            return rope_inv_freq(mla_rope_params or source_rope, s.qk_rope_head_dim, max_pos)
        inv_freq, scaling = rope_inv_freq(source_rope, head_dim, max_pos)
        return inv_freq[torch.tensor(s.rope_pairs)], scaling

    # ---- projections ---------------------------------------------------------------------------
    def query(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        if self.spec.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            c_q = self.q_a_proj(x)
            if self.q_a_layernorm is not None:
                c_q = self.q_a_layernorm(c_q)
            q = self.q_b_proj(c_q)
        return q.view(B, T, self.num_heads, self.spec.qk_head_dim)  # [B, T, H, d_nope + d_rope]

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Cache rows [B, T, r_kv + d_rope] = [norm(c_kv) | rope(k_rope)]."""
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.spec.kv_lora_rank, self.spec.qk_rope_head_dim], -1)
        if self.kv_a_layernorm is not None:
            c_kv = self.kv_a_layernorm(c_kv)
        return torch.cat([c_kv, apply_rope(k_rope, cos, sin)], dim=-1)

    def up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, d_nope, r_kv] and W_UV [H, d_v, r_kv], views of kv_b_proj."""
        s = self.spec
        w = self.kv_b_proj.weight.view(self.num_heads, s.qk_nope_head_dim + s.v_head_dim, s.kv_lora_rank)
        return w[:, : s.qk_nope_head_dim], w[:, s.qk_nope_head_dim :]

    def decode_fold(self) -> DecodeFold | None:
        """The pre-multiplied decode weights (built on first use, rebuilt when a source weight changes), or
        None when no fold would make them smaller (see `DecodeFold.plan`)."""
        if not any(DecodeFold.plan(self)):
            return None
        s = self.spec
        up = self.q_proj if s.q_lora_rank is None else self.q_b_proj
        down = () if s.q_lora_rank is None else (self.q_a_proj.weight, self.q_a_proj.bias)
        sources = [t for t in (*down, up.weight, up.bias, self.kv_b_proj.weight, self.kv_b_proj.bias,
                               self.o_proj.weight, self.o_proj.bias) if t is not None]
        key = tuple((t.data_ptr(), _version(t), t.dtype, t.device) for t in sources)
        fold = self.__dict__.get("_decode_fold")
        if fold is None or fold.key != key:
            with torch.no_grad():
                fold = DecodeFold(self, key)
            self.__dict__["_decode_fold"] = fold  # a plain attribute: not a parameter, buffer or state-dict entry
        return fold

    # ---- forward -------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        mla_path: str | None = None,
        **kwargs,
    ) -> torch.Tensor:
        B, T, _ = hidden_states.shape
        s = self.spec
        if mla_path is None:
            mla_path = "absorbed" if (not self.training and T <= self.absorb_max_query_len) else "decompressed"
        if mla_path not in PATHS:
            raise ValueError(f"mla_path must be one of {PATHS}, got {mla_path!r}")
        fold = self.decode_fold() if (mla_path == "absorbed" and not torch.is_grad_enabled()) else None
        cos, sin = cos_sin(self.inv_freq, position_ids, self.rope_scaling, hidden_states.dtype)
        latent = self.latent(hidden_states, cos, sin)  # [B, T, W]
        if cache is not None:
            latent = cache.update(latent[:, None], latent[:, None, :, :0], self.layer_idx)[0][:, 0]  # [B, S, W]
        if fold is not None and fold.q_w is not None:
            first, q_rope = self._folded_query(hidden_states, fold)
            q_lat, q_nope = (first, None) if fold.absorbs_uk else (None, first)
        else:
            q_nope, q_rope = self.query(hidden_states).split([s.qk_nope_head_dim, s.qk_rope_head_dim], -1)
            q_lat = None
        q_rope = apply_rope(q_rope, cos, sin)
        if mla_path == "decompressed":
            out = self._decompressed(q_nope, q_rope, latent, attention_mask)
            return self.o_proj(out.reshape(B, T, self.num_heads * s.v_head_dim))
        o_lat = self._absorbed(q_nope, q_rope, latent, attention_mask, q_lat=q_lat)  # [B, T, H, r_kv]
        if fold is not None and fold.o_w is not None:
            return F.linear(o_lat.reshape(B, T, -1), fold.o_w, fold.o_b)
        return self.o_proj(self._latent_to_values(o_lat).reshape(B, T, self.num_heads * s.v_head_dim))

    def _folded_query(self, x: torch.Tensor, fold: DecodeFold) -> tuple[torch.Tensor, torch.Tensor]:
        """q_lat [B, T, H, r_kv] (or q_nope [B, T, H, d_nope]) and the un-rotated q_rope [B, T, H, d_rope]
        from one GEMM."""
        B, T, _ = x.shape
        s, H = self.spec, self.num_heads
        c = x
        if s.q_lora_rank is not None and not fold.takes_x:
            c = self.q_a_proj(x)
            if self.q_a_layernorm is not None:
                c = self.q_a_layernorm(c)
        first = s.kv_lora_rank if fold.absorbs_uk else s.qk_nope_head_dim
        q = F.linear(c, fold.q_w, fold.q_b)
        q_first, q_rope = q.split([H * first, H * s.qk_rope_head_dim], -1)
        return q_first.view(B, T, H, first), q_rope.view(B, T, H, s.qk_rope_head_dim)

    def _decompressed(self, q_nope, q_rope, latent, mask):
        s, H = self.spec, self.num_heads
        B, S, _ = latent.shape
        c_kv, k_rope = latent.split([s.kv_lora_rank, s.qk_rope_head_dim], -1)
        k_nope, v = self.kv_b_proj(c_kv).view(B, S, H, -1).split([s.qk_nope_head_dim, s.v_head_dim], -1)
        k = torch.cat([k_nope, k_rope[:, :, None].expand(B, S, H, s.qk_rope_head_dim)], dim=-1)  # [B, S, H, d_qk]
        q = torch.cat([q_nope, q_rope], dim=-1)  # [B, T, H, d_qk]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=s.scale
        )  # [B, H, T, d_v]
        return out.transpose(1, 2)  # [B, T, H, d_v]

    def _absorbed(self, q_nope, q_rope, latent, mask, q_lat=None):
        """o_lat [B, T, H, r_kv]: attention over the latent cache (values still in latent space)."""
        s, H = self.spec, self.num_heads
        B, T = q_rope.shape[:2]
        if q_lat is None:
            q_lat = torch.einsum("bthd,hdc->bthc", q_nope, self.up_weights()[0])  # [B, T, H, r_kv]
        # Decode fast path (ecomla/kernels/mla_decode.py): one token, no mask -> the Triton kernel on CUDA,
        # two fp32 GEMMs on CPU; None (e.g. CPU bf16) keeps the SDPA formulation below.
        fast = mla_decode.decode_fn(latent) if (T == 1 and mask is None and self.decode_kernel) else None
        if fast is not None:
            o_lat = fast(q_lat[:, 0], q_rope[:, 0], latent, s.scale)  # [B, H, r_kv]
        else:
            q_cat = torch.cat([q_lat, q_rope], dim=-1).reshape(B, 1, T * H, -1)  # heads folded into query rows
            if mask is not None:
                mask = mask.repeat_interleave(H, dim=2)  # [B, 1, T*H, S], row t*H + h
            kv = latent[:, None]  # [B, 1, S, W]: one key/value head shared by all query rows
            o_lat = F.scaled_dot_product_attention(
                q_cat, kv, kv[..., : s.kv_lora_rank], attn_mask=mask, scale=s.scale
            )  # [B, 1, T*H, r_kv]
        return o_lat.reshape(B, T, H, s.kv_lora_rank)

    def _latent_to_values(self, o_lat: torch.Tensor) -> torch.Tensor:
        """Per-head values [B, T, H, d_v] from o_lat [B, T, H, r_kv] through W_UV (plus the v bias)."""
        s, H = self.spec, self.num_heads
        out = torch.einsum("bthc,hvc->bthv", o_lat, self.up_weights()[1])
        if self.kv_b_proj.bias is not None:  # k bias shifts every score of a row equally; only v bias matters
            out = out + self.kv_b_proj.bias.view(H, -1)[:, s.qk_nope_head_dim :]
        return out


class GQAAttention(_RopeBuffers, nn.Module):
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
        self._rope_source = (config.rope_parameters, config.max_position_embeddings)
        self.register_buffer("inv_freq", torch.empty(d // 2), persistent=False)
        self.reset_rope()

    def reset_rope(self) -> None:
        with torch.device("cpu"):
            inv_freq, self.rope_scaling = rope_inv_freq(self._rope_source[0], self.head_dim, self._rope_source[1])
        self.inv_freq = inv_freq.to(self.inv_freq.device if self.inv_freq.device.type != "meta" else "cpu")

    def forward(self, hidden_states, position_ids, attention_mask=None, cache=None, **kwargs):
        B, T, _ = hidden_states.shape
        cos, sin = cos_sin(self.inv_freq, position_ids, self.rope_scaling, hidden_states.dtype)
        q = apply_rope(self.q_proj(hidden_states).view(B, T, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(hidden_states).view(B, T, self.num_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, d]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, G, S, d]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, scale=self.head_dim**-0.5, enable_gqa=self.num_heads != self.num_kv_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
