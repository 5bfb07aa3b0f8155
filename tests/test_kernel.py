"""The absorbed-MLA decode kernels (ecomla/kernels) against an explicit per-head reference.

- `mla_decode_torch` (the CPU decode path and the reference) vs a loop over sequences and heads, over float rows and
  over quantized byte rows (ecomla.mla.quant), with per-row key masks (left padding).
- The Triton kernel under Triton's CPU interpreter: this file re-runs itself in a subprocess with
  TRITON_INTERPRET=1 (it must be set before triton is imported, so it cannot leak into other tests).
  fp32 and fp16 only: the interpreter's bfloat16 `tl.dot` is wrong (triton-lang/triton#11584).
- The kernel a decode preparation picks for a device and dtype (`ecomla.mla.decode.pick_kernel`).
- On a CUDA machine: the compiled kernel in bfloat16, and the model's decode through the kernel.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from ecomla.kernels import mla_decode
from ecomla.kernels.mla_decode import mla_decode_torch, mla_decode_triton, triton_available
from ecomla.mla.decode import pick_kernel
from ecomla.mla.quant import LatentFormat

pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")  # triton 3.9's notice about a default
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
# (B, H, r_kv, d_rope, S, num_splits): non-power-of-two widths, several splits, splits left empty by short lengths
CASES = [
    (2, 5, 48, 24, 100, 3),
    (1, 9, 16, 32, 70, None),
    (1, 12, 160, 32, 40, 8),
    (1, 32, 64, 32, 70, 4),
    (2, 3, 100, 6, 33, 6),
]


def explicit(q_lat, q_rope, latent, scale, lengths, key_mask=None):
    """softmax(scale * (q_lat . c_kv + q_rope . k_rope)) @ c_kv, one sequence and head at a time, float64."""
    B, H, r = q_lat.shape
    out = torch.zeros(B, H, r, dtype=torch.float64)
    for b in range(B):
        rows = latent[b, : int(lengths[b])].double()
        if key_mask is not None:
            rows = rows[key_mask[b, : int(lengths[b])].cpu()]
        for h in range(H):
            s = scale * (rows[:, :r] @ q_lat[b, h].double() + rows[:, r:] @ q_rope[b, h].double())
            out[b, h] = torch.softmax(s, 0) @ rows[:, :r]
    return out


def make_inputs(B, H, r, d_rope, S, dtype=torch.float32, device="cpu", seed=0):
    """Query pieces and a latent cache view [B, 1, S, W] of a larger buffer (as LatentCacheLayer returns)."""
    g = torch.Generator().manual_seed(seed)
    q_lat, q_rope = torch.randn(B, H, r, generator=g), torch.randn(B, H, d_rope, generator=g)
    buf = torch.randn(B, 1, S + 5, r + d_rope, generator=g)
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[0] = S
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(q_lat), cast(q_rope), cast(buf)[:, :, :S], lengths.to(device)


def quantized(latent, bits, rope_bits=16):
    """(byte rows [B, 1, S, row_bytes] of a larger buffer, as the cache holds them; the format; the float latent
    [B, S, W] they read back as)."""
    B, _, S, W = latent.shape
    r, d_rope = W - QUANT_ROPE[W], QUANT_ROPE[W]
    fmt = LatentFormat(r, d_rope, bits, rope_bits=rope_bits)
    buf = torch.zeros(B, 1, S + 3, fmt.row_bytes, dtype=torch.uint8, device=latent.device)
    buf[:, :, :S] = fmt.quantize(latent.float())
    return buf[:, :, :S], fmt, fmt.dequantize(buf[:, 0, :S], torch.float32)


QUANT_ROPE = {r + d: d for _, _, r, d, _, _ in CASES}  # row width -> d_rope


def left_padding(lengths, S, seed=1):
    """[B, S] bool: each sequence's first rows masked (left padding), at least one row of its length kept."""
    g = torch.Generator().manual_seed(seed)
    pad = [int(torch.randint(0, int(n), (1,), generator=g)) for n in lengths]
    return torch.arange(S)[None, :] >= torch.tensor(pad)[:, None]


@pytest.mark.parametrize("case", CASES[:3])
@pytest.mark.parametrize("bits, rope_bits", [(8, 16), (4, 16), (4, 4)])
def test_torch_decode_reads_quantized_rows_and_key_masks(case, bits, rope_bits, monkeypatch):
    B, H, r, d_rope, S, _ = case
    q_lat, q_rope, latent, lengths = make_inputs(B, H, r, d_rope, S)
    rows, fmt, back = quantized(latent, bits, rope_bits)
    keys = left_padding(lengths, S)
    for lens, mask in ((None, None), (lengths, keys), (None, keys)):
        want = explicit(q_lat, q_rope, back, 0.3, lens if lens is not None else [S] * B, mask)
        for budget in (1, 1 << 30):  # one sequence per dequantized chunk, or all at once
            monkeypatch.setattr(mla_decode, "DEQUANT_CHUNK_BYTES", budget)
            got = mla_decode_torch(q_lat, q_rope, rows, 0.3, lengths=lens, key_mask=mask, fmt=fmt)
            assert torch.allclose(got.double(), want, atol=1e-5), (lens is None, mask is None, budget)


def test_torch_decode_over_quantized_planes_carries_gradients_to_the_query():
    """The planes' autograd form (softmax, outputs gathered per plane) equals the inference form and reaches q."""
    B, H, r, d_rope, S, _ = CASES[2]
    q_lat, q_rope, latent, lengths = make_inputs(B, H, r, d_rope, S)
    rows, fmt, _ = quantized(latent, 4, 4)
    with torch.no_grad():
        want = mla_decode_torch(q_lat, q_rope, rows, 0.3, lengths=lengths, fmt=fmt)
    q_lat.requires_grad_(True)
    got = mla_decode_torch(q_lat, q_rope, rows, 0.3, lengths=lengths, fmt=fmt)
    got.square().sum().backward()
    assert torch.allclose(got.detach(), want, atol=1e-6) and q_lat.grad.abs().sum() > 0


@pytest.mark.parametrize("case", CASES[:3])
@pytest.mark.parametrize("grad", [False, True])  # inference (in-place exp, late normalisation) and autograd
def test_torch_decode_matches_explicit_reference(case, grad):
    B, H, r, d_rope, S, _ = case
    q_lat, q_rope, latent, lengths = make_inputs(B, H, r, d_rope, S)
    want = explicit(q_lat, q_rope, latent[:, 0], 0.3, lengths)
    with torch.set_grad_enabled(grad):
        got = mla_decode_torch(q_lat, q_rope, latent, 0.3, lengths=lengths)
    assert torch.allclose(got.double(), want, atol=1e-5)
    full = mla_decode_torch(q_lat, q_rope, latent[:, 0], 0.3)  # [B, S, W] input, all rows
    assert torch.allclose(full.double(), explicit(q_lat, q_rope, latent[:, 0], 0.3, [S] * B), atol=1e-5)


def test_torch_decode_rejects_bad_cache_shapes():
    q_lat, q_rope, latent, _ = make_inputs(1, 2, 8, 4, 5)
    with pytest.raises(ValueError, match=r"\[B, 1, S, W\]"):
        mla_decode_torch(q_lat, q_rope, latent.expand(1, 2, 5, 12), 1.0)


def test_pick_kernel_by_device_and_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert pick_kernel(cpu, torch.float32).fn is mla_decode_torch  # CPU float32: the two-GEMM path
    assert pick_kernel(cpu, torch.float32).name == "torch-gemm"
    assert pick_kernel(cpu, torch.bfloat16) is None  # CPU bf16: the SDPA path (fp32 score accumulation)
    assert pick_kernel(cpu, torch.float32, "sdpa") is None
    assert pick_kernel(cpu, torch.bfloat16, "torch-gemm").fn is mla_decode_torch  # an explicit choice wins
    auto = pick_kernel(cuda, torch.bfloat16)  # no GPU needed: the choice only reads the device type
    if triton_available():
        assert (auto.name, auto.fn) == ("triton", mla_decode_triton)
    else:
        assert auto is None
    with pytest.raises(ValueError, match="decode kernel"):
        pick_kernel(cpu, torch.float32, "fast")


def _interpreter_results() -> list[dict]:
    """Run by the subprocess: every case in fp32 with and without per-sequence lengths, in fp16, over quantized rows
    (8 and 4 bits, k_rope in fp16 or quantized too) with and without a left-padding key mask, and over fp32 rows with
    one."""
    from ecomla.kernels.mla_decode import mla_decode_triton

    out = []
    for B, H, r, d_rope, S, splits in CASES:
        for dtype in (torch.float32, torch.float16):
            q_lat, q_rope, latent, lengths = make_inputs(B, H, r, d_rope, S, dtype=dtype)
            for lens in ((None, lengths) if dtype == torch.float32 else (lengths,)):
                got = mla_decode_triton(q_lat, q_rope, latent, 0.2, lengths=lens, num_splits=splits)
                want = explicit(q_lat, q_rope, latent[:, 0], 0.2, lens if lens is not None else [S] * B)
                out.append({"case": [B, H, r, d_rope, S, splits], "dtype": str(dtype), "lengths": lens is not None,
                            "err": (got.double() - want).abs().max().item(), "shape": list(got.shape)})
        q_lat, q_rope, latent, lengths = make_inputs(B, H, r, d_rope, S)
        for bits, rope, lens, keys in ((8, 16, lengths, None), (4, 16, None, None), (4, 4, None, None),
                                       (4, 16, lengths, left_padding(lengths, S)), (8, 8, None, left_padding([S] * B, S)),
                                       (16, 16, lengths, left_padding(lengths, S))):
            rows, fmt, back = quantized(latent, bits, rope) if bits < 16 else (latent, None, latent[:, 0])
            got = mla_decode_triton(q_lat, q_rope, rows, 0.2, lengths=lens, key_mask=keys, fmt=fmt, num_splits=splits)
            want = explicit(q_lat, q_rope, back, 0.2, [S] * B if lens is None else lens, keys)
            out.append({"case": [B, H, r, d_rope, S, splits], "dtype": f"int{bits}/{rope}", "mask": keys is not None,
                        "err": (got.double() - want).abs().max().item(), "shape": list(got.shape)})
    return out


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install -e .[test] installs it)")
def test_triton_kernel_under_cpu_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__, "--interpret"], env=env, capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(CASES) * 9
    for r in results:
        tol = 2e-3 if r["dtype"] == "torch.float16" else 1e-5  # fp16 output rounding (|o| < 4)
        assert r["err"] < tol, r
        assert r["shape"] == r["case"][:3]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("cc, r_kv, d_rope, H, bits, rope_bits", [
    (90, 64, 32, 32, 16, 16), (80, 48, 24, 9, 16, 16), (90, 160, 32, 20, 16, 16), (90, 64, 32, 32, 4, 16),
    (80, 160, 32, 9, 8, 16), (90, 64, 32, 9, 4, 4)])
def test_kernel_compiles_to_tensor_core_code_without_a_gpu(cc, r_kv, d_rope, H, bits, rope_bits):
    """Compile mode (not the interpreter) for sm_90 / sm_80 with triton's bundled ptxas: the bf16 dot products
    must become tensor-core MMAs. Catches compile-only errors (layouts, constexpr branches) on a CPU machine."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ecomla.kernels import triton_mla as K

    block_h, block_c, block_r, block_n = K._blocks(H, r_kv, d_rope)
    fmt = None if bits == 16 else LatentFormat(r_kv, d_rope, bits, rope_bits=rope_bits)
    const = dict(R_KV=r_kv, D_ROPE=d_rope, NUM_SPLITS=3, HAS_LENS=True, HAS_MASK=True, **K._quant_args(fmt, r_kv, d_rope),
                 BLOCK_H=block_h, BLOCK_C=block_c, BLOCK_R=block_r, BLOCK_N=block_n, DOT_PRECISION=None)
    types = {"Q_lat": "*bf16", "Q_rope": "*bf16", "KV": "*bf16" if fmt is None else "*u8",
             "KV16": "*bf16" if fmt is None else "*fp16", "Lens": "*i32", "Mask": "*i1", "Mid_O": "*fp32",
             "Mid_LSE": "*fp32", "scale_log2": "fp32"}
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in K._split_kernel.arg_names}
    try:
        kernel = triton.compile(ASTSource(K._split_kernel, sig, const), target=GPUTarget("cuda", cc, 32),
                                options={"num_warps": 4, "num_stages": 2})
    except RuntimeError as err:
        if "ptxas" in str(err).lower() and "not found" in str(err).lower():
            pytest.skip(f"no ptxas for ahead-of-time compilation: {err}")
        raise
    assert "mma.sync.aligned" in kernel.asm["ptx"] and ".bf16.bf16.f32" in kernel.asm["ptx"]


@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("case", CASES + [(4, 32, 64, 32, 8192, None), (2, 32, 128, 32, 3000, None)])
def test_triton_kernel_bf16_on_gpu(case):
    from ecomla.kernels.mla_decode import mla_decode_triton

    B, H, r, d_rope, S, splits = case
    q_lat, q_rope, latent, lengths = make_inputs(B, H, r, d_rope, S, dtype=torch.bfloat16, device="cuda")
    keys = left_padding(lengths.cpu(), S).cuda()
    for lens in (None, lengths):
        got = mla_decode_triton(q_lat, q_rope, latent, 0.125, lengths=lens, num_splits=splits)
        want = mla_decode_torch(q_lat, q_rope, latent, 0.125, lengths=lens)  # fp32 math on the same bf16 inputs
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    QUANT_ROPE.setdefault(r + d_rope, d_rope)
    for bits in (8, 4):  # the quantized rows, read with a left-padding mask: as the CPU path reads them
        rows, fmt, _ = quantized(latent, bits)
        got = mla_decode_triton(q_lat, q_rope, rows, 0.125, lengths=lengths, key_mask=keys, fmt=fmt, num_splits=splits)
        want = mla_decode_torch(q_lat, q_rope, rows, 0.125, lengths=lengths, key_mask=keys, fmt=fmt)
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")
def test_model_decode_through_kernel_matches_sdpa_path_on_gpu():
    from ecomla.bench.runs import latent_cache
    from ecomla.bench.shapes import mla_config, shape_config, synthetic_model

    model = synthetic_model(mla_config(shape_config("tiny"), 12, 6), torch.bfloat16, "cuda", 0)
    x = torch.randint(4, 128, (3, 20), device="cuda")
    logits = {}
    with torch.inference_mode():
        for kernel in ("auto", "sdpa"):
            assert model.prepare_for_decode(kernel=kernel).decode_kernel() == ("triton" if kernel == "auto" else "sdpa")
            cache = latent_cache(model, 3, 20, torch.bfloat16, "cuda")
            model(x[:, :12], cache=cache)
            logits[kernel] = torch.cat([model(x[:, t : t + 1], cache=cache).logits for t in range(12, 20)], 1).float()
    torch.testing.assert_close(logits["auto"], logits["sdpa"], atol=5e-2, rtol=5e-2)


if __name__ == "__main__" and sys.argv[1:] == ["--interpret"]:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    print(json.dumps(_interpreter_results()))
