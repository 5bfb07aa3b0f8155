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
allocator's free lists, so we report what the tensors hold: weight bytes (+ the folded decode weights of a
prepared model) + allocated cache bytes (measured from the cache tensors, reserved rows included).
Transients (activations, and the copy that `torch.cat` makes in a DynamicCache step) are not in the CPU figure.
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..mla.cache import cache_stats
from .runs import Run, attention_implementation, fill_synthetic


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


def _prepared(model) -> list:
    """The MLA layers that carry a decode preparation (none for a GQA model)."""
    layers = model.mla_attention() if hasattr(model, "mla_attention") else []
    return [a for a in layers if a.prepared is not None]


def weight_bytes_read(model, path: str | None = None) -> int:
    """Bytes of the weights one decode step reads (unique tensors; an untied input embedding excluded).
    On the absorbed path, layers prepared with folded weights (`model.prepare_for_decode`) read those instead
    of the projections they replace."""
    params = {id(p): p for p in model.parameters()}
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    if out is None or out.weight is not emb:
        params.pop(id(emb), None)
    extra = 0
    if path == "absorbed":
        for attn in _prepared(model):
            for p in (p for name in attn.prepared.replaced for p in getattr(attn, name).parameters()):
                params.pop(id(p), None)
            extra += attn.prepared.nbytes
    return extra + sum(p.numel() * p.element_size() for p in params.values())


def held_bytes(model) -> int:
    """Bytes the model's tensors hold: unique parameters plus the folded copies of a decode preparation."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() * p.element_size() for p in params) + sum(a.prepared.nbytes for a in _prepared(model))


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        name = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "CPU")
    except OSError:
        name = "CPU"
    return f"{name} ({torch.get_num_threads()} threads)"


def copy_bandwidth(device, nbytes: int | None = None, iters: int = 10) -> float:
    """Measured GB/s of a large device-to-device copy, counting read + write bytes (median of `iters` copies)."""
    device = torch.device(device)
    nbytes = nbytes or ((2 << 30) if device.type == "cuda" else (128 << 20))
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = step_seconds(functools.partial(dst.copy_, src), iters + 2, device)[2:]  # two warm-up copies
    del src, dst
    free_memory(device)
    return 2 * nbytes / statistics.median(seconds) / 1e9


def step_seconds(step: Callable[[], None], n: int, device) -> list[float]:
    """Wall time of each of `n` back-to-back calls of `step`: CUDA events on GPU (no sync inside the loop),
    perf_counter on CPU."""
    if torch.device(device).type == "cuda":
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        marks[0].record()
        for mark in marks[1:]:
            step()
            mark.record()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
    marks = [time.perf_counter()]
    for _ in range(n):
        step()
        marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks, marks[1:])]


def _forward(model, run: Run, ids: torch.Tensor, cache) -> torch.Tensor:
    mla = {"mla_path": run.mla_path} if (run.mla_path and ids.shape[1] == 1) else {}
    return model(ids, cache=cache, use_cache=True, logits_to_keep=1, **mla).logits


def time_decode(model, run: Run, batch: int, context: int, opts: DecodeOpts, device, dtype,
                steps: int | None = None, reserve: int | None = None) -> dict:
    """Fill a fresh cache to `context` tokens, then time decode steps; returns the measured fields. The model is
    timed as it is: put it in the run's state first (`runs.prepare`). `steps` overrides opts.steps; the cache
    holds context + `reserve` rows (default: warm-up + steps)."""
    steps = opts.steps if steps is None else steps
    gen = torch.Generator().manual_seed(opts.seed)
    vocab = model.config.vocab_size
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fill = opts.fill
    if fill == "auto":
        fill = "prefill" if batch * context <= opts.prefill_max_tokens else "synthetic"
    prefill_s = None
    with attention_implementation(model, run.attn_implementation), torch.inference_mode():
        cache = run.cache(model, batch, context + (opts.warmup + steps if reserve is None else reserve), dtype, device)
        if fill == "prefill":
            ids = torch.randint(vocab, (batch, context), generator=gen).to(device)  # [B, S]
            sync(device)
            t0 = time.perf_counter()
            tok = _forward(model, run, ids, cache).argmax(-1)  # [B, 1]
            sync(device)
            prefill_s = time.perf_counter() - t0
        else:
            fill_synthetic(cache, model.config, batch, context, dtype, device)
            tok = torch.randint(vocab, (batch, 1), generator=gen).to(device)

        def step(cache=cache):  # one token per sequence: the argmax of the previous step
            nonlocal tok
            tok = _forward(model, run, tok, cache).argmax(-1)  # [B, 1]

        step_s = statistics.median(step_seconds(step, opts.warmup + steps, device)[opts.warmup:])
    stats = cache_stats(cache)
    out = {"fill": fill, "prefill_s": prefill_s, "step_s": step_s, "cache_bytes_per_token": stats["bytes_per_token"],
           "cache_seq_len": stats["seq_len"], "cache_allocated_bytes": stats["allocated_bytes"]}
    if torch.device(device).type == "cuda":
        out["peak_memory_bytes"], out["peak_memory_source"] = torch.cuda.max_memory_allocated(device), "cuda"
    else:
        out["peak_memory_bytes"] = held_bytes(model) + out["cache_allocated_bytes"]
        out["peak_memory_source"] = "weights+cache tensors"
    del cache, step  # step holds the cache too
    free_memory(device)
    return out


def bandwidth_fields(m: dict, batch: int, context: int, weight_bytes: int, copy_gbps: float | None) -> dict:
    """tokens/s, bytes a step must read, achieved GB/s and its share of the measured copy bandwidth."""
    bytes_per_step = weight_bytes + batch * context * m["cache_bytes_per_token"]
    gbps = bytes_per_step / m["step_s"] / 1e9
    return {"tokens_per_s": batch / m["step_s"], "step_ms": m["step_s"] * 1e3, "bytes_per_step": bytes_per_step,
            "gb_per_s": gbps, "copy_gb_per_s": copy_gbps,
            "roofline_fraction": gbps / copy_gbps if copy_gbps else None}
