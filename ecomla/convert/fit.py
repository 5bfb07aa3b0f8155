"""The 'fitted' init's tensor math: the metric K/V are factored in (what the layer computes with them), and the
closed-form refits. The algorithm that calls them is fitted.py.

Tensors in, tensors out, float64; notation as in svd.py and inits.py. At one layer, x_t / x_s are the teacher's
and the student's attention inputs (normed) on the same calibration tokens; C_ss = E[x_s x_s^T],
C_ts = E[x_t x_s^T]. In one-shot calibration (the default) x_s = x_t.

- **Input map** (`input_map`, sequential calibration only): A = C_ts C_ss^{-1} is the least-squares map with
  W A x_s ~ W x_t for every linear W. Factoring W A in the metric of C_ss is reduced-rank regression of the
  teacher's projections on the student's inputs: each layer absorbs the error that arrives from the converted
  layers below it (GPTQ-style).
- **Row metric** (`row_metric`): the joint [K_nope; V] factorisation minimises ||M (W - W') L||_F, M block-diagonal
  per KV head g:
    K rows: alpha^(1/2) (s^2 sum_{h in g} W_qh C W_qh^T)^(1/2): the error of the logits q_h . k_g (scale s) that
            the layer's own queries see (query-aware, as in KQ-SVD);
    V rows: (sum_{h in g} W_Oh^T W_Oh)^(1/2): the error of the values after o_proj (output-aware).
  Each of the two parts is scaled so its weighted energy equals its plain activation energy: the metric reshapes
  the errors within K and within V but keeps the K/V balance of the whitened factorisation, and alpha
  (`FitChoice.key_weight`) moves that balance.
- **Attention metric** (`fit_metric`): keys judged by the attention they receive, values on the mixtures attention
  forms (layer_pass.attention_moments): the K / V up-projections are fitted per KV group in those metrics, and with
  attention_metric 'all' the latent is chosen in their mean. Without it (`split_mean`): a NoPE key component shared
  by every token (W_k E[x]) adds the same logit to every key of a query, which softmax ignores, so the latent and
  the K up-projection are fitted in the covariance C - mu mu^T; V, whose mean does pass through attention, in C.
- **Refits** (`least_squares_up`, `ridge_solve`): once the latent (the down-projection) is fixed, the up-projection
  and o_proj are linear least-squares problems, solved in closed form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .inits import FitChoice, LayerRows
from .svd import Source, truncation_error, whitened_factors, whitening


def _psd_sqrt(a: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a positive semi-definite matrix."""
    e, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * e.clamp(min=0).sqrt()) @ v.T


def _damped(c: torch.Tensor, damp: float) -> torch.Tensor:
    return c + damp * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)


def split_mean(cov: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    """The covariance C - mu mu^T (the second moment itself when the mean is unknown)."""
    return cov.double() if mean is None else cov.double() - mean.double()[:, None] * mean.double()[None, :]


def input_map(c_ts: torch.Tensor, c_ss: torch.Tensor, damp: float = 1e-4) -> torch.Tensor:
    """A [D, D] = C_ts (C_ss + damping)^{-1}: W A x_s is the least-squares estimate of W x_t."""
    return torch.linalg.solve(_damped(c_ss.double(), damp), c_ts.double().T).T


def row_metric(rows: LayerRows, src: Source, cov: torch.Tensor, fit: FitChoice,
               energy_cov: torch.Tensor | None = None) -> torch.Tensor:
    """M [G*d_k + G*d_h, same]: block-diagonal weights of the K/V rows (module docstring), logits at the softmax scale
    d_h^-0.5, alpha = fit.key_weight; `cov` the second moment (queries' energy); `energy_cov` the metric the K and V
    energies are balanced in (default `cov`)."""
    if rows.d_k != rows.d_nope:
        raise ValueError("the fitted metric needs the rope-aware layout (only NoPE key dims in the K/V rows)")
    G, H, d_h, d_q, scale, alpha = src.G, src.H, src.d_h, rows.d_q, src.d_h**-0.5, fit.key_weight
    per_group = H // G
    c = cov.double()
    ce = c if energy_cov is None else energy_cov.double()
    energy = lambda m, w: float(torch.einsum("ij,jd,de,ie->", m, w, ce, m @ w) if m is not None  # noqa: E731
                                else torch.einsum("id,de,ie->", w, ce, w))
    blocks = []
    for g in range(G):
        if fit.query_aware:
            q = rows.q_rows.reshape(H, d_q, -1)[g * per_group : (g + 1) * per_group, : rows.d_nope]  # [g, d_nope, D]
            a = scale**2 * torch.einsum("hid,de,hje->ij", q, c, q)
            blocks.append(_psd_sqrt(a))
        else:
            blocks.append(torch.eye(rows.d_nope, dtype=torch.float64))
    for g in range(G):
        if fit.output_aware:
            if src.w_o is None:
                raise ValueError("the output-aware metric needs the source's o_proj (Source.w_o)")
            wo = src.w_o.double().reshape(-1, H, d_h)[:, g * per_group : (g + 1) * per_group]  # [D, g, d_h]
            blocks.append(_psd_sqrt(torch.einsum("dhi,dhj->ij", wo, wo)))
        else:
            blocks.append(torch.eye(d_h, dtype=torch.float64))
    m = torch.block_diag(*blocks)
    n_k = G * rows.d_nope
    w_k, w_v = rows.kv_rows[:n_k].double(), rows.kv_rows[n_k:].double()
    k_gain = (alpha * energy(None, w_k) / max(energy(m[:n_k, :n_k], w_k), 1e-300)) ** 0.5
    v_gain = (energy(None, w_v) / max(energy(m[n_k:, n_k:], w_v), 1e-300)) ** 0.5
    m[:n_k] *= k_gain
    m[n_k:] *= v_gain
    return m


@dataclass(frozen=True)
class FitMetric:
    """Where one layer's latent is chosen and its up-projections fitted."""

    M: torch.Tensor  # [G*d_nope + G*d_h, same]: row metric of the K/V rows (row_metric)
    L: torch.Tensor  # [D, D]: whitening of the input metric both latents (q and kv) are chosen in
    cov_k: torch.Tensor  # [D, D] or [G, D, D]: the input metric the K up-projection is fitted in
    cov_v: torch.Tensor  # the same for V


def fit_metric(rows: LayerRows, src: Source, moments: dict, fit: FitChoice, damp: float) -> FitMetric:
    """The fitted metric of one layer from its input moments {"cov", "mean"} and, when computed, the teacher's
    attention moments {"att_k", "att_v"} (layer_pass.attention_moments; without them: the covariance alone)."""
    cov = moments["cov"]
    cov_k = c_fit = split_mean(cov, moments.get("mean"))
    cov_v = cov
    if fit.attention_metric != "none" and "att_k" in moments:
        cov_k, cov_v = moments["att_k"].double(), moments["att_v"].double()  # [G, D, D]
        if fit.attention_metric == "all":  # the mean of the two over groups, each scaled to unit trace
            k, v = cov_k.mean(0), cov_v.mean(0)
            c_fit = k / k.trace() + v / v.trace()
    M = row_metric(rows, src, cov, fit, energy_cov=c_fit)
    return FitMetric(M, whitening(c_fit, damp), cov_k, cov_v)


def latent(rows: LayerRows, metric: FitMetric, r_kv: int, sigma: str) -> tuple[torch.Tensor, dict]:
    """The K/V latent's down-projection [r_kv, D]: the truncated SVD of the weighted rows M [K; V] in the metric of L;
    and its relative error there."""
    f = whitened_factors(metric.M @ rows.kv_rows, metric.L, r_kv, sigma)
    err = truncation_error(f.singular_values, r_kv)
    return f.down, {"kv_rank": r_kv, "kv_error": err, "kv_energy": 1 - err**2}


def up_projections(rows: LayerRows, down: torch.Tensor, metric: FitMetric, G: int) -> torch.Tensor:
    """[G*d_k + G*d_h, r_kv]: the K and V up-projections for a fixed latent, by least squares in their metrics."""
    n_k = G * rows.d_k
    return torch.cat([grouped_up(rows.kv_rows[:n_k], down, metric.cov_k),
                      grouped_up(rows.kv_rows[n_k:], down, metric.cov_v)])


def least_squares_up(w: torch.Tensor, down: torch.Tensor, cov: torch.Tensor, ridge: float = 1e-9) -> torch.Tensor:
    """up [out, r] minimising E||W x - up down x||^2 over x with E[x x^T] = cov: W C D^T (D C D^T)^{-1}."""
    c = cov.double()
    dc = down.double() @ c  # [r, D]
    return ridge_solve(dc @ down.double().T, dc @ w.double().T, ridge).T


def grouped_up(w: torch.Tensor, down: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """`least_squares_up` with one metric for all rows (cov [D, D]) or one per KV group (cov [G, D, D]: the rows
    of W are G equal blocks, block g fitted in cov[g])."""
    if cov.dim() == 2:
        return least_squares_up(w, down, cov)
    return torch.cat([least_squares_up(b, down, c) for b, c in zip(w.chunk(cov.shape[0]), cov)])


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, ridge: float,
                prior: torch.Tensor | None = None) -> torch.Tensor:
    """Least squares from its normal equations, pulled towards `prior` (default 0):
    X = (gram + lam I)^{-1} (cross + lam prior), lam = ridge * mean(diag gram)."""
    lam = ridge * float(gram.diagonal().mean())
    rhs = cross.double() if prior is None else cross.double() + lam * prior.double()
    return torch.linalg.solve(_damped(gram.double(), ridge), rhs)
