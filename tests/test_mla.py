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
def test_prepared_decode_equals_plain_absorbed_and_prepare_again_follows_weight_updates(name, absorbs_uk, takes_x):
    """prepare_for_decode pre-multiplies the absorbed path's weights; the plain (unprepared) model gives the same
    logits, biases included, and preparing again after an in-place weight update (a training step) sees it."""
    model = tiny([SPECS[name]] * 2, qkv_bias=True, o_bias=True)
    attn = model.model.layers[0].self_attn
    x = torch.randint(3, 97, (2, 7))

    def both():
        with torch.no_grad():
            plain = model.train().eval()(x, mla_path="absorbed", use_cache=False).logits  # train() unprepares
            folded = model.prepare_for_decode()(x, mla_path="absorbed", use_cache=False).logits
        return folded, plain

    folded, plain = both()
    w = attn.prepared
    assert (w.w_uk is None, w.q_from_hidden) == (absorbs_uk, takes_x) and w.w_uv is None
    assert w.q_w.shape[1] == (64 if takes_x or SPECS[name].q_lora_rank is None else SPECS[name].q_lora_rank)
    assert torch.allclose(folded, plain, atol=1e-5), (folded - plain).abs().max()
    with torch.no_grad():
        attn.o_proj.weight.mul_(1.5)
        attn.kv_b_proj.bias.add_(0.3)
        if takes_x:
            attn.q_a_proj.weight.mul_(-1.0)
    folded2, plain2 = both()
    assert not torch.allclose(plain2, plain, atol=1e-3)
    assert torch.allclose(folded2, plain2, atol=1e-5), (folded2 - plain2).abs().max()


def test_prepared_decode_keeps_float64_precision():
    model = tiny([SPECS["full-q"]] * 2, qkv_bias=True, o_bias=True).double()
    x = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        plain = model(x, mla_path="absorbed", use_cache=False).logits
        folded = model.prepare_for_decode()(x, mla_path="absorbed", use_cache=False).logits
    assert model.model.layers[0].self_attn.prepared.q_w.dtype == torch.float64
    assert (folded - plain).abs().max() < 1e-12


def test_prepared_decode_refuses_gradients_and_a_moved_model_and_train_drops_it():
    model = tiny([SPECS["full-q"], None]).prepare_for_decode()
    assert model.decode_kernel() == "torch-gemm"  # CPU float32
    x = torch.randint(3, 97, (2, 1))
    with pytest.raises(RuntimeError, match="no gradient"):
        model(x, use_cache=False)
    model.to(torch.bfloat16)
    with torch.no_grad(), pytest.raises(RuntimeError, match="prepare_for_decode"):
        model(x, use_cache=False)
    assert model.prepare_for_decode().decode_kernel() == "sdpa"  # CPU bf16: no GEMM kernel
    model.train()
    assert model.decode_kernel() is None and model.model.layers[0].self_attn.prepared is None


@pytest.mark.parametrize("bits", [16, 4])
def test_prepared_decode_with_the_kernel_over_the_cache_equals_the_plain_model(bits):
    """Left-padded rows (the usual multi-prompt batch) decode through the kernel too, with a per-row key mask."""
    from dataclasses import replace

    from ecomla.mla.decode import DecodeKernel

    layers = [SPECS["lowrank-q"], None, SPECS["q-down-fold"]]
    plain = tiny(layers, qkv_bias=True).set_cache_bits(bits)
    prepared = tiny(layers, qkv_bias=True).set_cache_bits(bits).prepare_for_decode()
    calls = []
    for attn in prepared.mla_attention():  # count the kernel's calls and the masks it gets
        fn = attn.prepared.kernel.fn
        spy = lambda *a, fn=fn, **kw: calls.append(kw["key_mask"] is not None) or fn(*a, **kw)  # noqa: E731
        attn.prepared = replace(attn.prepared, kernel=DecodeKernel("spy", spy))
    x = torch.randint(3, 97, (3, 6))
    mask = torch.ones_like(x)
    mask[0, :3] = mask[2, :1] = 0
    x[mask == 0] = 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None,
              output_logits=True, return_dict_in_generate=True)
    a, b = plain.generate(x, **kw), prepared.generate(x, **kw)
    assert calls and all(calls) and len(calls) == 2 * 5  # every decode step of both MLA layers, masked
    assert torch.equal(a.sequences, b.sequences)
    assert torch.allclose(torch.stack(a.logits), torch.stack(b.logits), atol=1e-5)


def test_prepared_decode_only_folds_what_shrinks_the_weights():
    from ecomla.bench.decode import weight_bytes_read

    wide = tiny([MLASpec(kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=12, v_head_dim=16, q_lora_rank=24)])
    wide.prepare_for_decode()
    prepared = wide.model.layers[0].self_attn.prepared
    assert prepared.replaced == () and prepared.nbytes == 0
    assert weight_bytes_read(wide, "absorbed") == weight_bytes_read(wide)
    narrow = tiny([SPECS["full-q"]] * 2).prepare_for_decode()
    attn = narrow.model.layers[0].self_attn
    H, s = attn.num_heads, attn.spec
    replaced = 4 * (attn.q_proj.weight.numel() + attn.o_proj.weight.numel() + attn.kv_b_proj.weight.numel())
    folded = 4 * (H * (s.kv_lora_rank + s.qk_rope_head_dim) * 64 + 64 * H * s.kv_lora_rank)
    assert attn.prepared.nbytes == folded
    assert weight_bytes_read(narrow) - weight_bytes_read(narrow, "absorbed") == 2 * (replaced - folded) > 0
    down = tiny([SPECS["q-down-fold"]]).prepare_for_decode()  # q_a, q_b, kv_b, o -> one q GEMM from x, one o GEMM
    attn = down.model.layers[0].self_attn
    s = attn.spec
    replaced = sum(m.weight.numel() for m in (attn.q_a_proj, attn.q_b_proj, attn.kv_b_proj, attn.o_proj))
    folded = H * (s.kv_lora_rank + s.qk_rope_head_dim) * 64 + 64 * H * s.kv_lora_rank
    assert weight_bytes_read(down) - weight_bytes_read(down, "absorbed") == 4 * (replaced - folded) > 0
    only = tiny([SPECS["q-down-only"]]).prepare_for_decode()  # q_a + q_b -> one GEMM from x; kv_b still read (W_UK)
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


def test_rotary_tables_match_each_layers_frequencies_and_survive_a_dtype_cast():
    """One table for the whole model: GQA layers get the source's d_h/2 frequencies, fresh MLA layers a d_rope-dim
    RoPE (here YaRN, with its attention scaling), rope-pair layers their subset; `.to(bfloat16)` keeps them float32."""
    from ecomla.mla.rope import rope_inv_freq

    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    model = tiny([SPECS["lowrank-q"], None, SPECS["rope-pairs"]], mla_rope_parameters=yarn)
    pos = torch.arange(7)[None]
    ropes = model.model.rotary(pos, torch.float32)
    src, _ = rope_inv_freq(model.config.rope_parameters, 16, 256)
    fresh, scaling = rope_inv_freq(yarn, 4, 256)
    assert scaling != 1.0
    for (cos, sin), (inv, sc) in zip(ropes, [(fresh, scaling), (src, 1.0), (src[[0, 5]], 1.0)]):
        emb = pos[..., None].float() * torch.cat([inv, inv])
        assert torch.equal(cos, emb.cos() * sc) and torch.equal(sin, emb.sin() * sc)
    before = model.model.rotary.table.clone()
    model.to(torch.bfloat16)
    assert torch.equal(model.model.rotary.table, before)  # the float32 bits, not rounded to bfloat16
    bf16 = model.model.rotary(pos, torch.bfloat16)
    assert all(torch.equal(c.to(torch.bfloat16), b) for (c, _), (b, _) in zip(ropes, bf16))
