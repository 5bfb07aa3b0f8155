"""Tensor math of the conversion: SVD factorisations, rank rules, and the paper's Algorithm 1.

No I/O and no model objects: tensors in, tensors out. Everything is computed in float64.
Weights use nn.Linear's layout (out, in): y = x W^T. The paper writes W as (in, out); the SVD of
the transpose swaps U and V, which is why `down` below is built from Vh.

Notation: D hidden, H query heads, G KV heads, g = H/G, d_h source head dim, r_q / r_kv ranks,
d_nope / d_rope / d_v per-head dims.

Algorithm 1 (X-EcoMLA, arXiv 2503.11132):
  Q:  W_Q = U S Vh;  W_DQ = Vh[:r_q];  W_UQR = U[:, :r_q] S  (sigma on the up-projection)
      per head: NoPE rows = first d_nope dims, RoPE rows = last d_rope dims
  KV: [W_K; W_V] with K/V repeated to H heads; one joint SVD; W_DKV = Vh[:r_kv]; W_UKV = U S
      W_UK = first d_nope dims of each head's K rows; W_UV = each head's V rows
  W_KR = last d_rope rows of the head-averaged W_K
Repeating the G KV heads to H heads multiplies [K; V] by R with R^T R = g I, so its SVD is
(R U / sqrt(g)) (sqrt(g) S) Vh: the same right factors, hence the same product at every rank. We
factor the un-repeated matrix (g times cheaper) and repeat U's rows; a test pins this against the
literal repeated SVD.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

SIGMA_PLACEMENTS = ("up", "down")


@dataclass
class Factors:
    down: torch.Tensor  # [r, in]
    up: torch.Tensor  # [out, r]
    singular_values: torch.Tensor  # all of them, descending

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@contextlib.contextmanager
def small_matrix_threads(w: torch.Tensor):
    """One CPU thread for small factorisations: LAPACK's threaded SVD gains nothing at these sizes and, on a
    busy machine, OpenMP threads waiting for each other made a 288x576 SVD take 15 s instead of 0.1 s."""
    if w.device.type != "cpu" or min(w.shape) > 2048:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float64."""
    with small_matrix_threads(w):
        return torch.linalg.svd(w.double(), full_matrices=False)


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, sigma: str = "up") -> Factors:
    """Rank-`rank` factors with W ~ up @ down; `sigma` says which factor carries the singular values."""
    if sigma not in SIGMA_PLACEMENTS:
        raise ValueError(f"sigma must be one of {SIGMA_PLACEMENTS}, got {sigma!r} (--sigma)")
    if not 1 <= rank <= s.numel():
        raise ValueError(f"rank {rank} is outside [1, {s.numel()}]")
    if sigma == "up":
        return Factors(down=vh[:rank], up=u[:, :rank] * s[:rank], singular_values=s)
    return Factors(down=s[:rank, None] * vh[:rank], up=u[:, :rank], singular_values=s)


def energy_rank(s: torch.Tensor, delta: float) -> int:
    """Smallest R with sum_{j<=R} s_j^2 >= delta * sum_j s_j^2 (paper Eqs. 13-14)."""
    if not 0.0 < delta <= 1.0:
        raise ValueError(f"energy threshold must be in (0, 1], got {delta} (--rank-energy)")
    energy = torch.cumsum(s.double() ** 2, 0)
    # A tiny tolerance so delta = 1 picks the numerical rank instead of failing on rounding.
    return int(torch.searchsorted(energy, delta * energy[-1] * (1 - 1e-12)).item()) + 1


def truncation_error(s: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error ||W - W_r|| / ||W|| of the best rank-`rank` approximation."""
    s2 = s.double() ** 2
    return math.sqrt(float(s2[rank:].sum() / s2.sum()))


def parity_q_rank(D: int, H: int, G: int, d_h: int, r_kv: int, d_nope: int, d_rope: int, d_v: int) -> int:
    """r_q giving the MLA attention about the source's Q/K/V parameter count (paper section 4.1).

    Source: D*H*d_h + 2*D*G*d_h.  MLA: r_q*(D + H*(d_nope + d_rope)) + D*(r_kv + d_rope) + r_kv*H*(d_nope + d_v).
    """
    source = D * H * d_h + 2 * D * G * d_h
    kv = D * (r_kv + d_rope) + r_kv * H * (d_nope + d_v)
    r_q = (source - kv) // (D + H * (d_nope + d_rope))
    return int(max(1, min(r_q, D, H * (d_nope + d_rope))))


def select_head_dims(w: torch.Tensor, n_heads: int, d_h: int, d_nope: int, d_rope: int) -> torch.Tensor:
    """Rows of a per-head projection [n_heads*d_h, ...] -> [n_heads*(d_nope+d_rope), ...]:
    the first d_nope and the last d_rope dims of every head."""
    w3 = w.reshape(n_heads, d_h, *w.shape[1:])
    return torch.cat([w3[:, :d_nope], w3[:, d_h - d_rope :]], dim=1).reshape(n_heads * (d_nope + d_rope), *w.shape[1:])


def repeat_heads(w: torch.Tensor, G: int, H: int) -> torch.Tensor:
    """KV-head rows [G*d_h, ...] -> query-head rows [H*d_h, ...], head h takes KV head h // (H/G) (HF repeat_kv)."""
    return w.reshape(G, -1, *w.shape[1:]).repeat_interleave(H // G, dim=0).reshape(-1, *w.shape[1:])


@dataclass
class Source:
    """One source attention layer, nn.Linear layout."""

    w_q: torch.Tensor  # [H*d_h, D]
    w_k: torch.Tensor  # [G*d_h, D]
    w_v: torch.Tensor  # [G*d_h, D]
    b_q: torch.Tensor | None
    b_k: torch.Tensor | None
    b_v: torch.Tensor | None
    H: int
    G: int
    d_h: int

    @property
    def w_kv(self) -> torch.Tensor:
        return torch.cat([self.w_k, self.w_v], dim=0)  # [2*G*d_h, D]


def xecomla_query(src: Source, r_q: int | None, d_nope: int, d_rope: int, sigma: str) -> tuple[dict, dict]:
    """MLA query weights by Algorithm 1. Returns (tensors by MLA name, report)."""
    H, d_h = src.H, src.d_h
    out: dict[str, torch.Tensor] = {}
    b_q = None if src.b_q is None else select_head_dims(src.b_q, H, d_h, d_nope, d_rope)
    if r_q is None:
        out["q_proj.weight"] = select_head_dims(src.w_q.double(), H, d_h, d_nope, d_rope)
        if b_q is not None:
            out["q_proj.bias"] = b_q
        return out, {"q_rank": None, "q_error": 0.0}
    u, s, vh = svd(src.w_q)
    f = truncate(u, s, vh, r_q, sigma)
    out["q_a_proj.weight"] = f.down
    out["q_b_proj.weight"] = select_head_dims(f.up, H, d_h, d_nope, d_rope)
    if b_q is not None:
        out["q_b_proj.bias"] = b_q
    return out, {"q_rank": r_q, "q_error": truncation_error(s, r_q)}


def xecomla_kv(src: Source, r_kv: int, d_nope: int, d_rope: int, d_v: int, sigma: str) -> tuple[dict, dict]:
    """MLA key/value weights by Algorithm 1 (joint SVD of the head-repeated [W_K; W_V])."""
    H, G, d_h = src.H, src.G, src.d_h
    if d_v != d_h:
        raise ValueError(f"Algorithm 1 keeps whole value heads: d_v must equal the source head dim {d_h}, got {d_v}")
    u, s, vh = svd(src.w_kv)
    f = truncate(u, s, vh, r_kv, sigma)
    up_k, up_v = repeat_heads(f.up[: G * d_h], G, H), repeat_heads(f.up[G * d_h :], G, H)  # [H*d_h, r]
    k_nope = up_k.reshape(H, d_h, r_kv)[:, :d_nope]
    kv_b = torch.cat([k_nope, up_v.reshape(H, d_h, r_kv)], dim=1).reshape(H * (d_nope + d_v), r_kv)
    w_kr = src.w_k.double().reshape(G, d_h, -1).mean(0)[d_h - d_rope :]  # [d_rope, D], head-averaged
    out = {"kv_a_proj_with_mqa.weight": torch.cat([f.down, w_kr], dim=0), "kv_b_proj.weight": kv_b}
    if src.b_k is not None:
        b_k = repeat_heads(src.b_k.double(), G, H).reshape(H, d_h)
        b_v = repeat_heads(src.b_v.double(), G, H).reshape(H, d_h)
        b_kr = src.b_k.double().reshape(G, d_h).mean(0)[d_h - d_rope :]
        out["kv_a_proj_with_mqa.bias"] = torch.cat([torch.zeros(r_kv, dtype=torch.float64), b_kr])
        out["kv_b_proj.bias"] = torch.cat([b_k[:, :d_nope], b_v], dim=1).reshape(-1)
    report = {"kv_rank": r_kv, "kv_error": truncation_error(s, r_kv), "kv_energy": 1 - truncation_error(s, r_kv) ** 2}
    return out, report


def kv_singular_values(src: Source) -> torch.Tensor:
    return svd(src.w_kv)[1]


def q_singular_values(src: Source) -> torch.Tensor:
    return svd(src.w_q)[1]
