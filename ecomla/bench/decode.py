"""Timing one (run, batch, context) point: fill the cache, time decode steps, read bytes from live tensors.

Protocol (docs/BENCH.md): the cache is reserved for context + warm-up + timed steps, then filled by a real
prefill (timed: `prefill_s`) or, where that is too slow, by random rows written through the Cache API
(`fill: synthetic`; decode cost does not depend on the values). Each decode step feeds one token per
sequence (the argmax of the previous step) and is timed alone (CUDA events on GPU); the median of the
timed steps is reported. tokens/s = B / step time.

Bytes and bandwidth. cache_bytes_per_token is measured from the live cache (`ecomla.mla.cache_stats`:
bytes held / (B * S), summed over layers). A step must read every weight once (the input embedding
only when it is tied to lm_head; otherwise decode gathers B rows of it) and the whole cache, so
    bytes_per_step = weight bytes read + B * context * cache_bytes_per_token,   GB/s = bytes_per_step / step.
On GPU this is compared with a measured device copy bandwidth (`copy_bandwidth`).

Peak memory. On CUDA: `torch.cuda.max_memory_allocated` over fill + decode (weights, cache, activations).
On CPU there is no allocator counter, and process RSS mixes in the other model, Python and the
allocator's free lists, so we report what the tensors hold: weight bytes (+ the absorbed path's
pre-multiplied decode weights once built) + allocated cache bytes
(measured from the cache tensors, reserved rows included). Transients (activations, and the copy that
`torch.cat` makes in a DynamicCache step) are not in the CPU figure.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass

import torch

from ..mla.attention import MLAAttention
from ..mla.cache import cache_stats
from .caches import Run, allocated_bytes, fill_synthetic, make_cache
from .gqa import attention_implementation, packed_uses_gemm


@dataclass
class DecodeOpts:
    warmup: int = 3
    steps: int = 10
    fill: str = "auto"  # "auto", "prefill" or "synthetic"
    prefill_max_tokens: int = 2048  # with fill="auto": prefill when batch * context <= this
    seed: int = 0


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device) -> None:
    """Return freed cache blocks to CUDA so the next measurement starts clean (CPU frees by refcount)."""
    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def weight_bytes_read(model, path: str | None = None) -> int:
    """Bytes of the weights one decode step reads (unique tensors; an untied input embedding excluded).
    On the absorbed path, layers with pre-multiplied decode weights (`MLAAttention.decode_fold`) read those
    instead of the projections they replace."""
    params = {id(p): p for p in model.parameters()}
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    if out is None or out.weight is not emb:
        params.pop(id(emb), None)
    extra = 0
    if path == "absorbed":
        with torch.no_grad():
            for m in model.modules():
                fold = m.decode_fold() if isinstance(m, MLAAttention) else None
                if fold is None:
                    continue
                for p in (p for lin in fold.replaced(m) for p in lin.parameters()):
                    params.pop(id(p), None)
                extra += fold.nbytes()
    return extra + sum(p.numel() * p.element_size() for p in params.values())


def fold_bytes(model) -> int:
    """Bytes held by the decode folds built so far (kept beside the weights, see MLAAttention.decode_fold)."""
    folds = (m.__dict__.get("_decode_fold") for m in model.modules() if isinstance(m, MLAAttention))
    return sum(f.nbytes() for f in folds if f is not None)


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = "CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def copy_bandwidth(device, nbytes: int | None = None, iters: int = 10) -> float:
    """Measured GB/s of a large device-to-device copy, counting read + write bytes."""
    device = torch.device(device)
    nbytes = nbytes or ((2 << 30) if device.type == "cuda" else (128 << 20))
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(iters + 2):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    del src, dst
    free_memory(device)
    return 2 * nbytes / statistics.median(times) / 1e9


class StepTimer:
    """Per-step wall time: CUDA events on GPU (no sync inside the loop), perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.marks = []

    def start(self):
        self.marks.append([self._mark(), None])

    def stop(self):
        self.marks[-1][1] = self._mark()

    def _mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in self.marks]
        return [b - a for a, b in self.marks]


def set_decode_kernel(model, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, MLAAttention):
            m.decode_kernel = on


def decode_impl(run: Run, device, dtype) -> str:
    """What does the attention of a decode step for this run: the name reported in the `impl` field."""
    if run.kind == "gqa":
        if run.attn is not None:
            return "packed-gqa-gemm" if packed_uses_gemm(run.attn, device, dtype) else "packed-gqa-sdpa"
        return {"dynamic": "hf-dynamic", "static": "hf-static"}[run.cache]
    if run.path == "decompressed":
        return "sdpa-decompressed"
    from ..kernels.mla_decode import decode_fn

    with torch.inference_mode():  # as in time_decode: the Triton kernel is only used without autograd
        fn = decode_fn(torch.empty(1, 1, 1, dtype=dtype, device=device)) if run.decode_kernel else None
    return {"mla_decode_triton": "triton", "mla_decode_torch": "torch-gemm"}.get(getattr(fn, "__name__", ""), "sdpa")


def _forward(model, run: Run, ids: torch.Tensor, cache, **kw):
    mla = {"mla_path": run.path} if (run.kind == "mla" and ids.shape[1] == 1) else {}
    return model(ids, cache=cache, use_cache=True, logits_to_keep=1, **mla, **kw).logits


def _prefill(model, run: Run, ids: torch.Tensor, cache, device) -> tuple[float, torch.Tensor]:
    """(seconds, next token [B, 1]) of a real prefill of `ids` [B, S] into `cache`."""
    sync(device)
    t0 = time.perf_counter()
    tok = _forward(model, run, ids, cache).argmax(-1)
    sync(device)
    return time.perf_counter() - t0, tok


def time_decode(model, run: Run, batch: int, context: int, opts: DecodeOpts, device, dtype,
                steps: int | None = None, reserve: int | None = None) -> dict:
    """Fill a fresh cache to `context` tokens, then time decode steps; returns the measured fields.
    `steps` overrides opts.steps; the cache holds context + `reserve` rows (default: warm-up + steps)."""
    with attention_implementation(model, run.attn), torch.inference_mode():
        return _time_decode(model, run, batch, context, opts, device, dtype, steps, reserve)


def _time_decode(model, run, batch, context, opts, device, dtype, steps, reserve) -> dict:
    steps = opts.steps if steps is None else steps
    max_len = context + (opts.warmup + steps if reserve is None else reserve)
    gen = torch.Generator().manual_seed(opts.seed)
    vocab = model.config.vocab_size
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    set_decode_kernel(model, run.decode_kernel)
    cache = make_cache(model, run, batch, max_len, dtype, device)
    fill = opts.fill
    if fill == "auto":
        fill = "prefill" if batch * context <= opts.prefill_max_tokens else "synthetic"
    prefill_s = None
    if fill == "prefill":
        ids = torch.randint(vocab, (batch, context), generator=gen).to(device)
        prefill_s, tok = _prefill(model, run, ids, cache, device)
    else:
        fill_synthetic(cache, model.config, batch, context, dtype, device)
        tok = torch.randint(vocab, (batch, 1), generator=gen).to(device)
    timer = StepTimer(device)
    for _ in range(opts.warmup + steps):
        timer.start()
        tok = _forward(model, run, tok, cache).argmax(-1)  # [B, 1]
        timer.stop()
    step_s = statistics.median(timer.seconds()[opts.warmup:])
    stats = cache_stats(cache)
    out = {"fill": fill, "prefill_s": prefill_s, "step_s": step_s, "cache_bytes_per_token": stats["bytes_per_token"],
           "cache_seq_len": stats["seq_len"], "cache_allocated_bytes": allocated_bytes(cache)}
    if torch.device(device).type == "cuda":
        out["peak_memory_bytes"], out["peak_memory_source"] = torch.cuda.max_memory_allocated(device), "cuda"
    else:
        out["peak_memory_bytes"] = weight_bytes_total(model) + fold_bytes(model) + out["cache_allocated_bytes"]
        out["peak_memory_source"] = "weights+cache tensors"
    del cache
    free_memory(device)
    return out


def weight_bytes_total(model) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def bandwidth_fields(m: dict, batch: int, context: int, weight_bytes: int, copy_gbps: float | None) -> dict:
    """tokens/s, bytes a step must read, achieved GB/s and its share of the measured copy bandwidth."""
    bytes_per_step = weight_bytes + batch * context * m["cache_bytes_per_token"]
    gbps = bytes_per_step / m["step_s"] / 1e9
    return {"tokens_per_s": batch / m["step_s"], "step_ms": m["step_s"] * 1e3, "bytes_per_step": bytes_per_step,
            "gb_per_s": gbps, "copy_gb_per_s": copy_gbps,
            "roofline_fraction": gbps / copy_gbps if copy_gbps else None}
