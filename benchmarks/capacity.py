"""Max batch at a memory budget, found by allocating for real rather than by dividing bytes.

    python benchmarks/capacity.py --shape llama-3.2-1b --kv-rank 64 --rope-dim 32 --contexts 8k \
        --memory-budget-gb 40 --runs absorbed,gqa-fair,gqa-static --out runs/capacity
    python benchmarks/capacity.py --shape tiny --kv-rank 8 --rope-dim 8 --contexts 64 --memory-budget-gb 0.006

Takes `ecomla bench`'s flags (--runs: the runs searched, default absorbed,gqa-fair) and measures through its
core. A trial batch B fills a fresh cache (reserved as for a timed run) with synthetic rows and runs one step.
- CUDA: the budget is enforced by the caching allocator (`torch.cuda.set_per_process_memory_fraction`);
  B fits if nothing raised out-of-memory, so weights, cache, activations, workspace and fragmentation all
  count, as they would in a server.
- CPU: nothing enforces a limit, so B fits when the measured weights + cache tensors (after the real
  allocation and step) stay within the budget; transients are not counted (ecomla/bench/decode.py).
Doubling finds a failing B, then bisection narrows [fits, fails) to within 1%; then a timed decode at that B.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path

import torch

from ecomla.args import add_dataclass_args, from_namespace
from ecomla.bench.decode import DecodeOpts, bandwidth_fields, free_memory, held_bytes, time_decode
from ecomla.bench.report import columns_table
from ecomla.bench.run import BenchArgs, decode_opts, measure_subject, resolve_device, select_runs
from ecomla.bench.runs import RUNS, Run
from ecomla.bench.subjects import subjects
from ecomla.common import UserError

MAX_BATCH_CAP = 1 << 16
COLS = [("system", "system", None), ("run", "run", None), ("impl", "impl", None), ("context", "context", None),
        ("budget MiB", "memory_budget_bytes", "mb"), ("max batch", "batch", None),
        ("fails at", "batch_fails_at", None), ("tok/s at max", "tokens_per_s", "{:.1f}"),
        ("peak MiB", "peak_memory_bytes", "mb"), ("cache B/tok", "cache_bytes_per_token", None)]


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
    """The search result, plus a timed decode at the batch found (tokens/s at capacity). Prepare `model` first."""
    device = torch.device(device)
    if held_bytes(model) >= budget:
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


def max_batch_rows(args: BenchArgs, runs: list[Run], budget_gb: float, copy_gbps: float | None = None) -> list[dict]:
    """One row per (run, context) of `args`: the max batch within `budget_gb`, one model in memory at a time."""
    if budget_gb <= 0:
        raise UserError(f"--memory-budget-gb must be > 0, got {budget_gb}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args)
    opts, budget = decode_opts(args, device), int(budget_gb * 1e9)
    log = functools.partial(print, file=sys.stderr)

    def measure(model, run: Run, base: dict) -> list[dict]:
        rows = []
        for ctx in args.context_list:
            m = max_batch(model, run, ctx, budget, opts, device, dtype)
            rows.append({**base, "kind": "max_batch", "context": ctx, "status": "ok", **m})
            if "step_s" in m:
                rows[-1].update(bandwidth_fields(m, m["batch"], ctx, base["weight_bytes"], copy_gbps))
            log(f"  max batch {run.name} ctx={ctx}: {m['batch']} (fails at {m['batch_fails_at']}) in {budget_gb:g} GB")
        return rows

    return [r for s in subjects(args, dtype, device) for r in measure_subject(s, runs, device, dtype, log, measure)]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataclass_args(p, BenchArgs)
    p.add_argument("--memory-budget-gb", type=float, required=True, help="the memory budget of the search")
    ns = p.parse_args(argv)
    args = from_namespace(BenchArgs, ns, base={"runs": "absorbed,gqa-fair"})
    runs = select_runs(args.runs, RUNS)
    rows = max_batch_rows(args, runs, ns.memory_budget_gb)
    print(columns_table(rows, COLS))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "capacity.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        sys.exit(f"capacity.py: error: {err}")
