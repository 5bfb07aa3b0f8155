"""One MLA layer from one source layer, for each named init (the dispatch between svd.py and inits.py).

    plan = plan_layer(init, src, d_rope, d_nope, d_v, stats)    # what will be factored (and its spectrum)
    tensors, report = factor_layer(plan, r_q, r_kv, sigma)        # MLA weights by nn.Linear name

Inits:
- xecomla:       the paper's Algorithm 1 (svd.py).
- whitened:      Algorithm 1's dims (last d_rope dims, head-averaged rotary key, fresh frequencies), but both
                 factorisations minimise the error of the projected activations.
- rope-aware:    whole source frequency pairs chosen by contribution, a shared rotary key fitted across KV
                 heads, rotary K dims excluded from the [K_nope; V] latent; plain SVD factorisations.
- rope-whitened: rope-aware + whitened factorisations.
- random:        no factorisation (weights drawn at materialisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import inits, svd

INITS = ("xecomla", "random", "whitened", "rope-aware", "rope-whitened")
NEEDS_CALIBRATION = ("whitened", "rope-aware", "rope-whitened")


@dataclass
class LayerPlan:
    init: str
    src: svd.Source
    d_rope: int
    d_nope: int
    d_v: int
    L: torch.Tensor | None = None  # whitening of the layer input (None = plain weight SVD)
    rope: inits.RopeAwareLayer | None = None
    kv_spectrum: torch.Tensor | None = None  # singular values of the factored K/V matrix (in its metric)
    k_scale: float = 1.0  # K rows are multiplied by this before the joint factorisation (K/V balance)

    @property
    def rope_pairs(self) -> list[int] | None:
        return self.rope.pairs if self.rope is not None else None

    def kv_matrix(self) -> torch.Tensor:
        """The joint matrix that is factored: [K_nope; V] (rope-aware) or [K; V], K rows scaled by k_scale."""
        m = self.rope.kv_rows if self.rope is not None else self.src.w_kv.double()
        n_k = self.src.G * (self.rope.d_nope if self.rope is not None else self.src.d_h)
        return torch.cat([m[:n_k] * self.k_scale, m[n_k:]]) if self.k_scale != 1.0 else m

    def balance(self) -> None:
        """TransMLA-style K/V balance: scale K so K and V carry equal energy (in this plan's metric)."""
        m = self.rope.kv_rows if self.rope is not None else self.src.w_kv.double()
        n_k = self.src.G * (self.rope.d_nope if self.rope is not None else self.src.d_h)
        if n_k == 0:
            return
        e = lambda w: (w @ self.L).norm() if self.L is not None else w.norm()  # noqa: E731
        self.k_scale = float(e(m[n_k:]) / e(m[:n_k]))

    def q_matrix(self) -> torch.Tensor:
        if self.rope is not None:
            return self.rope.q_rows
        return svd.select_head_dims(self.src.w_q.double(), self.src.H, self.src.d_h, self.d_nope, self.d_rope)


def plan_layer(init: str, src: svd.Source, d_rope: int, d_nope: int, d_v: int, stats: dict | None = None,
               damp: float = 1e-4, rope_rule: str = "contribution", key_fit: str = "pca",
               kv_balance: bool = False, inv_freq: torch.Tensor | None = None, rope_distance: int = 512) -> LayerPlan:
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose from {INITS}")
    plan = LayerPlan(init, src, d_rope, d_nope, d_v)
    if init == "random":
        return plan
    whiten = init in ("whitened", "rope-whitened")
    L_act = inits.whitening(stats["cov"], damp) if stats is not None else None
    plan.L = L_act if whiten else None
    if init.startswith("rope"):
        cov = stats["cov"] if stats is not None else None
        pairs = inits.rope_pairs(src, d_rope // 2, cov, rope_rule, inv_freq, rope_distance)
        plan.rope = inits.rope_aware_layer(src, pairs, L_act, key_fit)
        plan.d_nope = plan.rope.d_nope
    if kv_balance:
        plan.balance()
    plan.kv_spectrum = inits.whitened_svd(plan.kv_matrix(), plan.L)[1]
    return plan


def factor_layer(plan: LayerPlan, r_q: int | None, r_kv: int, sigma: str) -> tuple[dict, dict]:
    """MLA tensors (names relative to self_attn) and a report with relative errors in the factored metric."""
    src = plan.src
    if plan.init == "xecomla":
        q, q_rep = svd.xecomla_query(src, r_q, plan.d_nope, plan.d_rope, sigma)
        kv, kv_rep = svd.xecomla_kv(src, r_kv, plan.d_nope, plan.d_rope, plan.d_v, sigma)
        return {**q, **kv}, {**q_rep, **kv_rep, "metric": "weights"}
    out, rep = {}, {"metric": "activations" if plan.L is not None else "weights", "rope_pairs": plan.rope_pairs}
    q_rows = plan.q_matrix()
    q_bias = plan.rope.q_bias if plan.rope is not None else (
        None if src.b_q is None else svd.select_head_dims(src.b_q, src.H, src.d_h, plan.d_nope, plan.d_rope))
    if r_q is None:
        out["q_proj.weight"] = q_rows
        rep.update(q_rank=None, q_error=0.0)
    else:
        fq = inits.whitened_factors(q_rows, plan.L, r_q, sigma)
        out["q_a_proj.weight"], out["q_b_proj.weight"] = fq.down, fq.up
        rep.update(q_rank=r_q, q_error=svd.truncation_error(fq.singular_values, r_q))
    if q_bias is not None:
        out["q_proj.bias" if r_q is None else "q_b_proj.bias"] = q_bias
    fkv = inits.whitened_factors(plan.kv_matrix(), plan.L, r_kv, sigma)
    G, H, d_h = src.G, src.H, src.d_h
    n_k = G * (plan.d_nope if plan.rope is not None else d_h)
    fkv.up = torch.cat([fkv.up[:n_k] / plan.k_scale, fkv.up[n_k:]])  # undo the K/V balance
    if plan.rope is not None:
        kv_b = inits.kv_up_rows(fkv.up, G, H, plan.d_nope, plan.d_v)
        w_kr, b_kr, kv_bias = plan.rope.w_kr, plan.rope.b_kr, plan.rope.kv_bias
        kv_b_bias = None if kv_bias is None else inits.kv_up_bias(kv_bias, G, H, plan.d_nope, plan.d_v)
    else:  # Algorithm 1's layout: factor all of [K; V], keep the first d_nope K dims of each head
        up_k = svd.repeat_heads(fkv.up[: G * d_h], G, H).reshape(H, d_h, r_kv)[:, : plan.d_nope]
        up_v = svd.repeat_heads(fkv.up[G * d_h :], G, H).reshape(H, d_h, r_kv)
        kv_b = torch.cat([up_k, up_v], dim=1).reshape(-1, r_kv)
        w_kr = src.w_k.double().reshape(G, d_h, -1).mean(0)[d_h - plan.d_rope :]
        b_kr = kv_b_bias = None
        if src.b_k is not None:
            b_kr = src.b_k.double().reshape(G, d_h).mean(0)[d_h - plan.d_rope :]
            bk = svd.repeat_heads(src.b_k.double(), G, H).reshape(H, d_h)[:, : plan.d_nope]
            kv_b_bias = torch.cat([bk, svd.repeat_heads(src.b_v.double(), G, H).reshape(H, d_h)], 1).reshape(-1)
    out["kv_a_proj_with_mqa.weight"] = torch.cat([fkv.down, w_kr])
    out["kv_b_proj.weight"] = kv_b
    if kv_b_bias is not None:
        out["kv_a_proj_with_mqa.bias"] = torch.cat([torch.zeros(r_kv, dtype=torch.float64), b_kr])
        out["kv_b_proj.bias"] = kv_b_bias
    err = svd.truncation_error(fkv.singular_values, r_kv)
    rep.update(kv_rank=r_kv, kv_error=err, kv_energy=1 - err**2, k_scale=plan.k_scale)
    return out, rep
