"""The quantized latent cache: one byte row per token, c_kv and k_rope in per-token groups of 8- or 4-bit integers.

    fmt = LatentFormat.of(r_kv, d_rope, cache_bits=4)    # None for cache_bits 16 (the latent in the model's dtype)
    rows = fmt.quantize(latent)                          # [.., r_kv + d_rope] float -> [.., fmt.row_bytes] uint8
    latent = fmt.dequantize(rows, torch.float32)         # what every query reads
    latent = fake_quantize(latent, fmt)                  # the same values without a cache (straight-through grads)

Notation: r_kv latent rank, d_rope rotary dims, g group size, n_g = ceil(n / g) groups of an n-wide part,
b bits (8 or 4), qmax = 2^b - 1.

A group of g values x of one token is stored as codes q = round((x - zero) / scale) clamped to [0, qmax], with
zero = min x and scale = (max x - min x) / qmax, both rounded to fp16 (asymmetric, one scale and zero per group);
it reads back as q * scale + zero. A part whose width is not a multiple of g ends in a shorter group. Two 4-bit
codes share a byte: element 2i in the low nibble, 2i + 1 in the high one.

Row layout (bytes; the fp16 parts first, so they start on even bytes; the row is padded to an even length so that
rows of a [.., S, row_bytes] buffer can be read as fp16):
    [ scale, zero per c_kv group | k_rope (d_rope fp16), or scale, zero per k_rope group | c_kv codes | k_rope codes ]
Everything the cache holds is in the row: there is no full-precision window of recent tokens, so each token is
quantized on its own, and an uncached forward that applies `fake_quantize` sees exactly the values that decoding
over the cache reads (tests/test_quant.py pins cached == uncached).

`cache_bits` is the width of every cached value: c_kv and k_rope both (`LatentFormat.of`). That and groups of 32
are what `benchmarks/latent_quant.py` measured best per byte (4x student, 0 tokens, held-out chat KL: 4-bit c_kv
with an fp16 rotary part 1.351 at 7.38x, with an 8-bit one 1.359 at 10.1x, a 4-bit one 1.431 at 12.8x; groups of
64: 1.399 at 7.68x; docs/notebook/LOG.md). A LatentFormat built by hand may keep the rotary part in fp16
(rope_bits 16), as that benchmark does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..common import UserError

CACHE_BITS = (16, 8, 4)  # 16 = off
GROUP = 32  # values per scale and zero


# the --help of every stage's --cache-bits
CACHE_BITS_HELP = ("bits per cached latent value (c_kv and the rotary part): 16 (the model's dtype), 8 or 4 "
                   "(quantized in groups of 32 with an fp16 scale and zero each, counted in the bytes); default: the checkpoint's own (config.json "
                   "cache_bits)")


def check_cache_bits(bits, flag: str = "--cache-bits") -> int | None:
    """The one check of a cache width, with a message that names the flag to change (None: not given, kept)."""
    if bits is None:
        return None
    if isinstance(bits, bool) or bits not in CACHE_BITS:
        raise UserError(f"{flag} must be 16 (no quantization), 8 or 4, got {bits!r}")
    return int(bits)


def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """[.., n] -> [.., n_g, group]; a short last group is padded with its last value (min and max unchanged)."""
    pad = -x.shape[-1] % group
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.unflatten(-1, (-1, group))


def quantize_groups(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """codes uint8 [.., n] (one code per value, unpacked) and (scale, zero) fp16 [.., n_g, 2] of x [.., n]."""
    qmax = (1 << bits) - 1
    acc = torch.promote_types(x.dtype, torch.float32)
    xg = _grouped(x.to(acc), group)  # [.., n_g, g]
    lo, hi = xg.amin(-1), xg.amax(-1)
    # stacked before the cast: CPU bf16 autocast (training on AMX) refuses to stack fp16 tensors
    scale_zero = torch.stack([(hi - lo) / qmax, lo], dim=-1).to(torch.float16)  # [.., n_g, 2]
    scale, zero = scale_zero.unbind(-1)
    step = torch.where(scale > 0, scale, 1).to(acc)  # a constant group keeps code 0: it reads back as zero
    q = ((xg - zero.to(acc)[..., None]) / step[..., None]).round_().clamp_(0, qmax)
    return q.flatten(-2)[..., : x.shape[-1]].to(torch.uint8), scale_zero


def dequantize_groups(codes: torch.Tensor, scale_zero: torch.Tensor, group: int, dtype: torch.dtype,
                      nibbles: int | None = None) -> torch.Tensor:
    """Values [.., n] in `dtype` (computed in fp32, or fp64 for an fp64 dtype) from codes and scale_zero
    [.., n_g, 2]: codes uint8 [.., n], one per byte, or with `nibbles` = n the 4-bit codes packed two per byte
    [.., ceil(n / 2)] (`pack`). The codes go straight into one float buffer and are scaled there in place (no
    unpacked copy, no padding copy: the CPU decode kernel over a 4-bit cache measured 1.2x faster:
    docs/notebook/LOG.md)."""
    acc = torch.promote_types(dtype, torch.float32)
    n_g = scale_zero.shape[-2]
    n = codes.shape[-1] if nibbles is None else nibbles
    x = torch.empty(*codes.shape[:-1], n_g * group, dtype=acc, device=codes.device)  # [.., n_g * g]
    if nibbles is None:
        x[..., :n].copy_(codes)
        end = n
    else:  # element 2i in the low nibble, 2i + 1 in the high one (an odd n ends in a zero nibble)
        end = 2 * codes.shape[-1]
        pairs = x[..., :end].unflatten(-1, (-1, 2))
        pairs[..., 0].copy_(codes & 15)
        pairs[..., 1].copy_(codes >> 4)
    x[..., end:].zero_()
    sz = scale_zero.to(acc)
    x.unflatten(-1, (n_g, group)).mul_(sz[..., :1]).add_(sz[..., 1:])  # q * scale + zero, in place
    return x[..., :n].to(dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [.., n] -> bytes [.., ceil(n * bits / 8)]."""
    if bits == 8:
        return codes
    if codes.shape[-1] % 2:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], 1)], dim=-1)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


@dataclass(frozen=True)
class LatentFormat:
    """The byte row of one quantized cached token of an MLA layer (see the module docstring)."""

    r_kv: int
    d_rope: int
    bits: int  # c_kv: 8 or 4
    rope_bits: int = 16  # 16 (fp16), or 8 / 4 in per-token groups like c_kv (`of`: the same as c_kv)
    group: int = GROUP

    @classmethod
    def of(cls, r_kv: int, d_rope: int, cache_bits: int) -> "LatentFormat | None":
        """The format of `cache_bits` (c_kv and k_rope at that width), or None for 16 (no quantization)."""
        return None if check_cache_bits(cache_bits) == 16 else cls(r_kv, d_rope, cache_bits, rope_bits=cache_bits)

    def groups(self, n: int) -> int:
        return -(-n // self.group)

    @property
    def head_bytes(self) -> int:
        """The fp16 part: scale and zero of every group, and k_rope when it stays fp16."""
        rope = 2 * self.d_rope if self.rope_bits == 16 else 4 * self.groups(self.d_rope)
        return 4 * self.groups(self.r_kv) + rope

    @property
    def codes_bytes(self) -> tuple[int, int]:
        """Bytes of the c_kv codes and of the k_rope codes (0 when k_rope is fp16)."""
        rope = 0 if self.rope_bits == 16 else math.ceil(self.d_rope * self.rope_bits / 8)
        return math.ceil(self.r_kv * self.bits / 8), rope

    @property
    def row_bytes(self) -> int:
        n = self.head_bytes + sum(self.codes_bytes)
        return n + n % 2

    def quantize(self, latent: torch.Tensor) -> torch.Tensor:
        """[.., r_kv + d_rope] float -> [.., row_bytes] uint8."""
        c, r = latent.split([self.r_kv, self.d_rope], dim=-1)
        codes_c, sz_c = quantize_groups(c, self.bits, self.group)
        half, codes = [sz_c.flatten(-2)], [pack(codes_c, self.bits)]
        if self.rope_bits == 16:
            half.append(r.to(torch.float16))
        else:
            codes_r, sz_r = quantize_groups(r, self.rope_bits, self.group)
            half.append(sz_r.flatten(-2))
            codes.append(pack(codes_r, self.rope_bits))
        parts = [torch.cat(half, dim=-1).view(torch.uint8), *codes]
        pad = self.row_bytes - self.head_bytes - sum(self.codes_bytes)
        if pad:
            parts.append(codes[0].new_zeros(*latent.shape[:-1], pad))
        return torch.cat(parts, dim=-1)

    def _fields(self, rows: torch.Tensor):
        """Views of rows [.., row_bytes]: the fp16 head [.., head_bytes / 2], where its c_kv scales end (n_c), the
        c_kv codes and the k_rope codes (empty when k_rope is fp16)."""
        half = rows[..., : self.head_bytes].view(torch.float16)
        start, (bytes_c, bytes_r) = self.head_bytes, self.codes_bytes
        return (half, 2 * self.groups(self.r_kv), rows[..., start : start + bytes_c],
                rows[..., start + bytes_c : start + bytes_c + bytes_r])

    def dequantize(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[.., row_bytes] uint8 -> [.., r_kv + d_rope] in `dtype`."""
        half, n_c, codes_c, codes_r = self._fields(rows)
        c = dequantize_groups(codes_c, half[..., :n_c].unflatten(-1, (-1, 2)), self.group, dtype,
                              self._nibbles(self.bits, self.r_kv))
        if self.rope_bits == 16:
            return torch.cat([c, half[..., n_c : n_c + self.d_rope].to(dtype)], dim=-1)
        return torch.cat([c, dequantize_groups(codes_r, half[..., n_c:].unflatten(-1, (-1, 2)), self.group, dtype,
                                               self._nibbles(self.rope_bits, self.d_rope))], dim=-1)

    def dequantize_planes(self, rows: torch.Tensor) -> list[tuple[slice, torch.Tensor]]:
        """The fp32 latent from rows [.., row_bytes] as planes that cover [c_kv | k_rope]: (where, values [.., m])
        with latent[..., where] == values. A part whose groups are all equal (its width a multiple of the group, or
        less than one) comes in planes by a code's place in its byte: for 4 bits the even and the odd elements
        (slices of step 2), for 8 bits the part itself, each unpacked and scaled by contiguous passes; any other
        part comes whole, as `dequantize` reads it. A reader whose math is a sum over elements (the CPU
        decode GEMMs) uses the planes as they are and never interleaves the nibbles (docs/notebook/LOG.md: decode
        steps over a 4-bit cache 1.2x faster on an Intel CPU than with one unpacked buffer)."""
        half, n_c, codes_c, codes_r = self._fields(rows)
        planes = self._planes(codes_c, half[..., :n_c], self.bits, 0, self.r_kv)
        if self.rope_bits == 16:
            return planes + [(slice(self.r_kv, None), half[..., n_c : n_c + self.d_rope].float())]
        return planes + self._planes(codes_r, half[..., n_c:], self.rope_bits, self.r_kv, self.d_rope)

    def _planes(self, codes: torch.Tensor, half: torch.Tensor, bits: int, at: int, n: int):
        """One part's planes (see `dequantize_planes`): codes [.., bytes], half [.., 2 n_g] its scales and zeros."""
        n_g = self.groups(n)
        sz = half.unflatten(-1, (-1, 2)).float()  # [.., n_g, 2]
        scale, zero = sz[..., None, 0], sz[..., None, 1]  # [.., n_g, 1]
        if (n % self.group and n_g > 1) or (bits == 4 and n % 2):  # a short last group, or a lone last nibble
            return [(slice(at, at + n), dequantize_groups(codes, sz, self.group, torch.float32,
                                                           self._nibbles(bits, n)))]
        codes = codes.contiguous()  # the row's codes apart from its scales: bitwise ops on a strided view are slow
        if bits == 8:
            return [(slice(at, at + n), codes.float().unflatten(-1, (n_g, -1)).mul_(scale).add_(zero).flatten(-2))]
        return [(slice(at + j, at + n, 2), (codes & 15 if j == 0 else codes >> 4).float().unflatten(-1, (n_g, -1))
                 .mul_(scale).add_(zero).flatten(-2)) for j in (0, 1)]  # codes 2i in low nibbles, 2i + 1 high

    @staticmethod
    def _nibbles(bits: int, n: int) -> int | None:
        return n if bits == 4 else None

    def fake(self, latent: torch.Tensor) -> torch.Tensor:
        """dequantize(quantize(latent)), bit for bit, without packing the row (the uncached forward)."""
        c, r = latent.split([self.r_kv, self.d_rope], dim=-1)
        c = dequantize_groups(*quantize_groups(c, self.bits, self.group), self.group, latent.dtype)
        if self.rope_bits == 16:
            r = r.to(torch.float16).to(latent.dtype)
        else:
            r = dequantize_groups(*quantize_groups(r, self.rope_bits, self.group), self.group, latent.dtype)
        return torch.cat([c, r], dim=-1)


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized values; backward: the gradient passes through unchanged (the straight-through
    estimator), so distillation trains the weights that produce the latent for the cache decoding will read."""

    @staticmethod
    def forward(ctx, latent, fmt):
        return fmt.fake(latent)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_quantize(latent: torch.Tensor, fmt) -> torch.Tensor:
    """The values a query reads from a cache of format `fmt` (None: the latent itself), differentiable."""
    return latent if fmt is None else _StraightThrough.apply(latent, fmt)
