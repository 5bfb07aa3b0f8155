"""`ecomla convert --target deepseek-v3` and `ecomla export --format deepseek-v3` on tiny models."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

import ecomla  # noqa: F401
from ecomla.common import UserError
from ecomla.convert.convert import ConvertArgs, convert
from ecomla.distill import DistillArgs, distill
from ecomla.export.export import ExportArgs, export, interleave
from ecomla.mla import deepseek
from ecomla.mla.rope import rope_inv_freq
from tests.helpers import make_source
from tests.test_data_eval import chat_rows

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny Llama with eps 1e-5 (a fold in the export) and tied embeddings (an lm_head to write), the same untied,
    and chat data."""
    r = tmp_path_factory.mktemp("export")
    make_source("llama", r / "src", rms_norm_eps=1e-5, tie_word_embeddings=True)
    make_source("llama", r / "untied", rms_norm_eps=1e-5, tie_word_embeddings=False)
    (r / "chat.jsonl").write_text("\n".join(json.dumps(x) for x in chat_rows(200)))
    return r


def to_mla(root, out, src="src", **kw):
    args = dict(src=str(root / src), out=str(out), kv_rank=8, rope_dim=8, calib_data=str(root / "chat.jsonl"),
                calib_seqs=8, calib_len=16, target="deepseek-v3")
    args.update(kw)
    convert(ConvertArgs(**args), **QUIET)
    return out


def logits(path, x):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path).eval()(x).logits


X = torch.randint(4, 100, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("init, q_rank, src", [("rope-whitened", "auto", "src"), ("rope-whitened", "none", "src"),
                                               ("xecomla", "auto", "src"), ("fitted", "auto", "src"),
                                               ("rope-whitened", "auto", "untied")])
def test_export_reproduces_ecomla_logits_and_greedy_generation(root, tmp_path, init, q_rank, src):
    mla = to_mla(root, tmp_path / "mla", src=src, init=init, q_rank=q_rank)
    export(ExportArgs(model=str(mla), out=str(tmp_path / "ds")), **QUIET)
    a = AutoModelForCausalLM.from_pretrained(mla).eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "ds").eval()
    assert isinstance(b, DeepseekV3ForCausalLM)
    with torch.no_grad():
        la, lb = a(X).logits, b(X).logits
    assert torch.allclose(la, lb, atol=1e-5), (la - lb).abs().max()
    prompt = X[:, :6]
    ga = a.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=3)
    gb = b.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=3)
    assert torch.equal(ga, gb)


def test_export_loads_in_stock_transformers_without_ecomla(root, tmp_path):
    mla = to_mla(root, tmp_path / "mla", init="rope-whitened")
    export(ExportArgs(model=str(mla), out=str(tmp_path / "ds")), **QUIET)
    torch.save(X, tmp_path / "x.pt")
    code = ("import sys, torch; from transformers import AutoModelForCausalLM as A; "
            f"m = A.from_pretrained({str(tmp_path / 'ds')!r}).eval(); "
            "assert not any(k.startswith('ecomla') for k in sys.modules), 'ecomla was imported'; "
            f"torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})).logits.detach(), {str(tmp_path / 'y.pt')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    assert torch.allclose(torch.load(tmp_path / "y.pt"), logits(mla, X), atol=1e-5)


def test_config_round_trips_and_follows_the_format(root, tmp_path):
    mla = to_mla(root, tmp_path / "mla", init="rope-whitened")
    export(ExportArgs(model=str(mla), out=str(tmp_path / "ds")), **QUIET)
    ours = AutoModelForCausalLM.from_pretrained(mla).config
    cfg = DeepseekV3Config.from_pretrained(tmp_path / "ds")
    again = DeepseekV3Config.from_dict(cfg.to_dict())
    spec = ours.mla_spec(0)
    for c in (cfg, again):
        assert (c.kv_lora_rank, c.q_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (
            spec.kv_lora_rank, spec.q_lora_rank, spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim)
        assert c.first_k_dense_replace == c.num_hidden_layers == ours.num_hidden_layers
        assert c.num_attention_heads == c.num_key_value_heads == ours.num_attention_heads
        assert not c.tie_word_embeddings and c.rms_norm_eps == 1e-6 and c.rope_interleave
        assert c.rope_parameters["rope_type"] == "default"
    # pairs 0..3 of a theta-10000 head of 16 dims are a plain 8-dim RoPE with theta 10000^(8/16)
    assert spec.rope_pairs == [0, 1, 2, 3] and cfg.rope_parameters["rope_theta"] == pytest.approx(100.0, rel=1e-5)
    meta = json.loads((tmp_path / "ds" / "ecomla_export.json").read_text())
    assert meta["folds"]["norm_eps"]["input_scale"] == pytest.approx((1e-6 / 1e-5) ** 0.5)
    assert (tmp_path / "ds" / "README.md").is_file() and (tmp_path / "ds" / "tokenizer.json").is_file()


@pytest.mark.parametrize("src", ["src", "untied"])
def test_export_writes_lm_head_for_tied_and_untied_sources(root, tmp_path, src):
    """vLLM's DeepSeek model never ties lm_head to the embeddings and loads a folder without `lm_head.weight` with no
    warning (every logit equal, issue 29): the export writes the head the ecomla model uses, tied source or not."""
    from safetensors import safe_open

    mla = to_mla(root, tmp_path / "mla", src=src, init="xecomla")
    export(ExportArgs(model=str(mla), out=str(tmp_path / "ds")), **QUIET)
    ours = AutoModelForCausalLM.from_pretrained(mla)
    assert ours.config.tie_word_embeddings == (src == "src")
    names = _tensor_names(tmp_path / "ds")
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"} <= names
    with safe_open(str(tmp_path / "ds" / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("lm_head.weight"), ours.lm_head.weight.detach())
    assert json.loads((tmp_path / "ds" / "config.json").read_text())["tie_word_embeddings"] is False


def test_a_custom_softmax_scale_is_folded_into_the_query(root, tmp_path):
    mla = to_mla(root, tmp_path / "mla", init="rope-whitened")
    cfg = json.loads((mla / "config.json").read_text())
    for spec in cfg["mla_layers"]:
        spec["softmax_scale"] = 0.4  # the format's would be 16^-0.5 = 0.25
    (mla / "config.json").write_text(json.dumps(cfg))
    export(ExportArgs(model=str(mla), out=str(tmp_path / "ds")), **QUIET)
    assert torch.allclose(logits(tmp_path / "ds", X), logits(mla, X), atol=1e-5)


def test_interleave_order():
    assert interleave(3).tolist() == [0, 3, 1, 4, 2, 5]


def test_a_distilled_target_model_still_exports_exactly(root, tmp_path):
    mla = to_mla(root, tmp_path / "mla", init="rope-whitened")
    distill(DistillArgs(student=str(mla), data=str(root / "chat.jsonl"), out=str(tmp_path / "kd"), seq_len=16,
                        batch_size=4, max_tokens=64 * 3, ild_tokens=64 * 2, precision="fp32", eval_tokens=0,
                        lr=3e-3, ild_lr=3e-3, progress=False, compile_loss=False))
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "kd")
    assert deepseek.problems(trained.config) == []  # training keeps the constraint
    export(ExportArgs(model=str(tmp_path / "kd"), out=str(tmp_path / "ds")), **QUIET)
    assert torch.allclose(logits(tmp_path / "ds", X), logits(tmp_path / "kd", X), atol=1e-5)


# ---- refusals: export names what to change, and writes nothing ---------------------------------------------------
def _norm_free(root, out):
    convert(ConvertArgs(src=str(root / "src"), out=str(out), kv_rank=8, rope_dim=8, init="rope-whitened",
                        calib_data=str(root / "chat.jsonl"), calib_seqs=8, calib_len=16), **QUIET)


def _uneven_pairs(root, out):
    to_mla(root, out, init="rope-whitened")
    cfg = json.loads((out / "config.json").read_text())
    for spec in cfg["mla_layers"]:
        spec["rope_pairs"] = [0, 1, 2, 5]
    (out / "config.json").write_text(json.dumps(cfg))


def _hybrid(root, out):
    convert(ConvertArgs(src=str(root / "src"), out=str(out), kv_rank=8, rope_dim=8, layers="0,1", latent_norm=True,
                        calib_data=str(root / "chat.jsonl"), calib_seqs=8, calib_len=16), **QUIET)


def _scaled_fresh_rope(root, out):
    make_source("llama", root / "scaled", rope_parameters=LLAMA3, head_dim=32, max_position_embeddings=256)
    convert(ConvertArgs(src=str(root / "scaled"), out=str(out), kv_rank=8, rope_dim=8, latent_norm=True,
                        calib_data=str(root / "chat.jsonl"), calib_seqs=8, calib_len=16), **QUIET)


def _biased(root, out):
    make_source("qwen2", root / "qwen2")
    convert(ConvertArgs(src=str(root / "qwen2"), out=str(out), kv_rank=8, rope_dim=8, latent_norm=True,
                        calib_data=str(root / "chat.jsonl"), calib_seqs=8, calib_len=16), **QUIET)


def _no_nope_dims(root, out):
    convert(ConvertArgs(src=str(root / "src"), out=str(out), kv_rank=8, rope_dim=16, latent_norm=True,
                        calib_data=str(root / "chat.jsonl"), calib_seqs=8, calib_len=16), **QUIET)


@pytest.mark.parametrize("make, says", [
    (_norm_free, "no norm"), (_uneven_pairs, "not a plain RoPE"), (_hybrid, "kept GQA"),
    (_scaled_fresh_rope, "not a plain RoPE"), (_biased, "biases"), (_no_nope_dims, "--rope-dim 16 equals the head"),
])
def test_export_refuses_what_the_format_cannot_express(root, tmp_path, make, says):
    make(root, tmp_path / "mla")
    with pytest.raises(UserError, match=says) as err:
        export(ExportArgs(model=str(tmp_path / "mla"), out=str(tmp_path / "ds")), **QUIET)
    assert "--" in str(err.value)  # names the flag to change
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob("ds.tmp-*"))


def test_export_refuses_a_plain_transformers_model(root, tmp_path):
    with pytest.raises(UserError, match="not an ecomla checkpoint"):
        export(ExportArgs(model=str(root / "src"), out=str(tmp_path / "ds")), **QUIET)


@pytest.mark.parametrize("kw, says", [
    (dict(kv_rank=None, rank_energy=0.9), "--kv-rank"), (dict(layers="0,2"), "--layers"),
    (dict(mla_rope="yarn"), "--mla-rope"), (dict(src="qwen2"), "biases"),
    (dict(src="scaled", init="xecomla"), "rope-aware init"), (dict(rope_dim=16), "--rope-dim 16 equals the head dim"),
])
def test_convert_target_refuses_with_the_flag_to_change(root, tmp_path, kw, says):
    if kw.get("src") == "qwen2" and not (root / "qwen2").exists():
        make_source("qwen2", root / "qwen2")
    if kw.get("src") == "scaled" and not (root / "scaled").exists():
        make_source("llama", root / "scaled", rope_parameters=LLAMA3, head_dim=32, max_position_embeddings=256)
    with pytest.raises(UserError, match=says):
        to_mla(root, tmp_path / "mla", init=kw.pop("init", "rope-whitened"), **kw)
    assert not (tmp_path / "mla").exists()


def test_llama3_scaled_source_keeps_only_unscaled_pairs(root, tmp_path):
    """Llama-3 scaling leaves the fast pairs alone: the target picks an evenly spaced plain subset of them, and
    refuses a rotary width that would need scaled pairs."""
    if not (root / "scaled").exists():
        make_source("llama", root / "scaled", rope_parameters=LLAMA3, head_dim=32, max_position_embeddings=256)
    inv_freq = rope_inv_freq(LLAMA3, 32, 256)[0]
    widest = 2 * max(m for m in range(1, 17) if deepseek.evenly_spaced_pairs(inv_freq, m))
    assert 2 < widest < 32  # some pairs are scaled, some are not
    mla = to_mla(root, tmp_path / "mla", src="scaled", rope_dim=widest, init="rope-whitened")
    pairs = AutoModelForCausalLM.from_pretrained(mla).config.mla_spec(0).rope_pairs
    assert deepseek.plain_rope_theta(inv_freq[pairs]) is not None
    export(ExportArgs(model=str(mla), out=str(tmp_path / "ds")), **QUIET)
    assert torch.allclose(logits(tmp_path / "ds", X), logits(mla, X), atol=1e-5)
    with pytest.raises(UserError, match="lower --rope-dim"):
        to_mla(root, tmp_path / "too-wide", src="scaled", rope_dim=widest + 2, init="rope-whitened")


def test_latent_norm_gains_keep_the_model_close_to_the_norm_free_fit(root, tmp_path):
    """Every layer's attention output on the model's own inputs: the mean-rms gain is closer to the norm-free layer
    than the same gain scaled by 0.6 or 1.6, and far closer than a unit gain. The singular values sit in the
    down-projections (--sigma down), so the latents' rms is far from 1 and a unit gain would rescale them."""
    common = dict(src=str(root / "src"), kv_rank=8, rope_dim=8, init="rope-whitened", sigma="down",
                  calib_data=str(root / "chat.jsonl"), calib_seqs=8, calib_len=16)
    convert(ConvertArgs(out=str(tmp_path / "free"), **common), **QUIET)
    convert(ConvertArgs(out=str(tmp_path / "normed"), latent_norm=True, **common), **QUIET)
    free = AutoModelForCausalLM.from_pretrained(tmp_path / "free").eval()
    normed = AutoModelForCausalLM.from_pretrained(tmp_path / "normed").eval()
    ids = torch.tensor([[1] + [4 + (7 * i) % 90 for i in range(31)]])
    with torch.no_grad():
        hidden = free(ids, output_hidden_states=True).hidden_states
        rope = free.model.rotary(torch.arange(ids.shape[1])[None], torch.float32)
        for i, layer in enumerate(free.model.layers):
            x = layer.input_layernorm(hidden[i])
            want = layer.self_attn(x, rope[i], mla_path="decompressed")
            attn = normed.model.layers[i].self_attn
            err = lambda y: float((y - want).norm() / want.norm())  # noqa: E731
            norms = (attn.kv_a_layernorm.weight, attn.q_a_layernorm.weight)
            gains = [g.clone() for g in norms]
            errs = []
            for variant in ([g for g in gains], [0.6 * g for g in gains], [g / 0.6 for g in gains],
                            [torch.ones_like(g) for g in gains]):
                for norm, g in zip(norms, variant):
                    norm.copy_(g)
                errs.append(err(attn(x, rope[i], mla_path="decompressed")))
            assert errs[0] < min(errs[1:3]) and errs[0] < 0.5 * errs[3], (i, errs)
            attn.kv_a_layernorm = attn.q_a_layernorm = None  # without its norms the layer is the norm-free one:
            assert err(attn(x, rope[i], mla_path="decompressed")) < 1e-5  # the change of latent basis is exact


def test_steady_basis_makes_the_latent_rms_steadier():
    from ecomla.convert import norms

    g = torch.Generator().manual_seed(0)
    c = torch.randn(2000, 8, generator=g, dtype=torch.float64)
    c[:, 0] *= 4.0 * torch.rand(2000, generator=g, dtype=torch.float64)  # a direction whose size varies by token
    B = norms.steady_basis(c)
    assert norms.steadiness(c @ B.T) < 0.75 * norms.steadiness(c)
    assert float(torch.linalg.cond(B)) <= 30.0 + 1e-6  # clipped: no direction shrunk out of training's reach
    assert torch.equal(norms.steady_basis(c[:, 1:] * 0 + 1.0), torch.eye(7, dtype=torch.float64))  # already steady


def test_the_sink_weight_brings_the_first_tokens_latent_to_the_others_rms():
    """The first token of each sequence (the attention sink) with a latent 10x smaller than the rest, along a
    direction of its own: uniform weights leave a latent norm to scale it up about 10x; the sink share does not."""
    from ecomla.convert import norms

    g = torch.Generator().manual_seed(0)
    batch, seq, r = 16, 64, 8
    c = torch.randn(batch, seq, r, generator=g, dtype=torch.float64)
    c[:, 1:, 0] *= 0.02  # the other tokens barely use the sink's direction, so stretching it spares them
    c[:, 0] = 0.1 * (torch.tensor([1.0] + [0.0] * (r - 1), dtype=torch.float64) + 0.01 * c[:, 0])
    c = c.reshape(-1, r)
    sink = torch.zeros(batch, seq, dtype=torch.bool)
    sink[:, 0] = True
    sink = sink.flatten()
    assert torch.isclose(norms.sink_weights(sink)[sink].sum(), torch.tensor(norms.SINK_SHARE, dtype=torch.float64))

    def sink_ratio(B):
        rms = (c @ B.T).pow(2).mean(-1).sqrt().reshape(batch, seq)
        return float(rms[:, 0].mean() / rms[:, 1:].median())
    assert sink_ratio(norms.steady_basis(c)) < 0.2
    B = norms.steady_basis(c, sink=sink)
    assert sink_ratio(B) > 0.25 and float(torch.linalg.cond(B)) <= 30.0 + 1e-6  # 0.33; uniform: 0.10


def test_the_pad_brings_the_sink_to_the_others_rms_and_costs_the_least_useful_direction():
    """A sink whose input has a feature of its own (as a massive activation is) that the latent ignores, so its
    latent is 10x smaller than the rest along every direction: no basis fixes that; the pad channel, computed from the
    input, does. fit_latent picks it; the up-projection then misses only the direction it uses least."""
    from ecomla.convert import norms

    g = torch.Generator().manual_seed(0)
    batch, seq, d, r, out = 16, 64, 24, 8, 40
    x = torch.randn(batch, seq, d, generator=g, dtype=torch.float64)
    x[:, :, 0] = 0.05 * x[:, :, 0]
    x[:, 0] *= 0.1
    x[:, 0, 0] = 5.0  # the sink's own feature
    x[:, 1:, 1] = 1.0 + 0.05 * x[:, 1:, 1]  # and one that every other token has about equally
    x = x.reshape(-1, d)
    w_down = torch.randn(r, d, generator=g, dtype=torch.float64)
    w_down[:, :2] = 0  # which the latent ignores
    w_up = torch.randn(out, r, generator=g, dtype=torch.float64) * torch.tensor([1.0] * (r - 1) + [0.05])
    c = x @ w_down.T
    sink = torch.zeros(batch, seq, dtype=torch.bool)
    sink[:, 0] = True
    sink = sink.flatten()

    def sink_ratio(latent):
        rms = latent.pow(2).mean(-1).sqrt().reshape(batch, seq)
        return float(rms[:, 0].mean() / rms[:, 1:].median())
    assert sink_ratio(c) < 0.15
    down, up, gain, (cv0, cv1), padded = norms.fit_latent(c, x, w_down, w_up, sink)
    latent = x @ down.T
    assert padded and torch.equal(up[:, -1], torch.zeros(out, dtype=torch.float64))  # the pad: read by nothing
    assert 0.8 < sink_ratio(latent) < 1.25 and cv1 < 0.5 * cv0
    assert abs(gain - norms.mean_rms(latent, norms.sink_weights(sink))) < 1e-9
    lost = (x @ (up @ down - w_up @ w_down).T).norm() / (c @ w_up.T).norm()
    assert lost < 0.1  # what the up-projection gave up: about the last direction's 5%


# ---- the serving rules on a Llama-3.2-1B-shaped layer -------------------------------------------------------------
def test_llama_3_2_1b_shape_at_288_plus_32_passes_the_serving_rules(root, tmp_path):
    """D 2048, 32 query heads, 8 KV heads of 64 dims (Llama-3.2-1B), one layer; 288 + 32 = 320 wide."""
    make_source("llama", tmp_path / "src", hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                head_dim=64, num_hidden_layers=1, intermediate_size=64, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    to_mla(root, tmp_path / "mla", src=tmp_path / "src", kv_rank=288, rope_dim=32, init="xecomla")
    export(ExportArgs(model=str(tmp_path / "mla"), out=str(tmp_path / "ds")), **QUIET)
    c = json.loads((tmp_path / "ds" / "config.json").read_text())
    # the rules of the engines' loaders, written out independently of ecomla.mla.deepseek
    assert c["kv_lora_rank"] + c["qk_rope_head_dim"] in (320, 512, 576)  # vLLM 0.32's MLA backends
    assert c["qk_nope_head_dim"] > 0  # vLLM's default CPU backend crashes without one
    assert c["attention_bias"] is False and c.get("mlp_bias", False) is False  # vLLM and SGLang build no biases
    names = set(json.loads((tmp_path / "ds" / "model.safetensors.index.json").read_text())["weight_map"]) \
        if (tmp_path / "ds" / "model.safetensors.index.json").exists() else _tensor_names(tmp_path / "ds")
    assert not any(n.endswith(".bias") for n in names)
    assert all(f"model.layers.{i}.self_attn.kv_a_layernorm.weight" in names for i in range(c["num_hidden_layers"]))
    assert c["rope_parameters"]["rope_type"] == "default" and c["rope_interleave"] is True  # plain RoPE, interleaved
    assert c["first_k_dense_replace"] == c["num_hidden_layers"] and isinstance(c["n_routed_experts"], int)
    assert c["model_type"] == "deepseek_v3" and c["architectures"] == ["DeepseekV3ForCausalLM"]
    report = deepseek.serving_report(AutoModelForCausalLM.from_pretrained(tmp_path / "mla").config)
    assert "vLLM GPU (widths [320, 512, 576]): servable by Triton MLA" in report and "3.20x smaller" in report
    assert "vLLM CPU (widths [576]): not servable" in report
    assert "width 576 (vLLM GPU and CPU; 1.78x smaller): --kv-rank 544 --rope-dim 32" in report


def _tensor_names(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_serving_report_suggests_servable_flags(root, tmp_path):
    mla = to_mla(root, tmp_path / "mla", init="xecomla")
    report = deepseek.serving_report(AutoModelForCausalLM.from_pretrained(mla).config)
    assert "vLLM GPU (widths [320, 512, 576]): not servable at width 16" in report
    assert "SGLang GPU (widths any): servable by Triton decode" in report and "the cache holds 16" not in report
    assert "width 320: out of reach (r_kv + d_rope is at most 78" in report  # 64 (D) + 14 (d_h - 2)


def smollm2_config(kv_rank, rope_dim, rope_aware):
    """SmolLM2-135M's attention shape (D 576, 9 query heads, 3 KV heads of 64: 384 values per layer), one layer."""
    from ecomla.mla.config import EcoMLAConfig, MLASpec, SourceShape

    src = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64, num_hidden_layers=1,
               rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, max_position_embeddings=8192)
    spec = MLASpec.for_source(SourceShape.of(EcoMLAConfig(**src)), kv_rank, rope_dim, q_rank=None, latent_norm=True,
                              rope_pairs=list(range(rope_dim // 2)) if rope_aware else None)
    return EcoMLAConfig(**src, mla_layers=[spec.to_dict()])


def test_vllm_widths_are_vllm_0_32s():
    """vLLM 0.32 takes r_kv + d_rope in {320, 512, 576} on GPU and only 576 in its CPU build (issue 29)."""
    assert deepseek.engine_widths("vLLM", "GPU") == {320, 512, 576}
    assert deepseek.engine_widths("vLLM", "CPU") == {576}
    assert deepseek.engine_widths("SGLang", "GPU") is None  # any: its pool holds the width, its kernel pads blocks


def test_serving_report_tries_every_rope_dim():
    """SmolLM2 at 4x (64 + 32): no vLLM width at --rope-dim 32 and r_kv <= 192 fits, but 288 + 32 = 320 does (a
    rope-aware init factors 3 x (128 - 32) = 288 rows); 512 and 576 are out of reach for any rope dim."""
    report = deepseek.serving_report(smollm2_config(64, 32, rope_aware=True))
    assert "vLLM GPU (widths [320, 512, 576]): not servable at width 96" in report
    assert "width 320 (vLLM GPU; 1.20x smaller): --kv-rank 288 --rope-dim 32 (or any --rope-dim R from 2 to 32" \
        in report
    assert "width 576: out of reach (r_kv + d_rope is at most 380" in report  # 378 + 2: 3 x (128 - 2) rows
    assert "SGLang GPU (widths any): servable by Triton decode (any CUDA GPU; its compute blocks are padded to 128, " \
        "the cache holds 96)" in report


@pytest.mark.parametrize("init, rope_aware", [("xecomla", False), ("rope-whitened", True)])
def test_convert_accepts_exactly_the_ranks_the_export_suggests(init, rope_aware):
    """One rule (SourceShape.max_kv_rank) for both: every (r_kv, d_rope) the report may suggest for a model of this
    kind of init passes convert's check with that init, and one rank more at the same rope dim is refused. At rope
    62 on SmolLM2, xecomla factors all 384 K/V rows while a rope-aware init factors 3 x (128 - 62) = 198."""
    from ecomla.convert.args import check_shapes
    from ecomla.mla.config import SourceShape

    config = smollm2_config(64, 32, rope_aware)
    shape = SourceShape.of(config)
    args = lambda r_kv, rope: ConvertArgs(src="s", out="o", kv_rank=r_kv, rope_dim=rope, init=init,  # noqa: E731
                                          target="deepseek-v3")
    settings = [s for w in sorted(deepseek.VLLM_MLA_WIDTHS) for s in deepseek.width_settings(config, w)]
    assert ((258, 62) in settings) == (not rope_aware) and (288, 32) in settings
    for r_kv, rope in settings:
        check_shapes(args(r_kv, rope), shape)
    assert shape.max_kv_rank(62, rope_aware) == (198 if rope_aware else 384)
    for rope in range(2, 63, 2):
        limit = shape.max_kv_rank(rope, rope_aware)
        check_shapes(args(limit, rope), shape)
        with pytest.raises(UserError, match=f"--kv-rank {limit + 1} exceeds the rank"):
            check_shapes(args(limit + 1, rope), shape)


def test_plain_rope_theta_recognises_plain_and_rejects_others():
    f = rope_inv_freq({"rope_type": "default", "rope_theta": 10000.0}, 64, 2048)[0]
    assert deepseek.plain_rope_theta(f) == pytest.approx(10000.0, rel=1e-5)
    assert deepseek.plain_rope_theta(f[::2]) == pytest.approx(10000.0, rel=1e-5)  # every 2nd pair: theta kept
    assert deepseek.plain_rope_theta(f[1:]) is None  # does not start at the fastest pair
    assert deepseek.plain_rope_theta(f[[0, 1, 2, 5]]) is None
    assert deepseek.plain_rope_theta(rope_inv_freq(LLAMA3, 64, 256)[0]) is None


def test_info_counts_the_latent_row_of_an_export(root, tmp_path):
    from ecomla.info import kv_info

    mla = to_mla(root, tmp_path / "mla", init="xecomla")
    export(ExportArgs(model=str(mla), out=str(tmp_path / "ds")), **QUIET)
    got = kv_info(DeepseekV3Config.from_pretrained(tmp_path / "ds"))
    assert got["kv_elements_per_token"] == 3 * (8 + 8) == kv_info(AutoModelForCausalLM.from_pretrained(mla).config)[
        "kv_elements_per_token"]


@pytest.mark.parametrize("head_dim, factor, widest", [(128, 8.0, 58), (64, 32.0, 30)])
def test_widest_plain_rope_of_llama_3_matches_docs_serving(head_dim, factor, widest):
    """docs/SERVING.md's table: Llama-3.1-8B (d_h 128, factor 8) and Llama-3.2-1B (d_h 64, factor 32) keep at most
    58 / 30 rotary dims as a plain RoPE; the suggested --rope-dim 56 / 28 fit, 64 / 32 do not."""
    from ecomla.mla.config import EcoMLAConfig

    rope = {**LLAMA3, "factor": factor}
    cfg = EcoMLAConfig(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=head_dim,
                       num_hidden_layers=1, rope_parameters=rope, max_position_embeddings=131072)
    assert deepseek.max_plain_rope_dim(cfg) == widest
