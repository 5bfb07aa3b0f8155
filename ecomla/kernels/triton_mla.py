"""Triton split-KV decode kernel for absorbed MLA over the latent cache (imported lazily; needs triton).

Notation: B batch, H query heads, S cached tokens, r_kv latent rank, d_rope rotary dims, W = r_kv + d_rope.

    o_lat = mla_decode(q_lat [B, H, r_kv], q_rope [B, H, d_rope], latent [B, S, W], scale)   # [B, H, r_kv]
    o_lat = mla_decode(q_lat, q_rope, rows [B, S, row_bytes] uint8, scale, key_mask=keep, fmt=fmt)

Design (the grouped decode kernel of LightLLM/SGLang/vLLM, specialised to a latent with a separate rope part):
- Stage 1, grid (B, ceil(H / BLOCK_H), NUM_SPLITS): a program takes BLOCK_H heads of one sequence and one
  contiguous slice of its cached rows. The heads share the latent, so scores are tensor-core `tl.dot`s of
  a [BLOCK_H, .] query block with [BLOCK_N, .] row tiles, and the output is `tl.dot(p, c_kv tile)`.
  Online softmax in fp32 (exp2 domain); each split stores its normalised partial output and its
  log-sum-exp.
- The row is loaded as two masked tiles, c_kv [BLOCK_N, BLOCK_C] and k_rope [BLOCK_N, BLOCK_R] with
  BLOCK_C = next_pow2(r_kv) and BLOCK_R = next_pow2(d_rope) (both >= 16 for tl.dot). Any r_kv and d_rope
  work; r_kv + d_rope is never padded to one power of two (96 = 64 + 32 stays 64 + 32, not 128), and masked
  columns are never fetched beyond the row's own bytes.
- A quantized cache (`fmt`, ecomla.mla.quant: byte rows [fp16 scales, zeros (and k_rope) | c_kv codes | k_rope
  codes]) is read through two views of the same buffer, bytes and fp16, and dequantized in registers
  (code * scale + zero, fp32, then the query's dtype for `tl.dot`): the bytes a step reads are the row bytes. The [BLOCK_N, BLOCK_C] tile of
  4-bit codes loads each byte for both of its nibbles (adjacent lanes, one cache line).
- `key_mask` [B, S] (left padding, a sliding window) masks rows per sequence; a tile whose rows are all masked adds
  nothing (its running max stays -inf and is not used as an exponent offset).
- Stage 2, grid (B, H): merges the splits by their log-sum-exp.
- Splits are chosen so that B * head_blocks * splits fills the GPU (about 2 programs per SM) while each
  split keeps >= MIN_ROWS_PER_SPLIT rows; `num_splits=` overrides (tests use it to cover empty splits).

Runs under Triton's CPU interpreter (TRITON_INTERPRET=1 set before importing triton) on CPU tensors in
float32/float16; the interpreter does not support bfloat16 `tl.dot` (triton-lang/triton#11584), so bfloat16
is checked on a GPU only (tests/test_kernel.py).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MIN_ROWS_PER_SPLIT = 256
MAX_SPLITS = 64
LOG2E = 1.4426950408889634


@triton.jit
def _dequantized(row, row16, offs, mask, BITS: tl.constexpr, GROUP: tl.constexpr, CODES_OFF: tl.constexpr,
                 HALF_OFF: tl.constexpr):
    """One part of a quantized row as fp32 [BLOCK_N, len(offs)]: fp16 values at fp16 element HALF_OFF (BITS 16), or
    BITS-bit codes at byte CODES_OFF with (scale, zero) fp16 pairs per GROUP values from HALF_OFF, read back as
    code * scale + zero (ecomla.mla.quant.dequantize_groups)."""
    if BITS == 16:
        x = tl.load(row16 + HALF_OFF + offs[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        if BITS == 4:  # two codes per byte, element 2i in the low nibble
            byte = tl.load(row + CODES_OFF + offs[None, :] // 2, mask=mask, other=0).to(tl.int32)
            code = (byte >> ((offs[None, :] % 2) * 4)) & 15
        else:
            code = tl.load(row + CODES_OFF + offs[None, :], mask=mask, other=0).to(tl.int32)
        group = offs[None, :] // GROUP
        scale = tl.load(row16 + HALF_OFF + 2 * group, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(row16 + HALF_OFF + 2 * group + 1, mask=mask, other=0.0).to(tl.float32)
        x = code.to(tl.float32) * scale + zero
    return x


@triton.jit
def _row_tiles(KV, KV16, b64, offs_n, mask_n, offs_c, offs_r, stride_kvb, stride_kvs, stride_k16b, stride_k16s,
               R_KV: tl.constexpr, D_ROPE: tl.constexpr, QUANT: tl.constexpr, C_BITS: tl.constexpr,
               R_BITS: tl.constexpr, GROUP: tl.constexpr, CODES_OFF: tl.constexpr, R_CODES_OFF: tl.constexpr,
               ROPE_OFF: tl.constexpr):
    """The c_kv tile [BLOCK_N, BLOCK_C] and k_rope tile [BLOCK_N, BLOCK_R] of rows offs_n, in the cache's float dtype
    (fp32 for a quantized cache)."""
    mask_c = mask_n[:, None] & (offs_c < R_KV)[None, :]
    mask_r = mask_n[:, None] & (offs_r < D_ROPE)[None, :]
    if QUANT:
        row = KV + b64 * stride_kvb + offs_n[:, None] * stride_kvs  # bytes
        row16 = KV16 + b64 * stride_k16b + offs_n[:, None] * stride_k16s  # the same bytes as fp16
        k_c = _dequantized(row, row16, offs_c, mask_c, C_BITS, GROUP, CODES_OFF, 0)
        k_r = _dequantized(row, row16, offs_r, mask_r, R_BITS, GROUP, R_CODES_OFF, ROPE_OFF)
    else:
        row = KV + b64 * stride_kvb + offs_n[:, None] * stride_kvs
        k_c = tl.load(row + offs_c[None, :], mask=mask_c, other=0.0)
        k_r = tl.load(row + R_KV + offs_r[None, :], mask=mask_r, other=0.0)
    return k_c, k_r


@triton.jit
def _split_kernel(
    Q_lat, Q_rope, KV, KV16, Lens, Mask, Mid_O, Mid_LSE,
    stride_qlb, stride_qlh, stride_qrb, stride_qrh, stride_kvb, stride_kvs, stride_k16b, stride_k16s, stride_mb,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    seq_len, scale_log2, H,
    R_KV: tl.constexpr, D_ROPE: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_LENS: tl.constexpr,
    HAS_MASK: tl.constexpr, QUANT: tl.constexpr, C_BITS: tl.constexpr, R_BITS: tl.constexpr, GROUP: tl.constexpr,
    CODES_OFF: tl.constexpr, R_CODES_OFF: tl.constexpr, ROPE_OFF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    b64 = b.to(tl.int64)  # a layer's cache can exceed 2**31 elements at large batch
    split = tl.program_id(2)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    mask_h, mask_c, mask_r = offs_h < H, offs_c < R_KV, offs_r < D_ROPE

    q_c = tl.load(Q_lat + b * stride_qlb + offs_h[:, None] * stride_qlh + offs_c[None, :],
                  mask=mask_h[:, None] & mask_c[None, :], other=0.0)  # [BLOCK_H, BLOCK_C]
    q_r = tl.load(Q_rope + b * stride_qrb + offs_h[:, None] * stride_qrh + offs_r[None, :],
                  mask=mask_h[:, None] & mask_r[None, :], other=0.0)  # [BLOCK_H, BLOCK_R]

    length = tl.load(Lens + b) if HAS_LENS else seq_len
    rows_per_split = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N  # tiles start aligned
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, length)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        if HAS_MASK:  # key padding (left padding of a batch) or a sliding window
            mask_n = mask_n & (tl.load(Mask + b64 * stride_mb + offs_n, mask=mask_n, other=0) != 0)
        k_c, k_r = _row_tiles(KV, KV16, b64, offs_n, mask_n, offs_c, offs_r, stride_kvb, stride_kvs, stride_k16b,
                              stride_k16s, R_KV, D_ROPE, QUANT, C_BITS, R_BITS, GROUP, CODES_OFF, R_CODES_OFF,
                              ROPE_OFF)
        k_c, k_r = k_c.to(q_c.dtype), k_r.to(q_c.dtype)  # [BLOCK_N, BLOCK_C], [BLOCK_N, BLOCK_R]
        s = tl.dot(q_c, tl.trans(k_c), input_precision=DOT_PRECISION)
        s += tl.dot(q_r, tl.trans(k_r), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N], fp32
        s = tl.where(mask_n[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile with every row masked adds nothing
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(k_c.dtype), k_c, input_precision=DOT_PRECISION)
        m_i = m_new

    # An empty split (short sequence, or every row masked) stores o = 0 and lse = -inf: zero weight in stage 2.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    o_ptr = Mid_O + b * stride_ob + offs_h[:, None] * stride_oh + split * stride_os + offs_c[None, :]
    tl.store(o_ptr, out, mask=mask_h[:, None] & mask_c[None, :])
    tl.store(Mid_LSE + b * stride_lb + offs_h * stride_lh + split, lse, mask=mask_h)


@triton.jit
def _combine_kernel(
    Mid_O, Mid_LSE, Out,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
    R_KV: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)
    mask_s, mask_c = offs_s < NUM_SPLITS, offs_c < R_KV
    lse = tl.load(Mid_LSE + b * stride_lb + h * stride_lh + offs_s, mask=mask_s, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))  # [BLOCK_S]; needs length >= 1 (one non-empty split)
    o = tl.load(Mid_O + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_c[None, :],
                mask=mask_s[:, None] & mask_c[None, :], other=0.0)  # [BLOCK_S, BLOCK_C]
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(Out + b * stride_outb + h * stride_outh + offs_c, out.to(Out.dtype.element_ty), mask=mask_c)


def _blocks(H: int, r_kv: int, d_rope: int) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_C, BLOCK_R, BLOCK_N); 16 is tl.dot's smallest tile side."""
    block_h = max(16, min(64, triton.next_power_of_2(H)))  # one head block for H <= 64: the latent is read once
    block_c = max(16, triton.next_power_of_2(r_kv))
    block_r = max(16, triton.next_power_of_2(d_rope))
    block_n = 64 if block_c <= 128 else 32  # keeps the [BLOCK_N, BLOCK_C] tile and fp32 acc in registers
    return block_h, block_c, block_r, block_n


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def pick_splits(B: int, head_blocks: int, S: int, device: torch.device) -> int:
    """Enough programs to fill the GPU (~2 per SM), but no split shorter than MIN_ROWS_PER_SPLIT rows."""
    want = triton.cdiv(2 * _sm_count(device), B * head_blocks)
    return max(1, min(want, triton.cdiv(S, MIN_ROWS_PER_SPLIT), MAX_SPLITS))


def mla_decode(
    q_lat: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, scale: float,
    lengths: torch.Tensor | None = None, key_mask: torch.Tensor | None = None, fmt=None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """o_lat [B, H, r_kv] (dtype of q_lat). latent [B, S, W] may be a strided view (last dim contiguous).
    `lengths` [B] int: valid rows per sequence (default: all S rows); `key_mask` [B, S] bool: False = not seen; each
    sequence must see at least one row. `fmt`: latent holds quantized byte rows [B, S, row_bytes] of this format
    (`ecomla.mla.quant.LatentFormat`), dequantized in the kernel."""
    B, H, r_kv = q_lat.shape
    d_rope = q_rope.shape[-1]
    width = r_kv + d_rope if fmt is None else fmt.row_bytes
    if latent.shape[0] != B or latent.shape[-1] != width:
        raise ValueError(f"latent {tuple(latent.shape)} does not match q_lat {tuple(q_lat.shape)} + d_rope {d_rope}")
    if latent.stride(-1) != 1:
        latent = latent.contiguous()
    q_lat, q_rope = q_lat.contiguous(), q_rope.contiguous()
    quant = _quant_args(fmt, r_kv, d_rope)
    latent16 = latent.view(torch.float16) if fmt is not None else latent  # the fp16 parts of a quantized row
    if key_mask is not None and key_mask.stride(-1) != 1:
        key_mask = key_mask.contiguous()
    S = latent.shape[1]
    block_h, block_c, block_r, block_n = _blocks(H, r_kv, d_rope)
    head_blocks = triton.cdiv(H, block_h)
    splits = num_splits or pick_splits(B, head_blocks, S, latent.device)
    mid_o = torch.empty(B, H, splits, r_kv, dtype=torch.float32, device=latent.device)
    mid_lse = torch.empty(B, H, splits, dtype=torch.float32, device=latent.device)
    out = torch.empty(B, H, r_kv, dtype=q_lat.dtype, device=latent.device)
    lens = lengths.to(device=latent.device, dtype=torch.int32) if lengths is not None else mid_lse  # unused if None
    mask = key_mask if key_mask is not None else mid_lse  # unused if None
    _split_kernel[(B, head_blocks, splits)](
        q_lat, q_rope, latent, latent16, lens, mask, mid_o, mid_lse,
        q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1), latent.stride(0), latent.stride(1),
        latent16.stride(0), latent16.stride(1), mask.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        S, scale * LOG2E, H,
        R_KV=r_kv, D_ROPE=d_rope, NUM_SPLITS=splits, HAS_LENS=lengths is not None, HAS_MASK=key_mask is not None,
        **quant, BLOCK_H=block_h, BLOCK_C=block_c, BLOCK_R=block_r, BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q_lat.dtype == torch.float32 else None,  # no TF32 rounding in fp32
        num_warps=4, num_stages=2,
    )
    _combine_kernel[(B, H)](
        mid_o, mid_lse, out,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        R_KV=r_kv, NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), BLOCK_C=block_c,
    )
    return out


def _quant_args(fmt, r_kv: int, d_rope: int) -> dict:
    """The kernel's constexprs for a quantized row of `fmt` (None: a float row). Offsets: CODES_OFF and R_CODES_OFF
    in bytes (c_kv and k_rope codes), ROPE_OFF in fp16 elements (after the scale and zero of every c_kv group: the
    fp16 k_rope, or the scale and zero of its groups)."""
    if fmt is None:
        return dict(QUANT=False, C_BITS=16, R_BITS=16, GROUP=1, CODES_OFF=0, R_CODES_OFF=0, ROPE_OFF=0)
    if (fmt.r_kv, fmt.d_rope) != (r_kv, d_rope):
        raise ValueError(f"quantized rows of {fmt.r_kv} + {fmt.d_rope} for a query of {r_kv} + {d_rope}")
    return dict(QUANT=True, C_BITS=fmt.bits, R_BITS=fmt.rope_bits, GROUP=fmt.group, CODES_OFF=fmt.head_bytes,
                R_CODES_OFF=fmt.head_bytes + fmt.codes_bytes[0], ROPE_OFF=2 * fmt.groups(r_kv))
