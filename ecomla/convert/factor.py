"""One MLA layer from one source layer: what an init factors (`plan_layer`) and the MLA weights (`factor_layer`).

    plan = plan_layer(method, src, d_rope, d_nope, stats, inv_freq)  # the rows to factor, in which metric
    tensors, report = factor_layer(plan, r_q, r_kv, sigma)             # MLA weights by nn.Linear name

Every factored init takes the same path; the `InitMethod` (inits.py) only decides the rows (Algorithm 1's
layout or the rope-aware one) and the metric (weights, or whitened activations). The fitted init plans here too
(rotary pairs; spectra for --rank-energy) but factors in its own pass (fitted.py), with `q_tensors`, `kv_tensors`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import fit, svd
from .inits import InitMethod, LayerRows, algorithm1_rows, rope_aware_rows, rope_pairs


@dataclass(frozen=True)
class LayerPlan:
    src: svd.Source
    rows: LayerRows
    L: torch.Tensor | None = None  # whitening of the layer input (None = plain weight SVD)
    M: torch.Tensor | None = None  # row metric of the K/V factorisation (the fitted init, fit.row_metric)

    def kv_spectrum(self) -> torch.Tensor:
        """Singular values of the factored K/V matrix, in the plan's metric (what ranks are chosen from)."""
        kv = self.rows.kv_rows if self.M is None else self.M @ self.rows.kv_rows
        return svd.whitened_svd(kv, self.L)[1]

    def q_spectrum(self) -> torch.Tensor:
        return svd.whitened_svd(self.rows.q_rows, self.L)[1]


def plan_layer(method: InitMethod, src: svd.Source, d_rope: int, d_nope: int, stats: dict | None = None,
               inv_freq: torch.Tensor | None = None, pairs: list[int] | None = None) -> LayerPlan:
    """The plan of one layer. `stats`: calibration statistics {"cov": C [D, D], "mean": E[x] [D]}
    (method.needs_calibration); `inv_freq`: the source's rotary frequencies [d_h/2]; d_nope is ignored by the
    rope-aware layout (all non-rotary dims are NoPE); `pairs`: the rotary pairs to keep (default: chosen by
    method.rope.select). The fitted init's plan is in its metric without the teacher's attention (fit.fit_metric)."""
    cov = stats["cov"] if stats is not None else None
    L_act = svd.whitening(cov, method.damp) if cov is not None else None
    if method.rope is None:
        rows = algorithm1_rows(src, d_nope, d_rope)
    else:
        if pairs is None:
            pairs = rope_pairs(src, d_rope // 2, cov, method.rope.select, inv_freq, method.rope.distance)
        rows = rope_aware_rows(src, pairs, L_act, method.rope.key_fit)
    if method.fit is None:
        return LayerPlan(src, rows, L_act if method.whiten else None)
    metric = fit.fit_metric(rows, src, stats, method.fit, method.damp)
    return LayerPlan(src, rows, metric.L, metric.M)


def factor_layer(plan: LayerPlan, r_q: int | None, r_kv: int, sigma: str) -> tuple[dict, dict]:
    """MLA tensors (names relative to self_attn) and a report with relative errors in the factored metric."""
    out, rep = q_tensors(plan.rows, plan.src.H, plan.L, r_q, sigma)
    fkv = svd.whitened_factors(plan.rows.kv_rows, plan.L, r_kv, sigma)
    out |= kv_tensors(plan.rows, plan.src, fkv.down, fkv.up)
    err = svd.truncation_error(fkv.singular_values, r_kv)
    rep.update(metric="activations" if plan.L is not None else "weights", rope_pairs=plan.rows.pairs, kv_rank=r_kv,
               kv_error=err, kv_energy=1 - err**2)
    return out, rep


def q_tensors(rows: LayerRows, H: int, L: torch.Tensor | None, r_q: int | None, sigma: str) -> tuple[dict, dict]:
    """The query projections (factored in the metric of L unless r_q is None) and their report."""
    q_heads = lambda w: svd.select_head_dims(w, H, rows.d_q, rows.d_nope, rows.d_rope)  # noqa: E731
    out = {}
    if r_q is None:
        out["q_proj.weight"] = q_heads(rows.q_rows)
        rep = {"q_rank": None, "q_error": 0.0}
    else:  # factor first, select head dims after (Algorithm 1's order)
        fq = svd.whitened_factors(rows.q_rows, L, r_q, sigma)
        out["q_a_proj.weight"], out["q_b_proj.weight"] = fq.down, q_heads(fq.up)
        rep = {"q_rank": r_q, "q_error": svd.truncation_error(fq.singular_values, r_q)}
    if rows.q_bias is not None:
        out["q_proj.bias" if r_q is None else "q_b_proj.bias"] = q_heads(rows.q_bias)
    return out, rep


def kv_tensors(rows: LayerRows, src: svd.Source, down: torch.Tensor, up: torch.Tensor) -> dict:
    """kv_a_proj_with_mqa ([latent down-projection; shared rotary key]) and kv_b_proj (up [G*d_k + G*d_h, r_kv],
    every KV head repeated to its query heads), with their biases."""
    kv_heads = lambda w: svd.kv_up_rows(w, src.G, src.H, rows.d_k, rows.d_nope)  # noqa: E731
    out = {"kv_a_proj_with_mqa.weight": torch.cat([down, rows.w_kr]), "kv_b_proj.weight": kv_heads(up)}
    if rows.kv_bias is not None:
        out["kv_a_proj_with_mqa.bias"] = torch.cat([torch.zeros(down.shape[0], dtype=torch.float64), rows.b_kr])
        out["kv_b_proj.bias"] = kv_heads(rows.kv_bias)
    return out
