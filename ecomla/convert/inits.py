"""The MLA initialisations: their typed description (`InitMethod`) and the rows each one factors (`LayerRows`).

Tensor math only (tensors in, tensors out, float64). Notation as in svd.py: W [out, D] in nn.Linear layout,
H / G query / KV heads, d_h source head dim, m = d_rope / 2 rotary frequency pairs kept, C = E[x x^T] the
second moment of a layer's attention input (from calibration data, `calibrate.py`).

An init is three independent choices (`InitMethod`): factor or draw at random, whiten the factorisations or
not, and which rotary layout. `INITS` names the five combinations that `--init` offers.

Algorithm 1's rotary layout (X-EcoMLA, arXiv 2503.11132; `algorithm1_rows`):
  Q:  factor all of W_Q; per head keep the first d_nope dims (NoPE) and the last d_rope dims (RoPE)
      of the up-projection's rows.
  KV: one joint factorisation of [W_K; W_V] (K/V repeated to H heads, see svd.py); W_UK = first d_nope dims
      of each head's K rows; W_UV = each head's V rows.  W_KR = last d_rope rows of the head-averaged W_K,
      rotated with fresh d_rope-dim frequencies.
RoPE-aware layout (`rope_pairs`, `shared_rope_key`, `rope_aware_rows`):
- The source's rotate-half RoPE pairs dim j with dim j + d_h/2 at frequency inv_freq[j]; as a complex number
  z_j = x_j + i x_{j + d_h/2} it is rotated by e^{i t theta_j}. We keep m *whole* pairs with their original
  frequencies, chosen by their contribution to attention scores: sum_h sqrt(E|q_hj|^2) sqrt(E|k_gj|^2).
- One rotary key must serve all G KV heads. Per kept pair j the G complex key functionals w_gj are fitted by a
  shared w_j and complex gains a_gj (k_gj ~ a_gj k_j, a rank-1 complex PCA across heads, in the activation
  metric). A complex gain commutes with the rotation, so conj(a_gj) is folded into the query of every head
  of group g and scores are preserved up to the rank-1 fit: exact when G = 1, and tested for G > 1.
- The K dims that become rotary are left out of the joint [K_nope; V] factorisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .svd import Source, small_matrix_threads


@dataclass(frozen=True)
class RopeChoice:
    """Keep whole source frequency pairs as the rotary dims, and fit one rotary key shared by the KV heads."""

    select: str = "contribution"  # which pairs: 'contribution', 'magnitude' or 'high' (see rope_pairs)
    distance: int = 512  # token distances the 'contribution' rule averages a pair's lost rotation over
    key_fit: str = "pca"  # shared key: rank-1 complex PCA across KV heads ('pca'), the same weighted by the energy
    #                       of the queries that read each head's pair ('query'), or their mean ('mean')


@dataclass(frozen=True)
class FitChoice:
    """Fit each layer to what it computes, not to its weights (the 'fitted' init; fitted.py). Fields without a
    flag are choices that lost; benchmarks/fit_ablation.py still measures them against the default."""

    key_weight: float = 4.0  # alpha, the weight of key errors (logits) against value errors (through o_proj)
    query_aware: bool = True  # K rows judged by the logits they give with the layer's queries
    output_aware: bool = True  # V rows judged through o_proj
    sequential: bool = False  # fit layer l on the converted layers' outputs (fit.input_map); off: one-shot
    o_target: str = "output"  # o_proj refit towards the teacher's attention 'output', its stream after attention
    #                           ('residual', with `sequential`), or 'none' (no refit)
    ridge: float = 0.1  # o_proj refit's pull towards the source o_proj, a fraction of its gram's mean diagonal
    attention_metric: str = "all"  # the teacher's attention judges the up-projections ('up'), the latent too ('all')


@dataclass(frozen=True)
class InitMethod:
    """How an MLA layer's weights are initialised from its source layer."""

    factored: bool = True  # False: MLA attention weights drawn at random (an ablation)
    whiten: bool = False  # factorisations minimise the error on calibration activations, not on weights
    rope: RopeChoice | None = None  # None: Algorithm 1's rotary layout
    damp: float = 1e-4  # whitening damping, a fraction of the mean diagonal of C
    fit: FitChoice | None = None  # None: the factorisation's metric is the activations (or weights) alone

    @property
    def needs_calibration(self) -> bool:
        """Whitening and the rope-aware pair choice / key fit read the layer-input second moment C."""
        return self.whiten or self.rope is not None or self.fit is not None


INITS = {
    "xecomla": InitMethod(),
    "random": InitMethod(factored=False),
    "whitened": InitMethod(whiten=True),
    "rope-aware": InitMethod(rope=RopeChoice()),
    "rope-whitened": InitMethod(whiten=True, rope=RopeChoice()),
    "fitted": InitMethod(whiten=True, rope=RopeChoice(), fit=FitChoice()),
}


@dataclass
class LayerRows:
    """The matrices an MLA layer is factored from, and where their rows go in the MLA heads."""

    q_rows: torch.Tensor  # [H*d_q, D]: the query rows that are factored
    q_bias: torch.Tensor | None  # [H*d_q]
    kv_rows: torch.Tensor  # [G*d_k + G*d_h, D]: K rows of every KV head, then V
    kv_bias: torch.Tensor | None  # [G*d_k + G*d_h]
    w_kr: torch.Tensor  # [d_rope, D]: the rotary key shared by all heads
    b_kr: torch.Tensor | None  # [d_rope]
    d_q: int  # query dims per head in q_rows; each head keeps its first d_nope and last d_rope
    d_k: int  # K dims per KV head in kv_rows; each head keeps its first d_nope (svd.kv_up_rows)
    d_nope: int
    d_rope: int
    pairs: list[int] | None  # source frequency pairs of the rotary dims; None = fresh frequencies


def algorithm1_rows(src: Source, d_nope: int, d_rope: int) -> LayerRows:
    """Algorithm 1's layout: all of W_Q and [W_K; W_V] factored, the last d_rope dims rotary."""
    G, d_h = src.G, src.d_h
    w_kr = src.w_k.double().reshape(G, d_h, -1).mean(0)[d_h - d_rope :]  # [d_rope, D], head-averaged
    has_bias = src.b_k is not None
    return LayerRows(
        q_rows=src.w_q.double(), q_bias=None if src.b_q is None else src.b_q.double(),
        kv_rows=src.w_kv.double(), kv_bias=torch.cat([src.b_k, src.b_v]).double() if has_bias else None,
        w_kr=w_kr, b_kr=src.b_k.double().reshape(G, d_h).mean(0)[d_h - d_rope :] if has_bias else None,
        d_q=d_h, d_k=d_h, d_nope=d_nope, d_rope=d_rope, pairs=None,
    )


def _pair_energy(rows_re: torch.Tensor, rows_im: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """E|z|^2 for complex functionals z = (re + i im) x, rows [n, D] -> [n]."""
    return ((rows_re @ cov) * rows_re).sum(-1) + ((rows_im @ cov) * rows_im).sum(-1)


def pair_scores(src: Source, cov: torch.Tensor | None = None, rule: str = "contribution",
                inv_freq: torch.Tensor | None = None, max_distance: int = 512) -> torch.Tensor:
    """How much each of the d_h/2 source frequency pairs matters as a rotary pair [d_h/2] (see `rope_pairs`)."""
    half = src.d_h // 2
    if rule == "high":
        return torch.linspace(1.0, 0.5, half, dtype=torch.float64)  # the fastest pairs first
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
    return score


def rope_pairs(src: Source, m: int, cov: torch.Tensor | None = None, rule: str = "contribution",
               inv_freq: torch.Tensor | None = None, max_distance: int = 512) -> list[int]:
    """The m frequency pairs kept rotary.

    'contribution': the pairs whose scores change most if their rotation is removed: the magnitude
        sum_h sqrt(E|q_hj|^2) sqrt(E|k_gj|^2) (calibration data, or weights alone) times the mean over token
        distances 1..max_distance of |1 - e^{i theta_j distance}| (slow pairs barely rotate, so they lose little).
    'magnitude': the magnitude alone (MHA2MLA's 2-norm rule); 'high': the m fastest pairs."""
    score = pair_scores(src, cov, rule, inv_freq, max_distance)
    return sorted(torch.topk(score, m).indices.tolist())


def best_pairs(candidates: list[list[int]], score: torch.Tensor) -> list[int]:
    """The candidate set of pairs with the largest summed score (ties: the first candidate)."""
    totals = [float(score[c].sum()) for c in candidates]
    return candidates[max(range(len(candidates)), key=totals.__getitem__)]


def _query_weights(src: Source, j: int, L: torch.Tensor | None) -> torch.Tensor:
    """[G]: sqrt(sum_{h in g} E|q_hj|^2), the energy of pair j in the queries of group g (in L's metric). A key
    error e in pair j of head g changes each of those queries' logits by q_hj^* e, so the shared-key fit weighs
    head g's error by this (the logits' error, as the fitted init weighs its NoPE keys)."""
    half, D = src.d_h // 2, src.w_q.shape[1]
    wq = src.w_q.double().reshape(src.H, src.d_h, D)
    cov = L.double() @ L.double().T if L is not None else torch.eye(D, dtype=torch.float64)
    energy = _pair_energy(wq[:, j], wq[:, j + half], cov).reshape(src.G, src.H // src.G).sum(1)  # [G]
    return energy.sqrt().clamp(min=1e-12 * float(energy.max().sqrt()) + 1e-300)


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
            weight = _query_weights(src, j, L) if fit == "query" else torch.ones(src.G, dtype=torch.float64)
            with small_matrix_threads(lw):
                u, s, vh = torch.linalg.svd((lw * weight[:, None]).T, full_matrices=False)  # [D, G]
            # column g (= weight_g x whitened w_g) ~ shared_l * vh[0, g]
            shared_l, a = s[0] * u[:, 0], vh[0] / weight
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


def rope_aware_rows(src: Source, pairs: list[int], L: torch.Tensor | None, fit: str = "pca") -> LayerRows:
    """The rope-aware layout: per head the NoPE dims then the kept pairs (gain-adjusted); K NoPE rows and V."""
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
    d_nope, d_rope = len(nope), 2 * len(pairs)
    return LayerRows(q_rows, q_bias, kv_rows, kv_bias, w_kr, b_kr, d_q=d_nope + d_rope, d_k=d_nope, d_nope=d_nope,
                     d_rope=d_rope, pairs=pairs)
