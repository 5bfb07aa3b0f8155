"""RoPE-aware and activation-aware inits, and calibration."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import ecomla  # noqa: F401
from ecomla.common import UserError
from ecomla.convert import inits, svd
from ecomla.convert.convert import ConvertArgs, convert
from ecomla.convert.inits import INITS, InitMethod, RopeChoice
from tests.helpers import make_source
from tests.test_data_eval import chat_rows


def _cov(D=24, n=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64) @ torch.randn(D, D, generator=g, dtype=torch.float64)
    return x, x.T @ x / n


def test_whitened_full_rank_reproduces_activations():
    x, cov = _cov()
    w = torch.randn(40, 24, dtype=torch.float64)
    f = svd.whitened_factors(w, svd.whitening(cov, damp=0.0), rank=24)
    assert torch.allclose(x @ (f.up @ f.down).T, x @ w.T, atol=1e-8)


def test_whitened_beats_weight_svd_on_activation_error():
    x, cov = _cov()
    w = torch.randn(40, 24, dtype=torch.float64)
    act_err = lambda f: ((x @ (w - f.up @ f.down).T) ** 2).sum()  # noqa: E731
    u, s, vh = svd.svd(w)
    plain = svd.truncate(u, s, vh, 6)
    white = svd.whitened_factors(w, svd.whitening(cov), 6)
    assert act_err(white) < act_err(plain)


def test_whitening_handles_rank_deficient_covariance():
    x = torch.randn(5, 16, dtype=torch.float64)  # 5 samples in 16 dims: singular
    L = svd.whitening(x.T @ x / 5)
    assert torch.isfinite(L).all()


def test_every_init_name_has_a_typed_description():
    import dataclasses

    init_field = next(f for f in dataclasses.fields(ConvertArgs) if f.name == "init")
    assert init_field.metadata["choices"] == tuple(INITS)
    assert set(INITS) == {"xecomla", "random", "whitened", "rope-aware", "rope-whitened", "fitted"}
    xe, rnd, wh, ra, rw = (INITS[n] for n in ("xecomla", "random", "whitened", "rope-aware", "rope-whitened"))
    assert xe == InitMethod() and xe.factored and not xe.whiten and xe.rope is None and not xe.needs_calibration
    assert not rnd.factored and not rnd.needs_calibration
    assert wh.whiten and wh.rope is None and wh.needs_calibration
    assert not ra.whiten and ra.rope == RopeChoice() and ra.needs_calibration
    assert rw.whiten and rw.rope == RopeChoice()
    base = dict(src="s", out="o", kv_rank=8)
    args = ConvertArgs(**base, init="rope-aware", rope_select="high", rope_distance=64, rope_key_fit="mean", damp=0.1)
    assert args.method == InitMethod(rope=RopeChoice("high", 64, "mean"), damp=0.1)
    assert ConvertArgs(**base, init="whitened", rope_select="high").method == InitMethod(whiten=True)
    for bad, flag in ((dict(init="bogus"), "--init"), (dict(init="rope-whitened", nope_dim=4), "--nope-dim"),
                      (dict(q_rank="many"), "--q-rank")):
        with pytest.raises(UserError, match=flag):
            ConvertArgs(**base, **bad)


def test_no_code_dispatches_on_the_init_name():
    """Outside the INITS table, conversion code asks the InitMethod, never the name: no comparison with a name,
    no `init` parameter, no reading `args.init` beyond ConvertArgs.__post_init__ (the table lookup)."""
    import ast
    from pathlib import Path

    import ecomla.convert

    def names(node):
        return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]

    found = []
    for path in Path(ecomla.convert.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        allowed = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "__post_init__"
                   for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(v in INITS for v in names(node)):
                found.append(f"{path.name}:{node.lineno} compares with an init name")
            if isinstance(node, ast.arg) and node.arg == "init":
                found.append(f"{path.name}:{node.lineno} takes the init name as a parameter")
            if isinstance(node, ast.Attribute) and node.attr == "init" and id(node) not in allowed:
                found.append(f"{path.name}:{node.lineno} reads .init")
    assert not found, found


def _src(H=4, G=2, d_h=8, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return svd.Source(r(H * d_h, D), r(G * d_h, D), r(G * d_h, D), None, None, None, H, G, d_h)


def test_rope_pairs_by_contribution_and_high():
    src = _src()
    wk = src.w_k.reshape(2, 8, -1)
    wk[:, 3] *= 50  # pair 3 (dims 3 and 7) dominates every key
    assert 3 in inits.rope_pairs(src, 1, rule="magnitude")
    assert inits.rope_pairs(src, 2, rule="high") == [0, 1]
    fast = torch.tensor([1.0, 0.3, 0.1, 1e-6])  # pair 3 barely rotates: dropping its rotation costs nothing
    assert 3 not in inits.rope_pairs(src, 1, rule="contribution", inv_freq=fast)


def test_shared_key_is_exact_for_one_kv_head_and_a_best_fit_otherwise():
    mqa = _src(H=4, G=1)
    rows, gains, _ = inits.shared_rope_key(mqa, [0, 1, 2, 3], None)
    assert (torch.allclose(rows, mqa.w_k[[0, 1, 2, 3, 4, 5, 6, 7]])
            or torch.allclose(gains.abs(), torch.ones_like(gains.abs())))
    gqa = _src(H=4, G=2)
    x, cov = _cov(D=32)
    L = svd.whitening(cov, damp=0.0)
    rows, gains, _ = inits.shared_rope_key(gqa, [1], L, fit="pca")
    k = torch.complex(gqa.w_k.reshape(2, 8, -1)[:, 1], gqa.w_k.reshape(2, 8, -1)[:, 5]) @ x.T.to(torch.complex128)
    shared = torch.complex(rows[0], rows[1]) @ x.T.to(torch.complex128)
    pca_err = (k - gains[:, 0, None] * shared).abs().pow(2).sum()
    mean_rows, _, _ = inits.shared_rope_key(gqa, [1], None, fit="mean")
    mean_err = (k - (torch.complex(mean_rows[0], mean_rows[1]) @ x.T.to(torch.complex128))).abs().pow(2).sum()
    assert pca_err < mean_err  # the fitted key beats the paper's head average


def test_query_weighted_shared_key_lowers_the_logit_error():
    """'query' weighs each KV head's key error by the energy of the queries that read it: the logits' error
    (sum over query heads of |q_h^* (k_g - a_g k)|^2) drops below plain PCA's, which is best on the keys alone."""
    gqa = _src(H=4, G=2)
    wq = gqa.w_q.reshape(4, 8, -1)
    wq[:2] *= 10  # the queries of group 0 are loud: its key error costs more logit error
    x, cov = _cov(D=32)
    L = svd.whitening(cov, damp=0.0)
    cx = lambda w, j: torch.complex(w[:, j], w[:, j + 4]) @ x.T.to(torch.complex128)  # noqa: E731
    k, q = cx(gqa.w_k.reshape(2, 8, -1), 1), cx(wq, 1)  # [G, N], [H, N]

    def errors(fit):
        rows, gains, _ = inits.shared_rope_key(gqa, [1], L, fit=fit)
        resid = k - gains[:, 0, None] * (torch.complex(rows[0], rows[1]) @ x.T.to(torch.complex128))  # [G, N]
        key_err = float(resid.abs().pow(2).sum())
        logit_err = sum(float(q[h].abs().pow(2).mean() * resid[h // 2].abs().pow(2).mean()) for h in range(4))
        return key_err, logit_err

    (key_pca, logit_pca), (key_q, logit_q) = errors("pca"), errors("query")
    assert logit_q < 0.9 * logit_pca and key_pca < key_q


def _calibrated(tmp_path, family="llama", **kw):
    src = make_source(family, tmp_path / "src", **kw)
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in chat_rows(200)))
    return src, data


def test_rope_aware_full_rank_reproduces_an_mqa_model(tmp_path):
    """G = 1: every frequency pair kept, full ranks -> the converted model *is* the source model."""
    src, data = _calibrated(tmp_path, num_key_value_heads=1)
    convert(ConvertArgs(src=str(src), out=str(tmp_path / "out"), kv_rank=16, rope_dim=16, q_rank="none",
                        init="rope-aware", calib_data=str(data), calib_seqs=8, calib_len=16), log=lambda *a: None)
    a = AutoModelForCausalLM.from_pretrained(src).eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert b.config.mla_spec(0).rope_pairs == list(range(8))
    x = torch.randint(4, 100, (2, 12))
    with torch.no_grad():
        assert torch.allclose(a(x).logits, b(x).logits, atol=1e-4)


def _scores(model, layer: int, x, mla: bool):
    """Pre-softmax attention scores [B, H, T, T] of one layer's attention on input x [B, T, D]."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from ecomla.mla.rope import apply_rope

    attn = model.model.layers[layer].self_attn
    B, T, _ = x.shape
    pos = torch.arange(T)[None].expand(B, T)
    if mla:
        s, H = attn.spec, attn.num_heads
        rope = model.model.rotary(pos, x.dtype)[layer]
        q = attn.q_up_proj(attn.q_latent(x)).view(B, T, H, s.qk_head_dim)
        q_nope, q_rope = q.split([s.qk_nope_head_dim, s.qk_rope_head_dim], -1)
        lat = attn.latent(x, rope)
        k_nope = attn.kv_b_proj(lat[..., : s.kv_lora_rank]).view(B, T, H, s.qk_nope_head_dim + s.v_head_dim)
        k = torch.cat([k_nope[..., : s.qk_nope_head_dim], lat[..., None, s.kv_lora_rank :].expand(-1, -1, H, -1)], -1)
        q = torch.cat([q_nope, apply_rope(q_rope, rope)], -1)
        return torch.einsum("bthd,bshd->bhts", q, k) * s.scale
    cos, sin = model.model.rotary_emb(x, pos)
    q = attn.q_proj(x).view(B, T, -1, 16).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, -1, 16).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return q @ k.transpose(-1, -2) / 4.0


def test_rope_aware_gqa_score_error_is_bounded_and_below_the_head_mean(tmp_path):
    """G = 2: one shared rotary key cannot equal two different keys, so scores cannot be exact; with every pair
    kept and full ranks, the error comes only from the shared key. The PCA-fitted key must beat the paper-style
    head average (`--rope-key-fit mean`)."""
    src, data = _calibrated(tmp_path)
    common = dict(src=str(src), rope_dim=16, q_rank="none", calib_data=str(data), calib_seqs=16, calib_len=16,
                  kv_rank=32, init="rope-aware")
    convert(ConvertArgs(out=str(tmp_path / "pca"), **common), log=lambda *a: None)
    convert(ConvertArgs(out=str(tmp_path / "mean"), rope_key_fit="mean", **common), log=lambda *a: None)
    ref_model = AutoModelForCausalLM.from_pretrained(src).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 12, 64)
    with torch.no_grad():
        ref = _scores(ref_model, 1, x, mla=False)
        err = {}
        for n in ("pca", "mean"):
            m = AutoModelForCausalLM.from_pretrained(tmp_path / n).eval()
            err[n] = ((_scores(m, 1, x, mla=True) - ref).norm() / ref.norm()).item()
    assert err["pca"] < err["mean"] and err["pca"] < 0.8, err


def test_calibration_reads_only_the_train_split(tmp_path, monkeypatch):
    from ecomla.convert import calibrate
    from ecomla.data import packing
    from ecomla.data.chat import load_chat, split_chat

    _, data = _calibrated(tmp_path)
    seen = []
    original = packing.PackedChat.__init__

    def spy(self, ds, *a, **k):
        seen.extend(ds["id"])
        original(self, ds, *a, **k)

    monkeypatch.setattr(packing.PackedChat, "__init__", spy)
    from tests.helpers import make_tokenizer

    calibrate.calibration_batches(make_tokenizer(), str(data), 4, 16, seed=0)
    held = set(split_chat(load_chat(str(data)))["heldout"]["id"])
    assert seen and held and not held & set(seen)
