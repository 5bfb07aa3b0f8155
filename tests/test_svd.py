"""Tensor math of the conversion (ecomla/convert/svd.py)."""

import pytest
import torch

from ecomla.convert import svd


def _source(H=4, G=2, d_h=8, D=48, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return svd.Source(w_q=r(H * d_h, D), w_k=r(G * d_h, D), w_v=r(G * d_h, D),
                      b_q=r(H * d_h) if bias else None, b_k=r(G * d_h) if bias else None,
                      b_v=r(G * d_h) if bias else None, H=H, G=G, d_h=d_h)


@pytest.mark.parametrize("sigma", ["up", "down"])
def test_full_rank_rebuilds_q(sigma):
    src = _source()
    q, rep = svd.xecomla_query(src, r_q=min(src.w_q.shape), d_nope=src.d_h, d_rope=0 or 8, sigma=sigma)
    # d_nope = d_h and d_rope = d_h: each head's rows are [all dims ; all dims]; check the NoPE copy.
    w = (q["q_b_proj.weight"] @ q["q_a_proj.weight"]).reshape(src.H, 2 * src.d_h, -1)[:, : src.d_h].reshape(-1, 48)
    assert torch.linalg.norm(w - src.w_q) / torch.linalg.norm(src.w_q) < 1e-5
    assert rep["q_error"] < 1e-6


@pytest.mark.parametrize("sigma", ["up", "down"])
def test_full_rank_rebuilds_kv(sigma):
    src = _source()
    r_full = 2 * src.G * src.d_h
    kv, rep = svd.xecomla_kv(src, r_full, d_nope=src.d_h, d_rope=4, d_v=src.d_h, sigma=sigma)
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
    errs = [svd.xecomla_kv(src, r, 4, 4, src.d_h, "up")[1]["kv_error"] for r in range(1, 33)]
    assert all(a > b for a, b in zip(errs, errs[1:]))
    qerrs = [svd.xecomla_query(src, r, 4, 4, "up")[1]["q_error"] for r in (1, 4, 8, 16, 32)]
    assert all(a > b for a, b in zip(qerrs, qerrs[1:]))


def test_unrepeated_svd_equals_literal_algorithm_1():
    """Factoring [K;V] before repeating heads gives the same product as the paper's repeated SVD."""
    src = _source(H=6, G=2)
    r, d_nope, d_rope = 10, 5, 3
    kv, _ = svd.xecomla_kv(src, r, d_nope, d_rope, src.d_h, "up")
    ours = kv["kv_b_proj.weight"] @ kv["kv_a_proj_with_mqa.weight"][:r]
    # literal Algorithm 1: repeat K/V to H heads, one SVD, slice per head
    rep = torch.cat([svd.repeat_heads(src.w_k, src.G, src.H), svd.repeat_heads(src.w_v, src.G, src.H)])
    u, s, vh = torch.linalg.svd(rep, full_matrices=False)
    up = u[:, :r] * s[:r]
    k = up[: src.H * src.d_h].reshape(src.H, src.d_h, r)[:, :d_nope]
    v = up[src.H * src.d_h :].reshape(src.H, src.d_h, r)
    literal = torch.cat([k, v], 1).reshape(-1, r) @ vh[:r]
    assert torch.allclose(ours, literal, atol=1e-9)
    w_kr = src.w_k.reshape(src.G, src.d_h, -1).mean(0)[-d_rope:]
    assert torch.allclose(kv["kv_a_proj_with_mqa.weight"][r:], w_kr)


def test_biases_are_carried():
    src = _source(bias=True)
    q, _ = svd.xecomla_query(src, 16, 5, 3, "up")
    assert torch.allclose(q["q_b_proj.bias"], svd.select_head_dims(src.b_q, src.H, src.d_h, 5, 3))
    kv, _ = svd.xecomla_kv(src, 12, 5, 3, src.d_h, "up")
    b = kv["kv_b_proj.bias"].reshape(src.H, 5 + src.d_h)
    assert torch.allclose(b[:, :5], svd.repeat_heads(src.b_k, src.G, src.H).reshape(src.H, -1)[:, :5])
    assert torch.allclose(b[:, 5:], svd.repeat_heads(src.b_v, src.G, src.H).reshape(src.H, -1))
    assert torch.allclose(kv["kv_a_proj_with_mqa.bias"][12:], src.b_k.reshape(src.G, -1).mean(0)[-3:])


def test_energy_rank_and_parity_rule():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert svd.energy_rank(s, 0.5) == 1 and svd.energy_rank(s, 0.9) == 2 and svd.energy_rank(s, 1.0) == 3
    with pytest.raises(ValueError, match="rank-energy"):
        svd.energy_rank(s, 1.5)
    # SmolLM2-135M numbers from method/init-findings.md: 2x -> 264, 4x -> 384, 8x -> 444
    assert [svd.parity_q_rank(576, 9, 3, 64, r, 32, 32, 64) for r in (160, 64, 16)] == [264, 384, 444]


def test_sigma_placement_changes_scale_not_product():
    src = _source()
    up, _ = svd.xecomla_kv(src, 6, 4, 4, src.d_h, "up")
    down, _ = svd.xecomla_kv(src, 6, 4, 4, src.d_h, "down")
    prod = lambda kv: kv["kv_b_proj.weight"] @ kv["kv_a_proj_with_mqa.weight"][:6]  # noqa: E731
    assert torch.allclose(prod(up), prod(down), atol=1e-9)
    assert not torch.allclose(up["kv_a_proj_with_mqa.weight"], down["kv_a_proj_with_mqa.weight"])
