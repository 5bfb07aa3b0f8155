"""The fitted init (`--init fitted`): its metric, its closed-form refits, its layer pass and what it records."""

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import ecomla  # noqa: F401
from ecomla.common import UserError
from ecomla.convert import fit, svd
from ecomla.convert.convert import ConvertArgs, convert
from ecomla.convert.inits import INITS, FitChoice, InitMethod, RopeChoice
from ecomla.eval.fidelity import final_hidden
from ecomla.losses import token_kl
from tests.helpers import make_source
from tests.test_data_eval import chat_rows


def _data(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in chat_rows(200)))
    return data


def _convert(src, out, data, fit_choice: FitChoice | None = None, calib_seqs=40, **kw):
    args = ConvertArgs(src=str(src), out=str(out), init="fitted", calib_data=str(data), calib_seqs=calib_seqs,
                       calib_len=16, **kw)
    if fit_choice is not None:
        args.method = dataclasses.replace(args.method, fit=fit_choice)
    return convert(args, log=lambda *a: None)


def test_fitted_is_a_typed_init():
    m = INITS["fitted"]
    assert m.whiten and m.rope == RopeChoice() and m.fit == FitChoice() and m.needs_calibration


@pytest.mark.parametrize("metric, damp", [("all", 0.0), ("up", 0.0), ("all", 0.5)], ids=["all", "up", "damped"])
def test_full_rank_reproduces_an_mqa_model(metric, damp, tmp_path):
    """G = 1, every frequency pair rotary, full latent rank: the fitted model computes what the source does, with
    either attention metric, and whatever the damping: one-shot calibration fits each layer on the teacher's own
    inputs (x_s = x_t), so no input map applies (through the map C (C + damping)^-1, which sequential calibration
    reads the weights through, a large damping would shrink every projection)."""
    src = make_source("llama", tmp_path / "src", num_key_value_heads=1)
    _convert(src, tmp_path / "out", _data(tmp_path), FitChoice(attention_metric=metric), kv_rank=16, rope_dim=16,
             q_rank="none", damp=damp)
    a = AutoModelForCausalLM.from_pretrained(src).eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(4, 100, (2, 12))
    with torch.no_grad():
        assert torch.allclose(a(x).logits, b(x).logits, atol=1e-3)


def test_convert_json_records_the_init_the_flags_resolve_to(tmp_path):
    src = make_source("llama", tmp_path / "src")
    _convert(src, tmp_path / "out", _data(tmp_path), calib_seqs=8, kv_rank=4, rope_dim=8, rope_select="high",
             key_weight="2", attention_metric="up")
    meta = json.loads((tmp_path / "out" / "ecomla_convert.json").read_text())
    want = InitMethod(whiten=True, rope=RopeChoice(select="high"), fit=FitChoice(key_weight=2.0, attention_metric="up"))
    assert meta["method"] == json.loads(json.dumps(dataclasses.asdict(want))) and meta["q_rank"] == "auto"


def _output_kl(src, student, x) -> float:
    a = AutoModelForCausalLM.from_pretrained(src).eval()
    b = AutoModelForCausalLM.from_pretrained(student).eval()
    with torch.no_grad():
        return float(token_kl(b(x).logits.flatten(0, 1), a(x).logits.flatten(0, 1), "forward").mean())


def test_sequential_fit_is_no_worse_than_one_shot_at_the_output(tmp_path):
    src = make_source("llama", tmp_path / "src")
    data = _data(tmp_path)
    common = dict(kv_rank=4, rope_dim=8, q_rank="none")
    _convert(src, tmp_path / "seq", data, FitChoice(sequential=True), **common)
    _convert(src, tmp_path / "one", data, FitChoice(sequential=False), **common)
    x = torch.randint(4, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    seq, one = _output_kl(src, tmp_path / "seq", x), _output_kl(src, tmp_path / "one", x)
    assert seq <= one, (seq, one)


def test_o_proj_refit_lowers_the_attention_output_error_it_targets(tmp_path):
    src = make_source("llama", tmp_path / "src")
    meta = _convert(src, tmp_path / "refit", _data(tmp_path), FitChoice(), kv_rank=4, rope_dim=8, q_rank="none")
    rows = [r for r in meta["layers"] if r["type"] == "mla"]
    assert rows and all(r["o_error_after"] < r["o_error_before"] and r["o_target"] == "output" for r in rows), rows


@pytest.mark.parametrize("bias", [False, True])
def test_o_proj_refit_errors_from_moments_equal_the_direct_errors(bias):
    from ecomla.convert.layer_pass import refit_o

    g = torch.Generator().manual_seed(0)
    o_proj = torch.nn.Linear(12, 6, bias=bias)
    z = [torch.randn(50, 12, generator=g) for _ in range(3)]
    targets = [zk @ torch.randn(12, 6, generator=g) * 0.1 + o_proj(zk).detach() for zk in z]
    with torch.no_grad():  # as the fitting pass calls it
        w, b, row = refit_o(o_proj, z, targets, FitChoice(ridge=1e-3))

    def direct(weight, bias_):
        shift = 0 if bias_ is None else bias_.double()
        e = sum(float(((zk.double() @ weight.T.double() + shift - t.double()) ** 2).sum()) for zk, t in zip(z, targets))
        return (e / sum(float((t.double() ** 2).sum()) for t in targets)) ** 0.5

    before = direct(o_proj.weight.detach(), None if o_proj.bias is None else o_proj.bias.detach())
    assert row["o_error_before"] == pytest.approx(before, rel=1e-9)
    assert row["o_error_after"] == pytest.approx(direct(w, b), rel=1e-9)
    assert row["o_error_after"] < row["o_error_before"]


def test_o_proj_is_not_refitted_from_too_few_tokens(tmp_path):
    src = make_source("llama", tmp_path / "src")  # o_proj reads 4 heads x 16 = 64 inputs: a refit needs 512 tokens
    meta = _convert(src, tmp_path / "few", _data(tmp_path), calib_seqs=8, kv_rank=4, rope_dim=8, q_rank="none")
    rows = [r for r in meta["layers"] if r["type"] == "mla"]
    assert all(r["o_target"].startswith("none (128 calibration tokens") and "--calib-seqs" in r["o_target"]
               and r["o_error_after"] == r["o_error_before"] for r in rows), rows


def _samples(n=400, D=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64) @ torch.randn(D, D, generator=g, dtype=torch.float64)
    return x + 3.0, g  # a non-zero mean, like normed hidden states


def test_least_squares_up_beats_the_factorisation_up_at_the_same_latent():
    x, g = _samples()
    cov = x.T @ x / len(x)
    w = torch.randn(10, 12, generator=g, dtype=torch.float64)
    m = torch.diag(torch.rand(10, generator=g, dtype=torch.float64) * 10)  # a row metric different from C
    f = svd.whitened_factors(m @ w, svd.whitening(cov), 4)
    up_svd = torch.linalg.solve(m, f.up)
    up_ls = fit.least_squares_up(w, f.down, cov)
    err = lambda up: float(((x @ (w - up @ f.down).T) ** 2).sum())  # noqa: E731
    assert err(up_ls) < err(up_svd)


def test_grouped_up_fits_each_group_in_its_own_metric():
    """Rows in G blocks, block g fitted in cov[g]: each block's error in its own metric is no larger than with the
    shared fit, and strictly smaller where the metrics differ."""
    x1, g = _samples(seed=1)
    x2 = x1 * torch.linspace(0.1, 3.0, 12, dtype=torch.float64)  # another group sees other directions
    covs = torch.stack([x1.T @ x1 / len(x1), x2.T @ x2 / len(x2)])
    w = torch.randn(8, 12, generator=g, dtype=torch.float64)
    down = torch.randn(3, 12, generator=g, dtype=torch.float64)
    grouped, shared = fit.grouped_up(w, down, covs), fit.grouped_up(w, down, covs.mean(0))
    err = lambda up, b, x: float(((x @ (w[b] - up[b] @ down).T) ** 2).sum())  # noqa: E731
    for b, x in ((slice(0, 4), x1), (slice(4, 8), x2)):
        assert err(grouped, b, x) < err(shared, b, x)


def test_input_map_corrects_a_perturbed_input():
    x_t, g = _samples()
    x_s = x_t @ (torch.eye(12, dtype=torch.float64) + 0.3 * torch.randn(12, 12, generator=g, dtype=torch.float64))
    w = torch.randn(6, 12, generator=g, dtype=torch.float64)
    a = fit.input_map(x_t.T @ x_s / len(x_s), x_s.T @ x_s / len(x_s), damp=0.0)
    assert ((x_s @ (w @ a).T - x_t @ w.T) ** 2).sum() < 1e-6 * ((x_s @ w.T - x_t @ w.T) ** 2).sum()


def test_key_mean_is_left_out_of_the_key_fit():
    """A key component that is the same for every token does not change attention: the K up-projection is fitted
    in the covariance, so two inputs that differ only by their mean give the same K factors."""
    x, g = _samples()
    cov, mean = x.T @ x / len(x), x.mean(0)
    centred = fit.split_mean(cov, mean)
    assert torch.allclose(centred, torch.cov(x.T, correction=0), atol=1e-9)
    shifted = x + torch.randn(12, generator=g, dtype=torch.float64)
    assert torch.allclose(fit.split_mean(shifted.T @ shifted / len(x), shifted.mean(0)), centred, atol=1e-9)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fitted_checkpoint_loads_generates_and_its_paths_agree(family, tmp_path):
    src = make_source(family, tmp_path / "src")
    _convert(src, tmp_path / "out", _data(tmp_path), kv_rank=6, rope_dim=8)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(4, 100, (2, 10))
    with torch.no_grad():
        dec = final_hidden_path(model, x, "decompressed")
        absd = final_hidden_path(model, x, "absorbed")
        assert torch.allclose(dec, absd, atol=1e-4)
        out = model.generate(x[:1, :4], max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)
    assert final_hidden(model, x).shape == (2, 10, model.config.hidden_size)


def final_hidden_path(model, x, path):
    return model(x, mla_path=path, use_cache=False).logits


def test_fitted_flags_map_to_the_fit_choice_and_are_refused_elsewhere():
    base = dict(src="s", out="o", kv_rank=8)
    args = ConvertArgs(**base, init="fitted", key_weight="2.5", o_ridge=0.5, attention_metric="up")
    assert args.method.fit == FitChoice(key_weight=2.5, ridge=0.5, attention_metric="up")
    assert ConvertArgs(**base, init="fitted").method.fit == FitChoice()
    for bad, flag in ((dict(init="rope-whitened", key_weight="4"), "--key-weight"),
                      (dict(init="rope-whitened", attention_metric="none"), "--attention-metric"),
                      (dict(init="fitted", key_weight="0"), "--key-weight"),
                      (dict(init="fitted", key_weight="a"), "--key-weight"),
                      (dict(init="fitted", key_weight="2,6"), "--key-weight '2,6': give one number"),
                      (dict(init="fitted", o_ridge=-1.0), "--o-ridge")):
        with pytest.raises(UserError, match=flag):
            ConvertArgs(**base, **bad)


@pytest.mark.parametrize("sequential", [False, True])
def test_hybrid_fitted_model_keeps_its_gqa_layers_exact(sequential, tmp_path):
    src = make_source("llama", tmp_path / "src")
    _convert(src, tmp_path / "out", _data(tmp_path), FitChoice(sequential=sequential), kv_rank=4, rope_dim=8,
             layers="1")
    a = AutoModelForCausalLM.from_pretrained(src).eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert b.config.mla_layer_indices == [1]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):  # layer 0 stays the source's attention
        kept = getattr(b.model.layers[0].self_attn, name).weight
        assert torch.equal(getattr(a.model.layers[0].self_attn, name).weight, kept)
    x = torch.randint(4, 100, (2, 10))
    with torch.no_grad():
        assert torch.isfinite(b(x).logits).all()


def test_attention_moments_give_the_teachers_head_outputs():
    """att_v is the second moment of the attention mixtures xbar_i = sum_j p_ij x_j: a head's output before
    o_proj is W_v xbar_i exactly, so W_v att_v W_v^T is the second moment of the teacher's head outputs; att_k is
    what the keys receive less that (positive semi-definite)."""
    from ecomla.convert.layer_pass import attention_moments
    from ecomla.mla.attention import GQAAttention, build_mask
    from ecomla.mla.config import EcoMLAConfig

    cfg = EcoMLAConfig(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       intermediate_size=32, num_hidden_layers=1, vocab_size=50)
    torch.manual_seed(0)
    attn = GQAAttention(cfg, 0).double()
    x = torch.randn(3, 10, 16, dtype=torch.float64)
    theta = torch.arange(10, dtype=torch.float64)[None, :, None] * torch.linspace(0.1, 1.0, 4, dtype=torch.float64)
    rope = (torch.cat([theta.cos()] * 2, -1).expand(3, -1, -1), torch.cat([theta.sin()] * 2, -1).expand(3, -1, -1))
    mask = build_mask(None, 10, 0, None, x.device)
    with torch.no_grad():
        m = attention_moments(attn, [x], [x], [rope], mask)
        heads = []
        hook = attn.o_proj.register_forward_pre_hook(lambda _m, a: heads.append(a[0]))
        attn(x, rope=rope, attention_mask=mask)
        hook.remove()
        q, k, v = attn.qkv(x, rope)
        probs = attn.probabilities(x, rope, mask)  # [B, H, T, T]
    out = (probs @ v.repeat_interleave(2, dim=1)).transpose(1, 2).reshape(3, 10, -1)
    assert torch.allclose(out, heads[0], atol=1e-10)  # the calibration path computes what forward's SDPA does
    z = heads[0].reshape(-1, 4, 8)  # [N, H, d]: each head's output before o_proj
    wv = attn.v_proj.weight.reshape(2, 8, 16)
    for g in range(2):
        want = sum(z[:, h].T @ z[:, h] for h in (2 * g, 2 * g + 1)) / 2 / z.shape[0]
        assert torch.allclose(wv[g] @ m["att_v"][g] @ wv[g].T, want, atol=1e-10)
        assert torch.linalg.eigvalsh(m["att_k"][g]).min() > -1e-10
