"""Tensor math of the conversion: (whitened) SVD factorisations, rank rules, and head bookkeeping.

No I/O and no model objects: tensors in, tensors out. Everything is computed in float64.
Weights use nn.Linear's layout (out, in): y = x W^T. The paper writes W as (in, out); the SVD of
the transpose swaps U and V, which is why `down` below is built from Vh.

Notation: D hidden, H query heads, G KV heads, g = H/G, d_h source head dim, r_q / r_kv ranks,
d_nope / d_rope / d_v per-head dims, C = E[x x^T] the second moment of a layer's attention input.

Whitened factorisation (`whitened_factors`): minimise E||(W - W')x||^2 = ||(W - W') L||_F^2 with
C + damping = L L^T; the SVD of W L gives W' = U_r S_r V_r^T L^{-1} (SVD-LLM / Palu style). With L = None it
is the plain weight SVD of the paper.

K/V head repeat (`kv_up_rows`): repeating the G KV heads to H heads multiplies [K; V] by R with R^T R = g I,
so its SVD is (R U / sqrt(g)) (sqrt(g) S) Vh: the same right factors, hence the same product at every rank.
We factor the un-repeated matrix (g times cheaper) and repeat the up-projection's rows; a test pins this
against the paper's literal repeated SVD.
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
    w_o: torch.Tensor | None = None  # [D, H*d_h]; read only by the output-aware metric (fit.py)

    @property
    def w_kv(self) -> torch.Tensor:
        return torch.cat([self.w_k, self.w_v], dim=0)  # [2*G*d_h, D]


@contextlib.contextmanager
def small_matrix_threads(w: torch.Tensor):
    """One CPU thread for small factorisations: LAPACK's threaded SVD gains nothing at these sizes, and on a
    busy machine OpenMP threads waiting for each other can make it far slower than one thread."""
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


def whitening(cov: torch.Tensor, damp: float = 1e-4) -> torch.Tensor:
    """Lower-triangular L with L L^T = C + damp * mean(diag C) * I (damping keeps rank-deficient C usable)."""
    c = cov.double()
    c = c + damp * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
    with small_matrix_threads(c):
        return torch.linalg.cholesky(c)


def whitened_svd(w: torch.Tensor, L: torch.Tensor | None):
    """SVD of W L (or of W): singular values are errors in activation space (or in weight space)."""
    wl = w.double() @ L if L is not None else w.double()
    return svd(wl)


def whitened_factors(w: torch.Tensor, L: torch.Tensor | None, rank: int, sigma: str = "up") -> Factors:
    """Rank-`rank` factors minimising the activation-space error (plain SVD when L is None)."""
    u, s, vh = whitened_svd(w, L)
    f = truncate(u, s, vh, rank, sigma)
    if L is not None:  # down @ L^{-1}: solve L^T X = down^T
        f.down = torch.linalg.solve_triangular(L.T, f.down.T, upper=True).T
    return f


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


def select_head_dims(w: torch.Tensor, n_heads: int, d_h: int, d_nope: int, d_rope: int) -> torch.Tensor:
    """Rows of a per-head projection [n_heads*d_h, ...] -> [n_heads*(d_nope+d_rope), ...]:
    the first d_nope and the last d_rope dims of every head (all of them, in order, when d_nope+d_rope = d_h)."""
    w3 = w.reshape(n_heads, d_h, *w.shape[1:])
    return torch.cat([w3[:, :d_nope], w3[:, d_h - d_rope :]], dim=1).reshape(n_heads * (d_nope + d_rope), *w.shape[1:])


def repeat_heads(w: torch.Tensor, G: int, H: int) -> torch.Tensor:
    """KV-head rows [G*d_h, ...] -> query-head rows [H*d_h, ...], head h takes KV head h // (H/G) (HF repeat_kv)."""
    return w.reshape(G, -1, *w.shape[1:]).repeat_interleave(H // G, dim=0).reshape(-1, *w.shape[1:])


def kv_up_rows(w: torch.Tensor, G: int, H: int, d_k: int, d_nope: int) -> torch.Tensor:
    """kv_b_proj rows [H*(d_nope+d_v), ...] from rows [G*d_k + G*d_v, ...] of a factored [K; V] (the up-projection
    [.., r] or a bias [..]): every KV head repeated to its query heads, the first d_nope of its d_k K dims kept.
    d_k = d_h for Algorithm 1 (all K dims factored), d_k = d_nope when only the NoPE K dims were factored."""
    rest = w.shape[1:]
    k = repeat_heads(w[: G * d_k], G, H).reshape(H, d_k, *rest)[:, :d_nope]  # [H, d_nope, ...]
    v = repeat_heads(w[G * d_k :], G, H).reshape(H, -1, *rest)  # [H, d_v, ...]
    return torch.cat([k, v], dim=1).reshape(-1, *rest)
