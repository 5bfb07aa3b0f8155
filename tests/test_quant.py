"""The quantized latent cache (ecomla/mla/quant.py): round trip, cached == uncached, absorbed == decompressed, bytes."""

import pytest
import torch
from transformers.cache_utils import DynamicCache

from ecomla.info import kv_info
from ecomla.mla import EcoMLAForCausalLM, LatentCacheLayer, cache_stats
from ecomla.mla.quant import LatentFormat, dequantize_groups, fake_quantize, pack, quantize_groups
from tests.test_mla import SPECS, tiny

HYBRID = [SPECS["lowrank-q"], None, SPECS["latent-norm"]]  # r_kv 12 + 4 and 10 + 8: groups of 32 cut short


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n, group", [(64, 32), (160, 64), (12, 32), (37, 8)])
def test_round_trip_error_is_within_the_group_bound(bits, n, group):
    """|x - dequantize(quantize(x))| <= scale / 2 per group, plus the fp16 rounding of the stored scale and zero."""
    g = torch.Generator().manual_seed(bits * n)
    x = torch.randn(3, 5, n, generator=g) * torch.rand(3, 5, 1, generator=g) * 8 + 3  # groups of different ranges
    codes, sz = quantize_groups(x, bits, group)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1 and sz.shape == (3, 5, -(-n // group), 2)
    back = dequantize_groups(codes, sz, group, torch.float32)
    scale = sz[..., 0].float().repeat_interleave(group, -1)[..., :n]
    fp16 = 2.0**-11 * (x.abs() + (2**bits - 1) * scale)  # rounding of zero (~|x|) and of scale (times the code)
    err = (back - x).abs()
    assert (err <= scale / 2 + fp16 + 1e-6).all(), (err - scale / 2 - fp16).max()
    assert err.max() > scale.min() / 8  # it is a quantization: an identity would pass the bound too
    if bits == 4:  # the packed nibbles read back as the codes they hold
        assert torch.equal(dequantize_groups(pack(codes, 4), sz, group, torch.float32, nibbles=n), back)
    assert pack(codes, bits).shape[-1] == -(-n * bits // 8)


def test_a_constant_group_reads_back_exactly():
    x = torch.full((2, 32), 1.5)
    assert torch.equal(dequantize_groups(*quantize_groups(x, 4, 32), 32, torch.float32), x)


@pytest.mark.parametrize("fmt", [LatentFormat(12, 4, 4), LatentFormat(10, 8, 8), LatentFormat(37, 6, 4, group=8),
                                 LatentFormat(160, 32, 4, rope_bits=4), LatentFormat(64, 32, 8, rope_bits=8)])
def test_rows_hold_the_fake_quantized_latent_bit_for_bit(fmt):
    latent = torch.randn(2, 7, fmt.r_kv + fmt.d_rope, dtype=torch.float64) * 3
    rows = fmt.quantize(latent)
    assert rows.dtype == torch.uint8 and rows.shape == (2, 7, fmt.row_bytes) and fmt.row_bytes % 2 == 0
    assert torch.equal(fmt.dequantize(rows, torch.float64), fmt.fake(latent))
    assert not torch.equal(fmt.fake(latent), latent)


@pytest.mark.parametrize("fmt", [LatentFormat(64, 32, 4, rope_bits=4), LatentFormat(16, 32, 4, rope_bits=4),
                                 LatentFormat(160, 32, 8, rope_bits=8), LatentFormat(48, 24, 4),
                                 LatentFormat(37, 6, 4, group=8), LatentFormat(40, 8, 8, rope_bits=4, group=16)])
def test_planes_cover_the_latent_and_read_it_back_bit_for_bit(fmt):
    """The CPU decode GEMMs read these: every element in exactly one plane, each the value `dequantize` gives."""
    rows = fmt.quantize(torch.randn(3, 5, fmt.r_kv + fmt.d_rope) * 3)
    want, got = fmt.dequantize(rows, torch.float32), torch.full((3, 5, fmt.r_kv + fmt.d_rope), float("nan"))
    planes = fmt.dequantize_planes(rows)
    for where, x in planes:
        assert x.dtype == torch.float32 and got[..., where].isnan().all()  # no element twice
        got[..., where] = x
    assert torch.equal(got, want)
    uniform = fmt.r_kv % fmt.group == 0 or fmt.r_kv < fmt.group
    assert (planes[0][0].step == 2) == (fmt.bits == 4 and uniform and fmt.r_kv % 2 == 0)  # the nibbles apart


def test_row_bytes_count_scales_and_match_the_smollm2_accounting():
    """Bytes per token and layer against the bf16 GQA cache of SmolLM2 (768). `--cache-bits` (LatentFormat.of)
    quantizes c_kv and the rotary part alike: 64 + 32 at 4 bits is 12.8x, at 8 bits 7.1x; 160 + 32 at 4 bits 6.4x.
    A format built with an fp16 rotary part (rope_bits 16, latent_quant.py's baseline) pays 2 bytes per rotary dim:
    64 + 32 at 4 bits is 7.4x. Codes + 4 bytes (scale and zero) per group of 32."""
    assert LatentFormat.of(64, 32, 4).row_bytes == 32 + 2 * 4 + 16 + 4 == 60
    assert LatentFormat.of(64, 32, 8).row_bytes == 64 + 2 * 4 + 32 + 4 == 108
    assert LatentFormat.of(160, 32, 4).row_bytes == 80 + 5 * 4 + 16 + 4 == 120
    assert LatentFormat.of(16, 32, 4).row_bytes == 8 + 4 + 16 + 4 == 32
    assert LatentFormat(160, 32, 8).row_bytes == 160 + 5 * 4 + 64 == 244
    assert LatentFormat(160, 32, 4).row_bytes == 80 + 5 * 4 + 64 == 164
    assert LatentFormat(64, 32, 4).row_bytes == 32 + 2 * 4 + 64 == 104
    assert LatentFormat(16, 32, 4).row_bytes == 8 + 4 + 64 == 76
    assert LatentFormat(11, 4, 4).row_bytes == 6 + 4 + 8  # 6 bytes of codes; 17 padded to 18
    assert LatentFormat.of(160, 32, 16) is None


def test_straight_through_gradient():
    fmt = LatentFormat(12, 4, 4)
    x = torch.randn(3, 16, requires_grad=True)
    g = torch.randn(3, 16)
    (fake_quantize(x, fmt) * g).sum().backward()
    assert torch.equal(x.grad, g)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("split", [1, 4, 9])  # prefill length; the rest are one-token absorbed steps
def test_cached_decoding_equals_the_uncached_forward_with_the_same_fake_quantization(bits, split):
    """In float64, so rounding in the GEMMs cannot move a value across a quantization boundary."""
    model = tiny(HYBRID, qkv_bias=True).double().set_cache_bits(bits)
    x = torch.randint(3, 97, (3, 12))
    with torch.no_grad():
        full = model(x, use_cache=False, mla_path="decompressed").logits
        cache = DynamicCache(config=model.config)
        pre = model(x[:, :split], cache=cache, use_cache=True).logits
        steps = [model(x[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(split, 12)]
        plain = model.set_cache_bits(16)(x, use_cache=False).logits
    got = torch.cat([pre, *steps], dim=1)
    assert cache.layers[0].keys.dtype == torch.uint8  # the rows that were read are the quantized ones
    assert (got - full).abs().max() < 1e-12
    assert (plain - full).abs().max() > 1e-4  # and the quantization did change the logits


@pytest.mark.parametrize("bits", [8, 4])
def test_absorbed_equals_decompressed_with_the_quantized_cache(bits):
    model = tiny(HYBRID, qkv_bias=True).set_cache_bits(bits)
    x = torch.randint(3, 97, (2, 9))
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    with torch.no_grad():
        out = {}
        for path in ("absorbed", "decompressed"):
            cache = DynamicCache(config=model.config)
            out[path] = model(x, attention_mask=mask, cache=cache, use_cache=True, mla_path=path).logits
            assert cache.layers[2].keys.dtype == torch.uint8
        uncached = model(x, attention_mask=mask, use_cache=False, mla_path="absorbed").logits
    assert torch.allclose(out["absorbed"], out["decompressed"], atol=1e-5)
    assert torch.allclose(uncached, out["decompressed"], atol=1e-5)


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_live_cache_bytes_equal_the_formula(bits):
    """generate() builds its cache from the config (DynamicCache(config=...)); the bytes it holds per token are the
    row bytes of every MLA layer, scales included, plus the kept layer's K/V."""
    model = tiny(HYBRID).set_cache_bits(bits)
    out = model.generate(torch.randint(3, 97, (3, 5)), max_new_tokens=3, do_sample=False,
                         return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    layers = out.cache.layers
    assert type(layers[0]) is LatentCacheLayer and layers[0].keys.dtype == (torch.float32 if bits == 16 else torch.uint8)
    stats = cache_stats(out.cache)
    kept = 2 * 2 * 16 * 4  # fp32 K/V of the GQA layer
    # per layer: scale + zero of the c_kv group and of the k_rope group, then the codes (r_kv 12 + 4, 10 + 8)
    rows = {16: 4 * (16 + 18), 8: (4 + 4 + 12 + 4) + (4 + 4 + 10 + 8), 4: (4 + 4 + 6 + 2) + (4 + 4 + 5 + 4 + 1)}[bits]
    assert stats["bytes_per_token"] == rows + kept == model.config.kv_bytes_per_token(4)
    assert stats["live_bytes"] == 3 * 7 * stats["bytes_per_token"]
    info = kv_info(model.config)
    assert info["kv_bytes_per_token"] == model.config.kv_bytes_per_token(2) and info["cache_bits"] == bits
    assert kv_info(tiny(HYBRID).config, bits) == info  # `ecomla info --cache-bits` on a 16-bit checkpoint
    assert info["source_kv_bytes_per_token"] == 3 * 2 * 2 * 16 * 2  # the source's K/V in bf16


@pytest.mark.parametrize("bits", [8, 4])
def test_cache_bits_are_saved_and_decode_after_a_load(tmp_path, bits):
    model = tiny(HYBRID).set_cache_bits(bits)
    model.save_pretrained(tmp_path)
    loaded = EcoMLAForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.cache_bits == bits and loaded.model.layers[0].self_attn.latent_format.bits == bits
    x = torch.randint(3, 97, (2, 5))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None, num_beams=2)
    assert torch.equal(loaded.generate(x, **kw), model.generate(x, use_cache=False, **kw))  # beams reorder byte rows


def test_training_reads_the_fake_quantized_latent_and_gradients_reach_the_latent_projection():
    """What distill --cache-bits trains: the uncached forward in train mode reads the quantized latent."""
    x = torch.randint(3, 97, (2, 8))
    losses, grads = {}, {}
    for bits in (16, 4):
        model = tiny(HYBRID).set_cache_bits(bits).train()
        loss = model(x, labels=x, use_cache=False).loss
        loss.backward()
        losses[bits], grads[bits] = loss.item(), model.model.layers[0].self_attn.kv_a_proj_with_mqa.weight.grad
    assert losses[4] != losses[16]
    assert grads[4] is not None and grads[4].abs().sum() > 0 and not torch.equal(grads[4], grads[16])


@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_aware_training_runs_under_cpu_bf16_autocast(bits):
    """distill --precision auto trains in bf16 autocast on CPUs with bf16 units (AMX); the fake quantization must
    run there and give the same codes as without autocast (CPU autocast refuses to stack fp16 tensors)."""
    x = torch.randn(3, 5, 40)
    fmt = LatentFormat(32, 8, bits)
    plain = (*quantize_groups(x, bits, 32), fmt.fake(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(torch.equal(a, b) for a, b in zip((*quantize_groups(x, bits, 32), fake_quantize(x, fmt)), plain))
        model = tiny(HYBRID).set_cache_bits(bits).train()
        ids = torch.randint(3, 97, (2, 8))
        model(ids, labels=ids, use_cache=False).loss.backward()
    assert model.model.layers[0].self_attn.kv_a_proj_with_mqa.weight.grad.abs().sum() > 0
