"""Better starting points than Algorithm 1: RoPE-aware and activation-aware (whitened) MLA initialisation.

Tensor math only (tensors in, tensors out, float64). Notation as in svd.py: W [out, D] in nn.Linear layout,
H / G query / KV heads, d_h source head dim, m = d_rope / 2 rotary frequency pairs kept, C = E[x x^T] the
second moment of a layer's attention input (from calibration data, `calibrate.py`).

RoPE-aware (`rope_pairs`, `shared_rope_key`, `rope_aware_layer`):
- The source's rotate-half RoPE pairs dim j with dim j + d_h/2 at frequency inv_freq[j]; as a complex number
  z_j = x_j + i x_{j + d_h/2} it is rotated by e^{i t theta_j}. We keep m *whole* pairs with their original
  frequencies, chosen by their contribution to attention scores: sum_h sqrt(E|q_hj|^2) sqrt(E|k_gj|^2).
- One rotary key must serve all G KV heads. Per kept pair j the G complex key functionals w_gj are fitted by a
  shared w_j and complex gains a_gj (k_gj ~ a_gj k_j, a rank-1 complex PCA across heads, in the activation
  metric). A complex gain commutes with the rotation, so conj(a_gj) is folded into the query of every head
  of group g and scores are preserved up to the rank-1 fit: exact when G = 1, and tested for G > 1.
- The K dims that become rotary are left out of the joint [K_nope; V] factorisation.
Whitened (`whitened_factors`): minimise E||(W - W')x||^2 = ||(W - W') L||_F^2 with C + damping = L L^T; the
SVD of W L gives W' = U_r S_r V_r^T L^{-1} (SVD-LLM / Palu style), for the query and the joint K/V latent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .svd import Factors, Source, repeat_heads, small_matrix_threads, truncate
from .svd import svd as svd_


# ---- whitening ---------------------------------------------------------------------------------
def whitening(cov: torch.Tensor, damp: float = 1e-4) -> torch.Tensor:
    """Lower-triangular L with L L^T = C + damp * mean(diag C) * I (damping keeps rank-deficient C usable)."""
    c = cov.double()
    c = c + damp * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
    with small_matrix_threads(c):
        return torch.linalg.cholesky(c)


def whitened_svd(w: torch.Tensor, L: torch.Tensor | None):
    """SVD of W L (or of W): singular values are errors in activation space."""
    wl = w.double() @ L if L is not None else w.double()
    return svd_(wl)


def whitened_factors(w: torch.Tensor, L: torch.Tensor | None, rank: int, sigma: str = "up") -> Factors:
    """Rank-`rank` factors minimising the activation-space error (plain SVD when L is None)."""
    u, s, vh = whitened_svd(w, L)
    f = truncate(u, s, vh, rank, sigma)
    if L is not None:  # down @ L^{-1}: solve L^T X = down^T
        f.down = torch.linalg.solve_triangular(L.T, f.down.T, upper=True).T
    return f


# ---- RoPE pairs --------------------------------------------------------------------------------
def _pair_energy(rows_re: torch.Tensor, rows_im: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """E|z|^2 for complex functionals z = (re + i im) x, rows [n, D] -> [n]."""
    return ((rows_re @ cov) * rows_re).sum(-1) + ((rows_im @ cov) * rows_im).sum(-1)


def rope_pairs(src: Source, m: int, cov: torch.Tensor | None = None, rule: str = "contribution",
               inv_freq: torch.Tensor | None = None, max_distance: int = 512) -> list[int]:
    """The m frequency pairs kept rotary.

    'contribution': the pairs whose scores change most if their rotation is removed: the magnitude
        sum_h sqrt(E|q_hj|^2 E|k_gj|^2) (calibration data, or weights alone) times the mean over token
        distances 1..max_distance of |1 - e^{i theta_j distance}| (slow pairs barely rotate, so they lose little).
    'magnitude': the magnitude alone (MHA2MLA's 2-norm rule); 'high': the m fastest pairs."""
    half = src.d_h // 2
    if rule == "high":
        return list(range(m))
    if rule not in ("contribution", "magnitude"):
        raise ValueError(f"unknown rope pair rule {rule!r}; use 'contribution', 'magnitude' or 'high'")
    c = cov.double() if cov is not None else torch.eye(src.w_q.shape[1], dtype=torch.float64)
    wq = src.w_q.double().reshape(src.H, src.d_h, -1)
    wk = src.w_k.double().reshape(src.G, src.d_h, -1)
    g_of_h = torch.arange(src.H) // (src.H // src.G)
    score = torch.zeros(half, dtype=torch.float64)
    for j in range(half):
        eq = _pair_energy(wq[:, j], wq[:, j + half], c)  # [H]
        ek = _pair_energy(wk[:, j], wk[:, j + half], c)  # [G]
        score[j] = (eq.sqrt() * ek[g_of_h].sqrt()).sum()
    if rule == "contribution":
        if inv_freq is None:
            raise ValueError("the 'contribution' rule needs the source's rotary frequencies")
        dist = torch.arange(1, max_distance + 1, dtype=torch.float64)
        score = score * (2 * torch.sin(inv_freq.double()[:, None] * dist / 2).abs()).mean(1)
    return sorted(torch.topk(score, m).indices.tolist())


def shared_rope_key(src: Source, pairs: list[int], L: torch.Tensor | None, fit: str = "pca"):
    """Shared rotary key rows [2m, D] (real parts of the kept pairs, then imaginary parts), complex gains
    a [G, m] with k_gj ~ a_gj k_j, and the shared key bias [2m] (or None)."""
    half, D = src.d_h // 2, src.w_k.shape[1]
    wk = src.w_k.double().reshape(src.G, src.d_h, D)
    bk = None if src.b_k is None else src.b_k.double().reshape(src.G, src.d_h)
    re, im, gains, bias_re, bias_im = [], [], [], [], []
    for j in pairs:
        w = torch.complex(wk[:, j], wk[:, j + half])  # [G, D] complex functionals
        if fit == "mean" or src.G == 1:
            shared, a = w.mean(0), torch.ones(src.G, dtype=w.dtype)
        else:  # rank-1 complex PCA across heads in the (whitened) activation metric
            lw = w @ L.to(w.dtype) if L is not None else w  # rows: (L^T w_g)^T
            with small_matrix_threads(lw):
                u, s, vh = torch.linalg.svd(lw.T, full_matrices=False)  # [D, G] = sum_k s_k u_k vh_k
            shared_l, a = s[0] * u[:, 0], vh[0]  # column g (= whitened w_g) ~ shared_l * vh[0, g]
            shared = (torch.linalg.solve_triangular(L.T.to(w.dtype), shared_l[:, None], upper=True)[:, 0]
                      if L is not None else shared_l)
        re.append(shared.real)
        im.append(shared.imag)
        gains.append(a)
        if bk is not None:  # least-squares shared bias: b = sum conj(a_g) b_g / sum |a_g|^2
            b = torch.complex(bk[:, j], bk[:, j + half])
            shared_b = (a.conj() * b).sum() / (a.abs() ** 2).sum()
            bias_re.append(shared_b.real)
            bias_im.append(shared_b.imag)
    rows = torch.cat([torch.stack(re), torch.stack(im)])
    bias = torch.cat([torch.stack(bias_re), torch.stack(bias_im)]) if bk is not None else None
    return rows, torch.stack(gains, dim=1), bias


@dataclass
class RopeAwareLayer:
    """The matrices an MLA layer is factored from, with rotary dims handled whole-pair."""

    q_rows: torch.Tensor  # [H*(d_nope+d_rope), D]: per head NoPE dims, then the kept pairs (gain-adjusted)
    q_bias: torch.Tensor | None
    kv_rows: torch.Tensor  # [G*d_nope + G*d_h, D]: K NoPE rows of every KV head, then V
    kv_bias: torch.Tensor | None
    w_kr: torch.Tensor  # [d_rope, D]
    b_kr: torch.Tensor | None
    pairs: list[int]
    d_nope: int


def rope_aware_layer(src: Source, pairs: list[int], L: torch.Tensor | None, fit: str = "pca") -> RopeAwareLayer:
    half, D = src.d_h // 2, src.w_q.shape[1]
    keep = pairs + [j + half for j in pairs]
    nope = [d for d in range(src.d_h) if d not in set(keep)]
    w_kr, gains, b_kr = shared_rope_key(src, pairs, L, fit)
    wq = src.w_q.double().reshape(src.H, src.d_h, D)
    bq = None if src.b_q is None else src.b_q.double().reshape(src.H, src.d_h)
    g_of_h = torch.arange(src.H) // (src.H // src.G)

    def rotate(a, x_re, x_im):  # (x_re + i x_im) * conj(a): the gain folded into the query; a [H, m]
        a_re, a_im = (a.real, a.imag) if x_re.dim() == 2 else (a.real[..., None], a.imag[..., None])
        return x_re * a_re + x_im * a_im, x_im * a_re - x_re * a_im

    a = gains[g_of_h]  # [H, m]
    im_dims = [j + half for j in pairs]
    q_re, q_im = rotate(a, wq[:, pairs], wq[:, im_dims])
    q_rows = torch.cat([wq[:, nope], q_re, q_im], dim=1).reshape(-1, D)
    q_bias = None
    if bq is not None:
        b_re, b_im = rotate(a, bq[:, pairs], bq[:, im_dims])
        q_bias = torch.cat([bq[:, nope], b_re, b_im], dim=1).reshape(-1)
    wk = src.w_k.double().reshape(src.G, src.d_h, D)
    kv_rows = torch.cat([wk[:, nope].reshape(-1, D), src.w_v.double()])
    kv_bias = None
    if src.b_k is not None:
        kv_bias = torch.cat([src.b_k.double().reshape(src.G, src.d_h)[:, nope].reshape(-1), src.b_v.double()])
    return RopeAwareLayer(q_rows, q_bias, kv_rows, kv_bias, w_kr, b_kr, pairs, len(nope))


def kv_up_rows(up: torch.Tensor, G: int, H: int, d_nope: int, d_v: int) -> torch.Tensor:
    """Up-projection rows [G*d_nope + G*d_v, r] of the un-repeated [K_nope; V] -> kv_b_proj [H*(d_nope+d_v), r]."""
    r = up.shape[1]
    k = repeat_heads(up[: G * d_nope], G, H).reshape(H, d_nope, r)
    v = repeat_heads(up[G * d_nope :], G, H).reshape(H, d_v, r)
    return torch.cat([k, v], dim=1).reshape(-1, r)


def kv_up_bias(bias: torch.Tensor, G: int, H: int, d_nope: int, d_v: int) -> torch.Tensor:
    k = repeat_heads(bias[: G * d_nope], G, H).reshape(H, d_nope)
    v = repeat_heads(bias[G * d_nope :], G, H).reshape(H, d_v)
    return torch.cat([k, v], dim=1).reshape(-1)
