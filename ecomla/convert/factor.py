"""One MLA layer from one source layer: what an init factors (`plan_layer`) and the MLA weights (`factor_layer`).

    plan = plan_layer(method, src, d_rope, d_nope, stats, inv_freq)  # the rows to factor, in which metric
    tensors, report = factor_layer(plan, r_q, r_kv, sigma)             # MLA weights by nn.Linear name

Every factored init takes the same path; the `InitMethod` (inits.py) only decides the rows (Algorithm 1's
layout or the rope-aware one), the metric (weights, or whitened activations) and the K/V balance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import fit, svd
from .inits import InitMethod, LayerRows, algorithm1_rows, rope_aware_rows, rope_pairs


@dataclass(frozen=True)
class LayerPlan:
    method: InitMethod
    src: svd.Source
    rows: LayerRows
    L: torch.Tensor | None = None  # whitening of the layer input (None = plain weight SVD)
    k_scale: float = 1.0  # K rows are multiplied by this before the joint factorisation (K/V balance)
    M: torch.Tensor | None = None  # row metric of the K/V factorisation (the fitted init, fit.row_metric)
    cov: torch.Tensor | None = None  # C of the layer input: the V up-projection is refitted in it when M is set
    cov_k: torch.Tensor | None = None  # the covariance (mean removed): the K up-projection is refitted in it
    #                                   (both [G, D, D], one per KV group, with FitChoice.attention_metric)

    @property
    def n_k(self) -> int:
        """Number of K rows in rows.kv_rows."""
        return self.src.G * self.rows.d_k

    def kv_matrix(self) -> torch.Tensor:
        """The joint matrix that is factored: [K; V], K rows scaled by k_scale."""
        m, n_k = self.rows.kv_rows, self.n_k
        return torch.cat([m[:n_k] * self.k_scale, m[n_k:]]) if self.k_scale != 1.0 else m

    def kv_spectrum(self) -> torch.Tensor:
        """Singular values of the factored K/V matrix, in the plan's metric (what ranks are chosen from)."""
        return svd.whitened_svd(self.weighted_kv(), self.L)[1]

    def weighted_kv(self) -> torch.Tensor:
        return self.kv_matrix() if self.M is None else self.M @ self.kv_matrix()

    def q_spectrum(self) -> torch.Tensor:
        return svd.whitened_svd(self.rows.q_rows, self.L)[1]


def balanced_k_scale(rows: LayerRows, n_k: int, L: torch.Tensor | None) -> float:
    """TransMLA-style K/V balance: the scale that gives K the energy of V (in the metric of L)."""
    if n_k == 0:
        return 1.0
    m = rows.kv_rows
    e = lambda w: (w @ L).norm() if L is not None else w.norm()  # noqa: E731
    return float(e(m[n_k:]) / e(m[:n_k]))


def plan_layer(method: InitMethod, src: svd.Source, d_rope: int, d_nope: int, stats: dict | None = None,
               inv_freq: torch.Tensor | None = None, pairs: list[int] | None = None,
               key_weight: float | None = None) -> LayerPlan:
    """The plan of one layer. `stats`: calibration statistics {"cov": C [D, D]} (method.needs_calibration);
    `inv_freq`: the source's rotary frequencies [d_h/2]; d_nope is ignored by the rope-aware layout (all
    non-rotary dims are NoPE); `pairs`: the rotary pairs to keep (default: chosen by method.rope.select);
    `key_weight`: the fitted metric's alpha (default: the first of method.fit.key_weights)."""
    cov = stats["cov"] if stats is not None else None
    L_act = svd.whitening(cov, method.damp) if cov is not None else None
    if method.rope is None:
        rows = algorithm1_rows(src, d_nope, d_rope)
    else:
        if pairs is None:
            pairs = rope_pairs(src, d_rope // 2, cov, method.rope.select, inv_freq, method.rope.distance)
        rows = rope_aware_rows(src, pairs, L_act, method.rope.key_fit)
    L = L_act if method.whiten else None
    k_scale = balanced_k_scale(rows, src.G * rows.d_k, L) if method.kv_balance else 1.0
    if method.fit is None:
        return LayerPlan(method, src, rows, L, k_scale)
    mean = stats.get("mean")
    cov_k = fit.split_mean(cov, mean)
    c_fit = cov_k if mean is None else cov_k + method.fit.mean_weight * torch.outer(mean.double(), mean.double())
    cov_v = cov
    if method.fit.attention_metric != "none" and "att_k" in stats:  # from the fitting pass (sequential.py); the
        # first plan, which only sizes the layers, has the calibration moments alone
        cov_k, cov_v = stats["att_k"].double(), stats["att_v"].double()  # [G, D, D]
        if method.fit.attention_metric == "all":
            c_fit = fit.attention_fit_metric(stats)
    alpha = method.fit.key_weights[0] if key_weight is None else key_weight
    M = fit.row_metric(rows, src, cov, method.fit, src.d_h**-0.5, alpha, energy_cov=c_fit)
    return LayerPlan(method, src, rows, svd.whitening(c_fit, method.damp), k_scale, M=M, cov=cov_v, cov_k=cov_k)


def factor_layer(plan: LayerPlan, r_q: int | None, r_kv: int, sigma: str) -> tuple[dict, dict]:
    """MLA tensors (names relative to self_attn) and a report with relative errors in the factored metric."""
    rows, src = plan.rows, plan.src
    out, rep = {}, {"metric": "activations" if plan.L is not None else "weights", "rope_pairs": rows.pairs}
    q_heads = lambda w: svd.select_head_dims(w, src.H, rows.d_q, rows.d_nope, rows.d_rope)  # noqa: E731
    if r_q is None:
        out["q_proj.weight"] = q_heads(rows.q_rows)
        rep.update(q_rank=None, q_error=0.0)
    else:  # factor first, select head dims after (Algorithm 1's order)
        fq = svd.whitened_factors(rows.q_rows, plan.L, r_q, sigma)
        out["q_a_proj.weight"], out["q_b_proj.weight"] = fq.down, q_heads(fq.up)
        rep.update(q_rank=r_q, q_error=svd.truncation_error(fq.singular_values, r_q))
    if rows.q_bias is not None:
        out["q_proj.bias" if r_q is None else "q_b_proj.bias"] = q_heads(rows.q_bias)

    fkv = svd.whitened_factors(plan.weighted_kv(), plan.L, r_kv, sigma)
    if plan.M is not None:  # the latent is fitted in the weighted metric; the up-projection by least squares
        n_k = plan.n_k
        up = torch.cat([fit.grouped_up(rows.kv_rows[:n_k], fkv.down, plan.cov_k),
                        fit.grouped_up(rows.kv_rows[n_k:], fkv.down, plan.cov)])
    else:
        up = torch.cat([fkv.up[: plan.n_k] / plan.k_scale, fkv.up[plan.n_k :]])  # [G*d_k + G*d_h, r_kv]
    kv_heads = lambda w: svd.kv_up_rows(w, src.G, src.H, rows.d_k, rows.d_nope)  # noqa: E731
    out["kv_a_proj_with_mqa.weight"] = torch.cat([fkv.down, rows.w_kr])
    out["kv_b_proj.weight"] = kv_heads(up)
    if rows.kv_bias is not None:
        out["kv_a_proj_with_mqa.bias"] = torch.cat([torch.zeros(r_kv, dtype=torch.float64), rows.b_kr])
        out["kv_b_proj.bias"] = kv_heads(rows.kv_bias)
    err = svd.truncation_error(fkv.singular_values, r_kv)
    rep.update(kv_rank=r_kv, kv_error=err, kv_energy=1 - err**2, k_scale=plan.k_scale,
               metric="fitted" if plan.M is not None else rep["metric"])
    return out, rep
