"""Tensor math of the conversion (ecomla/convert/svd.py) and Algorithm 1 through the one factoring path."""

import pytest
import torch

from ecomla.convert import svd
from ecomla.convert.factor import factor_layer, plan_layer
from ecomla.convert.inits import INITS
from ecomla.mla.config import SourceShape


def _source(H=4, G=2, d_h=8, D=48, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return svd.Source(w_q=r(H * d_h, D), w_k=r(G * d_h, D), w_v=r(G * d_h, D),
                      b_q=r(H * d_h) if bias else None, b_k=r(G * d_h) if bias else None,
                      b_v=r(G * d_h) if bias else None, H=H, G=G, d_h=d_h)


def xecomla(src, r_q, r_kv, d_nope, d_rope, sigma="up"):
    """MLA tensors and report of `--init xecomla` (paper Algorithm 1) for one layer."""
    return factor_layer(plan_layer(INITS["xecomla"], src, d_rope, d_nope), r_q, r_kv, sigma)


@pytest.mark.parametrize("sigma", ["up", "down"])
def test_full_rank_rebuilds_q(sigma):
    src = _source()
    q, rep = xecomla(src, r_q=min(src.w_q.shape), r_kv=4, d_nope=src.d_h, d_rope=8, sigma=sigma)
    # d_nope = d_h and d_rope = d_h: each head's rows are [all dims ; all dims]; check the NoPE copy.
    w = (q["q_b_proj.weight"] @ q["q_a_proj.weight"]).reshape(src.H, 2 * src.d_h, -1)[:, : src.d_h].reshape(-1, 48)
    assert torch.linalg.norm(w - src.w_q) / torch.linalg.norm(src.w_q) < 1e-5
    assert rep["q_error"] < 1e-6


@pytest.mark.parametrize("sigma", ["up", "down"])
def test_full_rank_rebuilds_kv(sigma):
    src = _source()
    r_full = 2 * src.G * src.d_h
    kv, rep = xecomla(src, None, r_full, d_nope=src.d_h, d_rope=4, sigma=sigma)
    down = kv["kv_a_proj_with_mqa.weight"][:r_full]
    up = kv["kv_b_proj.weight"].reshape(src.H, 2 * src.d_h, r_full)
    k = (up[:, : src.d_h] @ down).reshape(-1, down.shape[1])
    v = (up[:, src.d_h :] @ down).reshape(-1, down.shape[1])
    want_k, want_v = svd.repeat_heads(src.w_k, src.G, src.H), svd.repeat_heads(src.w_v, src.G, src.H)
    got, want = torch.cat([k, v]), torch.cat([want_k, want_v])
    assert torch.linalg.norm(got - want) / torch.linalg.norm(want) < 1e-5
    assert rep["kv_error"] < 1e-6


def test_error_falls_monotonically_with_rank():
    src = _source(D=64)
    errs = [xecomla(src, None, r, 4, 4)[1]["kv_error"] for r in range(1, 33)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    qerrs = [xecomla(src, r, 4, 4, 4)[1]["q_error"] for r in (1, 4, 8, 16, 32)]
    assert all(a > b for a, b in zip(qerrs, qerrs[1:]))


def test_unrepeated_svd_equals_literal_algorithm_1():
    """Factoring [K;V] before repeating heads gives the same product as the paper's repeated SVD, and the query
    is factored whole before its head dims are selected (the paper's order, also when d_nope + d_rope < d_h)."""
    src = _source(H=6, G=2)
    r, r_q, d_nope, d_rope = 10, 12, 3, 3
    out, _ = xecomla(src, r_q, r, d_nope, d_rope)
    ours = out["kv_b_proj.weight"] @ out["kv_a_proj_with_mqa.weight"][:r]
    # literal Algorithm 1: repeat K/V to H heads, one SVD, slice per head
    rep = torch.cat([svd.repeat_heads(src.w_k, src.G, src.H), svd.repeat_heads(src.w_v, src.G, src.H)])
    u, s, vh = torch.linalg.svd(rep, full_matrices=False)
    up = u[:, :r] * s[:r]
    k = up[: src.H * src.d_h].reshape(src.H, src.d_h, r)[:, :d_nope]
    v = up[src.H * src.d_h :].reshape(src.H, src.d_h, r)
    literal = torch.cat([k, v], 1).reshape(-1, r) @ vh[:r]
    assert torch.allclose(ours, literal, atol=1e-9)
    w_kr = src.w_k.reshape(src.G, src.d_h, -1).mean(0)[-d_rope:]
    assert torch.allclose(out["kv_a_proj_with_mqa.weight"][r:], w_kr)
    u, s, vh = torch.linalg.svd(src.w_q, full_matrices=False)
    q_up = svd.select_head_dims(u[:, :r_q] * s[:r_q], src.H, src.d_h, d_nope, d_rope)
    assert torch.allclose(out["q_b_proj.weight"] @ out["q_a_proj.weight"], q_up @ vh[:r_q], atol=1e-9)


def test_kv_up_rows_treats_both_layouts_and_biases_alike():
    """Keeping the first d_nope of all d_h factored K dims equals factoring only those d_nope dims."""
    G, H, d_h, d_nope, r = 2, 6, 8, 3, 5
    w = torch.randn(2 * G * d_h, r, dtype=torch.float64)
    nope_rows = torch.cat([w[: G * d_h].reshape(G, d_h, r)[:, :d_nope].reshape(-1, r), w[G * d_h :]])
    full = svd.kv_up_rows(w, G, H, d_h, d_nope)
    assert full.shape == (H * (d_nope + d_h), r)
    assert torch.equal(full, svd.kv_up_rows(nope_rows, G, H, d_nope, d_nope))
    assert torch.equal(svd.kv_up_rows(w[:, 0], G, H, d_h, d_nope), full[:, 0])  # a bias takes the same rows
    heads = full.reshape(H, d_nope + d_h, r)
    assert torch.equal(heads[5, d_nope:], w[G * d_h + d_h :].reshape(d_h, r))  # head 5 reads KV head 1's V


def test_biases_are_carried():
    src = _source(bias=True)
    out, _ = xecomla(src, 16, 12, 5, 3)
    assert torch.allclose(out["q_b_proj.bias"], svd.select_head_dims(src.b_q, src.H, src.d_h, 5, 3))
    b = out["kv_b_proj.bias"].reshape(src.H, 5 + src.d_h)
    assert torch.allclose(b[:, :5], svd.repeat_heads(src.b_k, src.G, src.H).reshape(src.H, -1)[:, :5])
    assert torch.allclose(b[:, 5:], svd.repeat_heads(src.b_v, src.G, src.H).reshape(src.H, -1))
    assert torch.allclose(out["kv_a_proj_with_mqa.bias"][12:], src.b_k.reshape(src.G, -1).mean(0)[-3:])


def test_energy_rank_and_parity_rule():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert svd.energy_rank(s, 0.5) == 1 and svd.energy_rank(s, 0.9) == 2 and svd.energy_rank(s, 1.0) == 3
    with pytest.raises(ValueError, match="rank-energy"):
        svd.energy_rank(s, 1.5)
    # SmolLM2-135M (D 576, 9 heads, 3 KV heads, d_h 64) at 2x / 4x / 8x: r_q 264 / 384 / 444
    smollm2 = SourceShape(hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64, num_layers=30)
    assert [smollm2.parity_q_rank(r, 32, 32, 64) for r in (160, 64, 16)] == [264, 384, 444]


def test_sigma_placement_changes_scale_not_product():
    src = _source()
    up, _ = xecomla(src, None, 6, 4, 4, "up")
    down, _ = xecomla(src, None, 6, 4, 4, "down")
    prod = lambda kv: kv["kv_b_proj.weight"] @ kv["kv_a_proj_with_mqa.weight"][:6]  # noqa: E731
    assert torch.allclose(prod(up), prod(down), atol=1e-9)
    assert not torch.allclose(up["kv_a_proj_with_mqa.weight"], down["kv_a_proj_with_mqa.weight"])
