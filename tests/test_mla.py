"""The MLA model: absorbed == decompressed, latent cache inside generate(), hybrid caches, save/load."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.cache_utils import DynamicCache, DynamicLayer
from safetensors.torch import load_file, save_file

import ecomla  # noqa: F401
from ecomla.mla import EcoMLAConfig, EcoMLAForCausalLM, LatentCacheLayer, MLASpec, cache_stats


def tiny(mla_layers, qkv_bias=False, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = EcoMLAConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=len(mla_layers),
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                       mla_layers=[None if s is None else s.to_dict() for s in mla_layers], qkv_bias=qkv_bias,
                       pad_token_id=0, eos_token_id=1, **kw)
    model = EcoMLAForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm.weight" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


SPECS = {
    "lowrank-q": MLASpec(kv_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=16, q_lora_rank=24),
    "full-q": MLASpec(kv_lora_rank=8, qk_rope_head_dim=6, qk_nope_head_dim=10, v_head_dim=16, q_lora_rank=None),
    "latent-norm": MLASpec(kv_lora_rank=10, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, q_lora_rank=20,
                           latent_norm=True),
    # q_a_proj folded into the decode query GEMM (rows * D < r_q * (D + rows)), with and without W_UK
    "q-down-fold": MLASpec(kv_lora_rank=6, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=16, q_lora_rank=40),
    "q-down-only": MLASpec(kv_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=16, q_lora_rank=40),
    "rope-pairs": MLASpec(kv_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=12, v_head_dim=16, q_lora_rank=24,
                          rope_pairs=[0, 5]),
}


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("bias", [False, True])
def test_absorbed_equals_decompressed(name, bias):
    model = tiny([SPECS[name], None, SPECS[name]], qkv_bias=bias)
    x = torch.randint(3, 97, (2, 9))
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # left padding in the second row
    with torch.no_grad():
        a = model(x, attention_mask=mask, mla_path="absorbed", use_cache=False).logits
        d = model(x, attention_mask=mask, mla_path="decompressed", use_cache=False).logits
    assert torch.allclose(a, d, atol=1e-5), (a - d).abs().max()


def test_absorbed_decode_over_cache_equals_full_forward():
    model = tiny([SPECS["lowrank-q"]] * 2, qkv_bias=True)
    x = torch.randint(3, 97, (3, 12))
    with torch.no_grad():
        full = model(x, use_cache=False, mla_path="decompressed").logits
        cache = DynamicCache(config=model.config)
        pre = model(x[:, :8], cache=cache, use_cache=True).logits  # decompressed prefill
        steps = [model(x[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(8, 12)]  # absorbed
    got = torch.cat([pre] + steps, dim=1)
    assert torch.allclose(got, full, atol=1e-5)


@pytest.mark.parametrize("name,absorbs_uk,takes_x", [
    ("full-q", True, False), ("latent-norm", True, False), ("lowrank-q", False, False),
    ("q-down-fold", True, True), ("q-down-only", False, True),
])
def test_decode_fold_equals_unfolded_absorbed_and_follows_weight_updates(name, absorbs_uk, takes_x):
    """Without autograd the absorbed path uses pre-multiplied weights; with it, the per-head einsums. Same logits,
    biases included, and an in-place weight update (a training step) rebuilds the fold."""
    model = tiny([SPECS[name]] * 2, qkv_bias=True, o_bias=True)
    attn = model.model.layers[0].self_attn
    fold = attn.decode_fold()
    assert (fold.absorbs_uk, fold.takes_x) == (absorbs_uk, takes_x)
    assert (fold.q_w is not None) == (absorbs_uk or takes_x) and fold.o_w is not None
    assert fold.q_w is None or fold.q_w.shape[1] == (64 if takes_x else SPECS[name].q_lora_rank or 64)
    x = torch.randint(3, 97, (2, 7))

    def both():
        with torch.no_grad():
            folded = model(x, mla_path="absorbed", use_cache=False).logits
        with torch.enable_grad():
            plain = model(x, mla_path="absorbed", use_cache=False).logits.detach()
        return folded, plain

    folded, plain = both()
    assert torch.allclose(folded, plain, atol=1e-5), (folded - plain).abs().max()
    with torch.no_grad():
        attn.o_proj.weight.mul_(1.5)
        attn.kv_b_proj.bias.add_(0.3)
        if takes_x:
            attn.q_a_proj.weight.mul_(-1.0)
    folded2, plain2 = both()
    assert attn.decode_fold() is not fold
    assert not torch.allclose(plain2, plain, atol=1e-3)
    assert torch.allclose(folded2, plain2, atol=1e-5), (folded2 - plain2).abs().max()


def test_decode_fold_keeps_float64_precision():
    model = tiny([SPECS["full-q"]] * 2, qkv_bias=True, o_bias=True).double()
    x = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        folded = model(x, mla_path="absorbed", use_cache=False).logits
    assert model.model.layers[0].self_attn.decode_fold().q_w.dtype == torch.float64
    plain = model(x, mla_path="absorbed", use_cache=False).logits.detach()
    assert (folded - plain).abs().max() < 1e-12


def test_decode_fold_only_when_it_shrinks_the_weights():
    from ecomla.bench.decode import weight_bytes_read

    wide = tiny([MLASpec(kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=12, v_head_dim=16, q_lora_rank=24)])
    assert wide.model.layers[0].self_attn.decode_fold() is None
    assert weight_bytes_read(wide, "absorbed") == weight_bytes_read(wide)
    narrow = tiny([SPECS["full-q"]] * 2)
    attn = narrow.model.layers[0].self_attn
    H, s = attn.num_heads, attn.spec
    replaced = 4 * (attn.q_proj.weight.numel() + attn.o_proj.weight.numel() + attn.kv_b_proj.weight.numel())
    folded = 4 * (H * (s.kv_lora_rank + s.qk_rope_head_dim) * 64 + 64 * H * s.kv_lora_rank)
    assert weight_bytes_read(narrow) - weight_bytes_read(narrow, "absorbed") == 2 * (replaced - folded) > 0
    down = tiny([SPECS["q-down-fold"]])  # q_a_proj, q_b_proj, kv_b_proj, o_proj -> one q GEMM from x, one o GEMM
    attn = down.model.layers[0].self_attn
    s = attn.spec
    replaced = sum(m.weight.numel() for m in (attn.q_a_proj, attn.q_b_proj, attn.kv_b_proj, attn.o_proj))
    folded = H * (s.kv_lora_rank + s.qk_rope_head_dim) * 64 + 64 * H * s.kv_lora_rank
    assert weight_bytes_read(down) - weight_bytes_read(down, "absorbed") == 4 * (replaced - folded) > 0
    only = tiny([SPECS["q-down-only"]])  # q_a_proj + q_b_proj -> one GEMM from x; kv_b_proj still read (W_UK)
    attn = only.model.layers[0].self_attn
    s = attn.spec
    replaced = sum(m.weight.numel() for m in (attn.q_a_proj, attn.q_b_proj, attn.o_proj))
    folded = H * (s.qk_nope_head_dim + s.qk_rope_head_dim) * 64 + 64 * H * s.kv_lora_rank
    assert weight_bytes_read(only) - weight_bytes_read(only, "absorbed") == 4 * (replaced - folded) > 0


def test_mla_path_rejects_unknown():
    model = tiny([SPECS["lowrank-q"]])
    with pytest.raises(ValueError, match="mla_path"):
        model(torch.randint(3, 97, (1, 4)), mla_path="fast")


@pytest.mark.parametrize("layers", [["lowrank-q", "lowrank-q"], ["lowrank-q", None, "full-q"]])
def test_cached_greedy_equals_uncached_with_left_padding(layers):
    model = tiny([SPECS[n] if n else None for n in layers])
    x = torch.randint(3, 97, (2, 7))
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    x[0, :2] = 0
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(x, **kw)
    uncached = model.generate(x, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    # the padded row generates what it would generate alone
    alone = model.generate(x[:1, 2:], max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(cached[0, 2:], alone[0])


def test_beam_search_with_latent_cache():
    model = tiny([SPECS["lowrank-q"], None])
    x = torch.randint(3, 97, (2, 5))
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(x, **kw), model.generate(x, use_cache=False, **kw))


def test_hybrid_cache_holds_latents_and_kv():
    model = tiny([SPECS["lowrank-q"], None, SPECS["full-q"]])
    x = torch.randint(3, 97, (2, 6))
    out = model.generate(x, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, pad_token_id=0,
                         eos_token_id=None)
    layers = out.cache.layers
    assert [type(l) for l in layers] == [LatentCacheLayer, DynamicLayer, LatentCacheLayer]
    assert layers[0].keys.shape == (2, 1, 9, 12 + 4)  # [B, 1, S, r_kv + d_rope]; S = 6 + 4 - 1
    assert layers[1].keys.shape == (2, 2, 9, 16)  # [B, G, S, d_h]
    assert layers[0].values.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measured_cache_bytes_equal_formula(dtype):
    model = tiny([SPECS["lowrank-q"], None, SPECS["latent-norm"]]).to(dtype)
    x = torch.randint(3, 97, (3, 5))
    out = model.generate(x, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, pad_token_id=0,
                         eos_token_id=None)
    stats = cache_stats(out.cache)
    size = torch.empty((), dtype=dtype).element_size()
    assert stats["bytes_per_token"] == model.config.kv_elements_per_token() * size
    assert model.config.kv_elements_per_token() == (12 + 4) + 2 * 2 * 16 + (10 + 8)
    assert stats["live_bytes"] == 3 * 7 * stats["bytes_per_token"]


def test_latent_cache_preallocates_and_crops():
    layer = LatentCacheLayer()
    layer.reserve(2, 64, 5, torch.float32, "cpu")
    buf = layer._buf.data_ptr()
    for t in range(10):
        layer.update(torch.full((2, 1, 1, 5), float(t)))
    assert layer._buf.data_ptr() == buf and layer.get_seq_length() == 10  # written in place, no re-allocation
    layer.crop(-3)
    layer.update(torch.full((2, 1, 2, 5), 42.0))
    assert layer.get_seq_length() == 9 and layer.keys[0, 0, 7:, 0].tolist() == [42.0, 42.0]
    layer.batch_select_indices(torch.tensor([1]))
    layer.update(torch.ones(1, 1, 1, 5))  # adopts the re-indexed tensor, keeps going
    assert layer.keys.shape == (1, 1, 10, 5)


def test_save_load_and_auto_classes_round_trip(tmp_path):
    model = tiny([SPECS["rope-pairs"], None, SPECS["latent-norm"]], qkv_bias=True)
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), EcoMLAConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, EcoMLAForCausalLM)
    x = torch.randint(3, 97, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_load_fails_loudly_on_missing_or_unexpected_weights(tmp_path):
    model = tiny([SPECS["lowrank-q"], None])
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    sd = load_file(path)
    sd.pop("model.layers.0.self_attn.kv_b_proj.weight")
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="kv_b_proj"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    sd = load_file(path)
    sd["model.layers.0.self_attn.kv_b_proj.weight"] = torch.zeros(4 * 24, 12)
    sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(3)
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="extra"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_spec_validation_messages():
    with pytest.raises(ValueError, match="even"):
        MLASpec(kv_lora_rank=8, qk_rope_head_dim=5, qk_nope_head_dim=8, v_head_dim=16)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        MLASpec(kv_lora_rank=0, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=16)
    with pytest.raises(Exception, match="mla_layers has"):  # wrapped by huggingface_hub strict validation
        EcoMLAConfig(num_hidden_layers=2, mla_layers=[None])


def test_training_mode_uses_decompressed_path_and_backprops():
    model = tiny([SPECS["lowrank-q"], None]).train()
    x = torch.randint(3, 97, (2, 6))
    out = model(x, labels=x, use_cache=False)
    out.loss.backward()
    assert model.model.layers[0].self_attn.kv_b_proj.weight.grad is not None
    assert out.cache is None
