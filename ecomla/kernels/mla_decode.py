"""Absorbed-MLA decode attention over the latent cache: a PyTorch formulation and the Triton kernel's entry.

Notation: B batch, H query heads, S cached tokens, r_kv latent rank, d_rope rotary dims,
W = r_kv + d_rope (one cache row = [c_kv | roped k_rope], shared by all heads).

For one new token per sequence, with W_UK already folded into the query (q_lat = q_nope W_UK):
    score[b, h, s] = scale * (q_lat[b, h] . c_kv[b, s] + q_rope[b, h] . k_rope[b, s])
    o_lat[b, h]    = softmax_s(score[b, h]) @ c_kv[b]                     -> [B, H, r_kv]
Heads of a sequence share the latent, so the heads act as rows of one matrix: per sequence that is two
GEMMs, [H, W] x [W, S] and [H, S] x [S, r_kv].

- `mla_decode_torch`: those two batched GEMMs with an fp32 softmax (without autograd: exp in place and the
  normalisation applied to the [B, H, r_kv] output). Exact in fp32 and the CPU decode path; for other dtypes it
  computes in fp32 (a copy of the cache), which is what a reference should do. A quantized cache (byte rows,
  `ecomla.mla.quant`) is dequantized a few sequences at a time into planes (`LatentFormat.dequantize_planes`: for
  4 bits the even and the odd elements apart, so no pass interleaves nibbles), and each GEMM becomes a sum over
  the planes: q[..., where] @ plane^T for the scores, p @ plane into o[..., where] for the output.
Both take a per-row key mask, so a left-padded batch decodes through the kernel too.
- `mla_decode_triton` (in `triton_mla.py`): the fused split-KV kernel for CUDA, imported lazily so the
  package works without triton.
Which one a model uses is chosen once, by `model.prepare_for_decode()` (`ecomla.mla.decode.pick_kernel`).

    from ecomla.kernels.mla_decode import mla_decode_torch
    o_lat = mla_decode_torch(q_lat, q_rope, latent, scale)   # [B, H, r_kv]
"""

from __future__ import annotations

import functools
import importlib.util

import torch

DEQUANT_CHUNK_BYTES = 8 << 20  # fp32 rows dequantized at once: held in the CPU's last-level cache


def mla_decode_torch(
    q_lat: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, scale: float,
    lengths: torch.Tensor | None = None, key_mask: torch.Tensor | None = None, fmt=None,
) -> torch.Tensor:
    """o_lat [B, H, r_kv] from q_lat [B, H, r_kv], q_rope [B, H, d_rope], latent [B, S, W] (or [B, 1, S, W]).

    `lengths` [B] (optional) = valid cached rows per sequence; rows at or past it are ignored.
    `key_mask` [B, S] bool (optional): False = a row this query must not see (left padding, a sliding window).
    `fmt` (optional): the cache holds quantized byte rows [B, S, row_bytes] of this format (`ecomla.mla.quant`);
    they are dequantized a few sequences at a time (`_chunks`), so the fp32 copy stays in the CPU's caches.
    """
    latent = _rows(latent)
    keep = _keep(latent, lengths, key_mask)
    if fmt is None:
        return _attend(q_lat, q_rope, [(slice(None), latent)], scale, keep)
    out = [_attend(q_lat[i], q_rope[i], fmt.dequantize_planes(latent[i]), scale, None if keep is None else keep[i])
           for i in _chunks(latent, fmt)]
    return torch.cat(out) if len(out) > 1 else out[0]


def _keep(latent: torch.Tensor, lengths, key_mask) -> torch.Tensor | None:
    """[B, S] bool: the rows each sequence may read, or None for all of them."""
    keep = None
    if lengths is not None:
        keep = torch.arange(latent.shape[1], device=latent.device)[None, :] < lengths.to(latent.device)[:, None]
    if key_mask is not None:
        keep = key_mask if keep is None else keep & key_mask
    return keep


def _chunks(latent: torch.Tensor, fmt) -> list[slice]:
    """Slices of the batch whose dequantized fp32 rows take at most DEQUANT_CHUNK_BYTES (at least one sequence)."""
    B, S = latent.shape[:2]
    per_seq = S * (fmt.r_kv + fmt.d_rope) * 4
    step = max(1, DEQUANT_CHUNK_BYTES // max(per_seq, 1))
    return [slice(i, min(B, i + step)) for i in range(0, B, step)]


def _attend(q_lat, q_rope, planes: list[tuple[slice, torch.Tensor]], scale: float, keep) -> torch.Tensor:
    """The two GEMMs with an fp32 softmax over the latent [B, S, W] given as planes (where, values [B, S, m]) with
    latent[..., where] == values: the whole latent once, or a dequantized cache's planes; keep [B, S] bool or None."""
    r_kv, out_dtype = q_lat.shape[-1], q_lat.dtype
    q = torch.cat([q_lat, q_rope], dim=-1).float() * scale  # [B, H, W]
    planes = [(where, x.float()) for where, x in planes]  # a half-precision cache is read in fp32
    scores = None
    for where, x in planes:  # scores = sum over planes of q[..., where] @ x^T
        part = q[..., where].contiguous()  # [B, H, m] (a strided one sends baddbmm_ down a per-batch loop)
        scores = (torch.bmm(part, x.transpose(1, 2)) if scores is None
                  else scores.baddbmm_(part, x.transpose(1, 2)))  # [B, H, S]
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
    if torch.is_grad_enabled():
        p = torch.softmax(scores, dim=-1)
    else:  # exponentiate in place and normalise the [B, H, r_kv] result instead of the [B, H, S] weights
        p = scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()  # (one pass less, no separate softmax output)
    o = _gather_out(p, planes, r_kv)  # [B, H, r_kv]
    return (o if torch.is_grad_enabled() else o.div_(p.sum(dim=-1, keepdim=True))).to(out_dtype)


def _gather_out(p: torch.Tensor, planes, r_kv: int) -> torch.Tensor:
    """o_lat [B, H, r_kv] = p @ c_kv, from the planes that hold c_kv elements (one GEMM for a whole latent)."""
    parts = [(where, x) for where, x in planes if (where.start or 0) < r_kv]
    if len(parts) == 1 and parts[0][0] == slice(None):
        return torch.bmm(p, parts[0][1][..., :r_kv])
    o = p.new_empty(*p.shape[:-1], r_kv)
    for where, x in parts:  # every c_kv element is in exactly one of them
        o[..., where] = torch.bmm(p, x)
    return o


def _rows(latent: torch.Tensor) -> torch.Tensor:
    """Accept the cache's [B, 1, S, W] view or [B, S, W]; return [B, S, W] (a view)."""
    if latent.dim() == 4:
        if latent.shape[1] != 1:
            raise ValueError(f"latent cache view must be [B, 1, S, W], got {tuple(latent.shape)}")
        latent = latent[:, 0]
    if latent.dim() != 3:
        raise ValueError(f"latent must be [B, S, W] or [B, 1, S, W], got {tuple(latent.shape)}")
    return latent


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when triton can be imported (checked once; importing it is deferred to the first CUDA call)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        from . import triton_mla  # noqa: F401
    except Exception:  # a broken triton install must not break decoding; the PyTorch path remains
        return False
    return True


def mla_decode_triton(q_lat, q_rope, latent, scale, lengths=None, key_mask=None, fmt=None,
                      num_splits=None) -> torch.Tensor:
    """The fused Triton split-KV kernel (see `triton_mla.py`); same contract as `mla_decode_torch`."""
    from .triton_mla import mla_decode

    return mla_decode(q_lat, q_rope, _rows(latent), scale, lengths=lengths, key_mask=key_mask, fmt=fmt,
                      num_splits=num_splits)
