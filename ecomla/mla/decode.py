"""Decode preparation: an explicit, one-time transform of an MLA model used for inference.

    model.prepare_for_decode()      # fold the weights, pick the kernel, eval mode (EcoMLAPreTrainedModel)
    out = model.generate(...)       # absorbed decode over the latent cache
    model.train()                   # training drops the preparation again

Notation: B batch, T new tokens, D hidden, H heads, r_q / r_kv ranks, d_nope / d_rope / d_v per-head dims.

The absorbed path (attention.py) reads its weights from an `AbsorbedWeights`:
- unprepared (`AbsorbedWeights.plain`): views of the layer's own projections; W_UK is applied to the query
  and W_UV to the output per head (einsums). Autograd flows through, nothing is copied.
- prepared (`AbsorbedWeights.folded`, made here): pre-multiplied copies, each fold taken only where it makes
  the weights a step reads smaller:
    W_UK into the query up-projection when r_kv < d_nope,
    q_a_proj into that when there is no q latent norm and rows * D < r_q * (D + rows),
    W_UV (and the v bias) into o_proj when r_kv < d_v.
  Computed in float32 (float64 for a float64 model), stored in the weights' dtype, plus the decode kernel
  for this device and dtype (`pick_kernel`).
A prepared layer refuses to run with autograd on, or after the model was moved or cast (prepare again).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..kernels.mla_decode import mla_decode_torch, mla_decode_triton, triton_available

KERNELS = ("auto", "sdpa", "torch-gemm", "triton")


@dataclass(frozen=True)
class DecodeKernel:
    """Single-token attention over the latent cache: fn(q_lat [B,H,r_kv], q_rope [B,H,d_rope], latent, scale)."""

    name: str
    fn: Callable


def pick_kernel(device: torch.device, dtype: torch.dtype, choice: str = "auto") -> DecodeKernel | None:
    """The decode kernel for weights on `device` in `dtype`; None keeps the SDPA formulation.

    auto: the Triton kernel on CUDA (when triton imports), two fp32 GEMMs on CPU float32, else SDPA (CPU half
    precision, where CPU GEMMs would round the scores)."""
    if choice not in KERNELS:
        raise ValueError(f"decode kernel must be one of {KERNELS}, got {choice!r}")
    if choice == "auto":
        if device.type == "cuda" and triton_available():
            choice = "triton"
        elif device.type == "cpu" and dtype == torch.float32:
            choice = "torch-gemm"
        else:
            choice = "sdpa"
    if choice == "triton":
        return DecodeKernel("triton", mla_decode_triton)
    return DecodeKernel("torch-gemm", mla_decode_torch) if choice == "torch-gemm" else None


@dataclass
class AbsorbedWeights:
    """What the absorbed path of one MLA layer multiplies by. a = r_kv when W_UK is folded into q_w, else d_nope."""

    q_from_hidden: bool  # q_w reads the hidden state x (q_a_proj folded in), not the q latent
    q_w: torch.Tensor  # [H * (a + d_rope), D or r_q]: per head [q_first | q_rope]
    q_b: torch.Tensor | None
    w_uk: torch.Tensor | None  # [H, d_nope, r_kv] applied after q_w; None: folded into q_w
    w_uv: torch.Tensor | None  # [H, d_v, r_kv] applied before o_w; None: folded into o_w
    v_bias: torch.Tensor | None  # [H, d_v], with w_uv
    o_w: torch.Tensor  # [D, H * d_v] (o_proj), or [D, H * r_kv] with W_UV folded in
    o_b: torch.Tensor | None
    kernel: DecodeKernel | None = None  # None: the SDPA formulation
    replaced: tuple[str, ...] = ()  # projections a prepared step no longer reads
    nbytes: int = 0  # bytes of the folded copies (views of the layer's own weights count nothing)

    @classmethod
    def plain(cls, attn) -> "AbsorbedWeights":
        """Views of the layer's projections (no copy, autograd intact)."""
        w_uk, w_uv = attn.up_weights()
        v_bias = None if attn.kv_b_proj.bias is None else attn.kv_b_proj.bias.view(attn.num_heads, -1)[
            :, attn.spec.qk_nope_head_dim :]
        up = attn.q_up_proj
        return cls(False, up.weight, up.bias, w_uk, w_uv, v_bias, attn.o_proj.weight, attn.o_proj.bias)

    def check(self, x: torch.Tensor) -> None:
        """Refuse what a prepared layer cannot do: gradients, or weights left behind by `model.to(...)`."""
        if torch.is_grad_enabled():
            raise RuntimeError("this model was prepared for decoding (ecomla.prepare_for_decode), whose folded "
                               "weights carry no gradient: run it under torch.no_grad(), or call model.train() "
                               "(which drops the preparation) before training")
        if (self.o_w.device, self.o_w.dtype) != (x.device, x.dtype):
            raise RuntimeError(f"this model was prepared for decoding on {self.o_w.device} in {self.o_w.dtype} but "
                               f"runs on {x.device} in {x.dtype}: call ecomla.prepare_for_decode(model) again "
                               "after moving or casting it")


def fold_plan(attn) -> tuple[bool, bool, bool]:
    """(fold W_UK into the query, fold q_a_proj into the query, fold W_UV into o_proj): each only where it makes
    the weights a decode step reads smaller."""
    s, H = attn.spec, attn.num_heads
    absorbs_uk = s.kv_lora_rank < s.qk_nope_head_dim
    rows = H * ((s.kv_lora_rank if absorbs_uk else s.qk_nope_head_dim) + s.qk_rope_head_dim)
    takes_x = False
    if s.q_lora_rank is not None and attn.q_a_layernorm is None:
        D = attn.q_a_proj.in_features
        takes_x = rows * D < s.q_lora_rank * (D + rows)
    return absorbs_uk, takes_x, s.kv_lora_rank < s.v_head_dim


@torch.no_grad()
def folded(attn, kernel: DecodeKernel | None) -> AbsorbedWeights:
    """The prepared weights of one MLA layer (see the module docstring)."""
    s, H = attn.spec, attn.num_heads
    dn, dr = s.qk_nope_head_dim, s.qk_rope_head_dim
    absorbs_uk, takes_x, folds_o = fold_plan(attn)
    w = AbsorbedWeights.plain(attn)
    w.kernel = kernel
    up = attn.q_up_proj
    dtype, acc = up.weight.dtype, torch.promote_types(up.weight.dtype, torch.float32)
    replaced = []
    if absorbs_uk or takes_x:
        q_w = up.weight.to(acc).view(H, dn + dr, -1)  # [H, d_nope + d_rope, in]
        q_b = None if up.bias is None else up.bias.to(acc).view(H, dn + dr)
        if absorbs_uk:  # rows of head h: W_UK[h]^T applied to its nope rows -> [r_kv | d_rope]
            w_uk = w.w_uk.to(acc)
            q_w = torch.cat([torch.einsum("hdc,hdi->hci", w_uk, q_w[:, :dn]), q_w[:, dn:]], dim=1)
            if q_b is not None:
                q_b = torch.cat([torch.einsum("hdc,hd->hc", w_uk, q_b[:, :dn]), q_b[:, dn:]], dim=1)
            w.w_uk = None
        q_w = q_w.reshape(-1, q_w.shape[-1])
        q_b = None if q_b is None else q_b.reshape(-1)
        replaced.append("q_up_proj")
        if takes_x:  # c_q = x W_a^T (+ b_a)  =>  q = x (W_q W_a)^T + (W_q b_a + b_q)
            if attn.q_a_proj.bias is not None:
                extra = q_w @ attn.q_a_proj.bias.to(acc)
                q_b = extra if q_b is None else q_b + extra
            q_w = q_w @ attn.q_a_proj.weight.to(acc)
            replaced.append("q_a_proj")
        w.q_from_hidden, w.q_w, w.q_b = takes_x, q_w.to(dtype), None if q_b is None else q_b.to(dtype)
    if folds_o:  # o = sum_h W_O[:, h] (W_UV[h] o_lat[h] + b_v[h]) + b_O
        w_o = attn.o_proj.weight.to(acc)
        o_w = torch.einsum("dhv,hvc->dhc", w_o.view(w_o.shape[0], H, -1), w.w_uv.to(acc))
        o_b = None if attn.o_proj.bias is None else attn.o_proj.bias.to(acc)
        if w.v_bias is not None:  # the v bias passes through o_proj as a constant
            extra = w_o @ w.v_bias.to(acc).reshape(-1)
            o_b = extra if o_b is None else o_b + extra
        w.o_w, w.o_b = o_w.reshape(w_o.shape[0], -1).to(dtype), None if o_b is None else o_b.to(dtype)
        w.w_uv = w.v_bias = None
        replaced.append("o_proj")
    if absorbs_uk and folds_o:
        replaced.append("kv_b_proj")  # neither half of W_UKV is read any more
    w.replaced = tuple(replaced)
    w.nbytes = sum(t.numel() * t.element_size() for t in (w.q_w, w.q_b, w.o_w, w.o_b)
                   if t is not None and not any(t is p for p in attn.parameters()))
    return w
