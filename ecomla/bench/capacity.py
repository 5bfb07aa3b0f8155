"""Max batch at a memory budget, found by allocating for real rather than by dividing bytes.

A trial batch B fills a fresh cache (reserved for the same rows as a timed run) to `context` tokens and runs
one decode step.
- CUDA: the budget is enforced by the caching allocator (`torch.cuda.set_per_process_memory_fraction`);
  B fits if nothing raised out-of-memory, so weights, cache, activations, workspace and fragmentation all
  count, as they would in a server.
- CPU: nothing enforces a limit, so B fits when the measured weights + cache tensors (after the real
  allocation and step) stay within the budget; transients are not counted (see decode.py).
Doubling finds a failing B, then bisection narrows [fits, fails) to within 1%.
"""

from __future__ import annotations

import dataclasses

import torch

from .caches import Run
from .decode import DecodeOpts, free_memory, time_decode, weight_bytes_total

MAX_BATCH_CAP = 1 << 16


def _is_oom(err: Exception) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower() or "ALLOC_FAILED" in str(err)


def probe(model, run: Run, batch: int, context: int, opts: DecodeOpts, device, dtype, budget: int) -> bool:
    """Does `batch` fit in `budget` bytes? (one real allocation + one decode step)"""
    trial = dataclasses.replace(opts, fill="synthetic", warmup=0)
    try:
        m = time_decode(model, run, batch, context, trial, device, dtype, steps=1, reserve=opts.warmup + opts.steps)
    except (torch.OutOfMemoryError, RuntimeError, MemoryError) as err:
        if not isinstance(err, MemoryError) and not _is_oom(err):
            raise
        ok = False
    else:
        ok = m["peak_memory_bytes"] <= budget
    free_memory(device)
    return ok


def search(fits, cap: int = MAX_BATCH_CAP) -> tuple[int, int | None, int]:
    """(largest fitting batch, smallest failing batch or None if `cap` fits, trials) for a monotone `fits`."""
    trials = 1
    if not fits(1):
        return 0, 1, trials
    lo, hi = 1, 2
    while hi <= cap:
        trials += 1
        if not fits(hi):
            break
        lo, hi = hi, hi * 2
    else:
        return lo, None, trials
    while hi - lo > max(1, lo // 100):
        mid = (lo + hi) // 2
        trials += 1
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi, trials


def max_batch(model, run: Run, context: int, budget: int, opts: DecodeOpts, device, dtype) -> dict:
    """The search result, plus a timed decode at the batch found (tokens/s at capacity)."""
    device = torch.device(device)
    if weight_bytes_total(model) >= budget:
        return {"batch": 0, "batch_fails_at": 1, "trials": 0, "memory_budget_bytes": budget}
    limit = device.type == "cuda"
    if limit:
        free_memory(device)
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    try:
        lo, hi, trials = search(lambda b: probe(model, run, b, context, opts, device, dtype, budget))
        out = {"batch": lo, "batch_fails_at": hi, "trials": trials, "memory_budget_bytes": budget}
        if lo > 0:
            out.update(time_decode(model, run, lo, context, dataclasses.replace(opts, fill="synthetic"), device, dtype))
    finally:
        if limit:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    return out
