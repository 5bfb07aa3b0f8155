"""`ecomla convert` end to end on tiny Llama / Mistral / Qwen2 checkpoints, and its error messages."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

import ecomla  # noqa: F401
from ecomla.cli import main
from ecomla.convert import svd
from ecomla.convert.convert import ConvertArgs, convert
from ecomla.common import UserError
from ecomla.mla import EcoMLAForCausalLM, cache_stats
from tests.helpers import make_tokenizer


def run_convert(src, out, **kw):
    args = dict(src=str(src), out=str(out), kv_rank=16, rope_dim=8)
    args.update(kw)
    return convert(ConvertArgs(**args), log=lambda *a: None)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_convert_generate_and_measure(family, request, tmp_path):
    src = request.getfixturevalue(f"{family}_dir")
    meta = run_convert(src, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert isinstance(model, EcoMLAForCausalLM)
    assert meta["summary"]["compression"] == pytest.approx(2 * 2 * 16 / (16 + 8))
    assert meta["summary"]["params"] > 0 and (tmp_path / "out" / "tokenizer.json").exists()
    x = torch.randint(4, 100, (2, 6))
    out = model.generate(x, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, pad_token_id=3,
                         eos_token_id=None)
    assert cache_stats(out.cache)["bytes_per_token"] == 3 * (16 + 8) * 4


def test_qwen2_biases_reach_the_mla_projections(qwen2_dir, tmp_path):
    """At full rank with d_nope = d_h, the MLA projections reproduce the source q / k / v including biases."""
    run_convert(qwen2_dir, tmp_path / "out", kv_rank=64, rope_dim=4, nope_dim=16, q_rank="none")
    src = AutoModelForCausalLM.from_pretrained(qwen2_dir).eval()
    mla = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    s_attn, m_attn = src.model.layers[1].self_attn, mla.model.layers[1].self_attn
    assert s_attn.q_proj.bias is not None and m_attn.kv_b_proj.bias is not None
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        q_src = svd.select_head_dims(s_attn.q_proj(x).reshape(10, -1).T, 4, 16, 16, 4).T.reshape(2, 5, 4, 20)
        assert torch.allclose(m_attn.q_up_proj(m_attn.q_latent(x)).view(2, 5, 4, 20), q_src, atol=1e-5)
        c = m_attn.kv_a_proj_with_mqa(x)[..., :64]
        k_nope, v = m_attn.kv_b_proj(c).view(2, 5, 4, 32).split([16, 16], -1)
        k_src = s_attn.k_proj(x).view(2, 5, 2, 16).repeat_interleave(2, dim=2)
        v_src = s_attn.v_proj(x).view(2, 5, 2, 16).repeat_interleave(2, dim=2)
        assert torch.allclose(k_nope, k_src, atol=1e-5) and torch.allclose(v, v_src, atol=1e-5)


def test_hybrid_keeps_source_layers_exact(llama_dir, tmp_path):
    run_convert(llama_dir, tmp_path / "out", layers="1")
    src = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    mla = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert mla.config.mla_layer_indices == [1]
    x = torch.randint(4, 100, (2, 7))
    with torch.no_grad():
        hs = src(x, output_hidden_states=True).hidden_states
        hm = mla(x, output_hidden_states=True).hidden_states
    assert torch.allclose(hs[1], hm[1], atol=1e-6)  # layer 0 stayed GQA: identical output
    assert not torch.allclose(hs[2], hm[2], atol=1e-3)  # layer 1 is MLA now


def test_layer_specs_and_energy_ranks(llama_dir, tmp_path):
    meta = run_convert(llama_dir, tmp_path / "a", layers="every:2", kv_rank=None, rank_energy=0.9)
    rows = [r for r in meta["layers"] if r["type"] == "mla"]
    assert [r["layer"] for r in rows] == [0, 2]
    assert all(1 <= r["kv_rank"] <= 64 and r["kv_energy"] >= 0.9 for r in rows)
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["mla_layers"][1] is None and cfg["mla_layers"][0]["kv_lora_rank"] == rows[0]["kv_rank"]


def test_random_init_and_sigma_down(llama_dir, tmp_path):
    run_convert(llama_dir, tmp_path / "r", init="random")
    run_convert(llama_dir, tmp_path / "x", sigma="down")
    rnd = AutoModelForCausalLM.from_pretrained(tmp_path / "r")
    svdm = AutoModelForCausalLM.from_pretrained(tmp_path / "x")
    src = AutoModelForCausalLM.from_pretrained(llama_dir)
    w = lambda m: m.model.layers[0].self_attn.o_proj.weight  # noqa: E731
    assert torch.equal(w(rnd), w(src)) and torch.equal(w(svdm), w(src))  # o_proj copied either way
    a = rnd.model.layers[0].self_attn.kv_b_proj.weight
    b = svdm.model.layers[0].self_attn.kv_b_proj.weight
    assert not torch.allclose(a, b)


def test_yarn_option_needs_scaled_source(llama_dir, tmp_path):
    with pytest.raises(UserError, match="yarn"):
        run_convert(llama_dir, tmp_path / "y", mla_rope="yarn")
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--kv-rank", "65"], "exceeds the rank"),
        (["--rope-dim", "7"], "even"),
        (["--rope-dim", "32"], "larger than the source head dim"),
        (["--q-rank", "many"], "--q-rank"),
        (["--layers", "5"], "layer indices"),
        ([], "--kv-rank"),
        (["--init", "rope-aware", "--nope-dim", "4"], "--nope-dim"),
    ],
)
def test_bad_input_gives_one_clear_error_and_no_output(flags, message, llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["convert", str(llama_dir), str(out)]
    if flags and "--kv-rank" not in flags:
        base += ["--kv-rank", "16"]
    if "--rope-dim" not in flags:
        base += ["--rope-dim", "8"]
    assert main(base + flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_unsupported_architecture_and_missing_files(tmp_path, capsys):
    torch.manual_seed(0)
    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    qwen3.save_pretrained(tmp_path / "qwen3")
    make_tokenizer().save_pretrained(tmp_path / "qwen3")
    assert main(["convert", str(tmp_path / "qwen3"), str(tmp_path / "o1"), "--kv-rank", "8"]) == 2
    assert "'qwen3'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(tmp_path / "empty"), str(tmp_path / "o2"), "--kv-rank", "8"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["convert", "./does/not/exist", str(tmp_path / "o3"), "--kv-rank", "8"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


def test_failed_write_leaves_nothing(llama_dir, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(EcoMLAForCausalLM, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        run_convert(llama_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(llama_dir, tmp_path):
    run_convert(llama_dir, tmp_path / "out")
    with pytest.raises(UserError, match="--overwrite"):
        run_convert(llama_dir, tmp_path / "out")
    run_convert(llama_dir, tmp_path / "out", overwrite=True, kv_rank=8)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["mla_layers"][0]["kv_lora_rank"] == 8


def test_info_and_generate_cli(llama_dir, tmp_path, capsys):
    run_convert(llama_dir, tmp_path / "out")
    assert main(["info", str(tmp_path / "out"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kv_elements_per_token"] == 3 * 24 and info["source_kv_elements_per_token"] == 3 * 64
    assert info["mla_layers"] == [0, 1, 2] and info["compression"] == pytest.approx(64 / 24)
    assert main(["generate", str(tmp_path / "out"), "--chat", "--prompt", "hello world", "--max-new-tokens", "5",
                 "--json"]) == 0
    shown = capsys.readouterr()
    res = json.loads(shown.out)
    assert res["cache_bytes_per_token"] == 3 * 24 * 4 and 1 <= res["new_tokens"] <= 5 and res["tokens_per_s"] > 0
    assert "Loading weights" not in shown.err  # the CLI keeps transformers' own bars off, for every stage


def test_cli_prints_user_errors_in_one_line_and_keeps_tracebacks_for_bugs(llama_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "bad.yaml").write_text("kv_rank: [8\n")
    assert main(["convert", str(llama_dir), str(tmp_path / "o"), "--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ecomla convert: error:") and "not valid YAML" in err[0]
    from ecomla import cli

    def bug(args):
        raise ValueError("a programming error")

    monkeypatch.setitem(cli.COMMANDS, "info", cli.Command(cli.InfoArgs, bug, "help"))
    with pytest.raises(ValueError, match="a programming error"):  # not swallowed into a one-line message
        main(["info", str(llama_dir)])
