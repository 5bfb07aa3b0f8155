"""`ecomla bench [MODEL]`: decode speed and memory of an MLA model vs its GQA source, in one run.

    ecomla bench out/smollm2-8x --contexts 4k --batches 8 --dtype float32         # vs the recorded source
    ecomla bench default --kv-rank 16 --rope-dim 32 --contexts 1k --batches 1,8   # MLA attention made up
    ecomla bench --shape llama-3.2-1b --kv-rank 64 --rope-dim 32 --contexts 8k --batches 128 \
        --out out/bench                                                           # synthetic weights, GPU
    ecomla bench out/smollm2-2x --contexts 4k --batches 8 --runs absorbed --cache-bits 16,4 --repeats 5
                                                                # 4-bit vs 16-bit latent cache, paired

For every run x context x batch: decode tokens/s, step latency, prefill time (when the cache is filled by
a real prefill), peak memory, cache bytes per token read from the live cache, and GB/s achieved vs the
measured copy bandwidth. Runs: runs.py (the fair GQA baselines: gqa_fair.py). `--json` prints the rows; `--out DIR`
writes report.md, results.json and tokens_per_s.png. benchmarks/capacity.py measures the max batch at a memory
budget through the same core.
"""

from __future__ import annotations

import functools
import json
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..args import arg
from ..common import DTYPES, UserError, versions
from ..mla.config import parse_q_rank
from ..mla.quant import check_cache_bits
from ..outputs import run_dir
from .decode import (DecodeOpts, bandwidth_fields, copy_bandwidth, device_name, free_memory, time_decode,
                     weight_bytes_read)
from .fits import check_memory, check_positions
from .report import add_speedups, table, write
from .runs import RUNS, Run, at_cache_bits, prepare
from .shapes import PRESETS, parse_sizes
from .subjects import Subject, subjects

DEFAULT_RUNS = "absorbed,decompressed,gqa-dynamic,gqa-static"
Measure = Callable[[torch.nn.Module, Run, dict], list[dict]]  # (model, run, fields of every row) -> rows


@dataclass
class BenchArgs:
    model: str | None = arg("an MLA checkpoint folder; or a GQA checkpoint / 'default' (gets random MLA attention "
                            "of --kv-rank/--rope-dim: same speed as a conversion); or omit and give --shape",
                            default=None, positional=True, nargs="?")
    baseline: str | None = arg("GQA model to compare with (default: the 'source' in MODEL/ecomla_convert.json)",
                               default=None)
    shape: str | None = arg("synthetic weights of a preset shape, no checkpoint needed", default=None,
                            choices=tuple(PRESETS))
    kv_rank: int = arg("r_kv of the made-up MLA (with --shape or a GQA MODEL)", default=64)
    rope_dim: int = arg("d_rope of the made-up MLA", default=32)
    q_rank: str = arg("r_q of the made-up MLA: an integer, 'auto' (parameter parity) or 'none'", default="auto")
    contexts: str = arg("cached tokens per sequence when timing starts, e.g. 1k,4k,8k (k = 1024)", default="1k,4k,8k")
    batches: str = arg("batch sizes, e.g. 1,8,32", default="1,8,32")
    runs: str = arg(f"what to time, from {', '.join(RUNS)}", default=DEFAULT_RUNS)
    device: str = arg("cpu, cuda or auto", default="auto", choices=("auto", "cpu", "cuda"))
    dtype: str = arg("auto (bfloat16 on CUDA, float32 on CPU) or a dtype", default="auto", choices=("auto", *DTYPES))
    warmup: int = arg("untimed decode steps before timing", default=3)
    steps: int = arg("timed decode steps (the median step is reported)", default=10)
    repeats: int = arg("time every (run, context, batch) this many times, MLA and GQA alternating, and report the "
                       "repeat with the median step and its spread; the 'x vs' ratios become the median of the "
                       "per-repeat ratios: for machines whose speed drifts", default=1)
    fill: str = arg("fill the cache by a real (timed) prefill, by random rows written into it (synthetic), or "
                    "auto: prefill when batch*context <= --prefill-max-tokens", default="auto",
                    choices=("auto", "prefill", "synthetic"))
    prefill_max_tokens: int | None = arg("threshold for --fill auto (default 2048 on CPU, 131072 on CUDA)",
                                         default=None)
    cache_bits: str | None = arg("latent cache bits of the MLA runs: 16, 8 or 4, or a list such as 16,4 (each MLA "
                                 "run is timed at each, rows named absorbed-int4, ...); default: the model's own",
                                 default=None)
    threads: int | None = arg("CPU threads for torch (default: torch's choice)", default=None)
    seed: int = arg("seed for synthetic weights and tokens", default=0)
    json: bool = arg("print the rows as JSON (and nothing else on stdout)", default=False)
    out: str | None = arg("folder for report.md, results.json and tokens_per_s.png", default=None)

    def __post_init__(self):
        self.context_list = parse_sizes(self.contexts, "--contexts")
        self.batch_list = parse_sizes(self.batches, "--batches")
        if self.warmup < 0 or self.steps < 1 or self.repeats < 1:
            raise UserError(f"--warmup must be >= 0, --steps and --repeats >= 1, got {self.warmup}, {self.steps} "
                            f"and {self.repeats}")
        if self.threads is not None and self.threads < 1 or self.prefill_max_tokens is not None \
                and self.prefill_max_tokens < 0:
            raise UserError(f"--threads must be >= 1 and --prefill-max-tokens >= 0, got {self.threads} and "
                            f"{self.prefill_max_tokens}")
        parse_q_rank(self.q_rank)  # --kv-rank and --rope-dim are checked where the MLA spec is derived
        self.cache_bit_list = None if self.cache_bits is None else [
            check_cache_bits(int(b) if b.strip().isdigit() else b.strip()) for b in str(self.cache_bits).split(",")]


def select_runs(text: str, known: dict[str, Run], flag: str = "--runs") -> list[Run]:
    names = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in names if r not in known]
    if bad or not names:
        raise UserError(f"{flag}: unknown run(s) {bad or text!r}; choose from {', '.join(known)}")
    return [known[r] for r in names]


def resolve_device(args: BenchArgs) -> tuple[str, torch.dtype]:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to torch")
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device == "cuda" else torch.float32)
    return device, dtype


def check_settings(args: BenchArgs, subjects: list[Subject], runs: list[Run], device: str, dtype) -> None:
    """Refuse a context past a model's positions, or a batch whose cache cannot fit, before any model is built."""
    extra = args.warmup + args.steps
    timed = [s for s in subjects if any(r.system == s.system for r in runs)]
    for s in timed:
        check_positions(s.label, s.config, args.context_list)
    for s in timed:
        check_memory(s.label, s.config, args.context_list, args.batch_list, extra, dtype, device)


def decode_opts(args: BenchArgs, device: str) -> DecodeOpts:
    return DecodeOpts(warmup=args.warmup, steps=args.steps, fill=args.fill, seed=args.seed,
                      prefill_max_tokens=args.prefill_max_tokens or (131072 if device == "cuda" else 2048))


def measure_subject(subject: Subject, runs: list[Run], device, dtype, log, measure: Measure) -> list[dict]:
    """Build `subject`'s model (one model in memory at a time), put it in the state of each of its runs and
    collect `measure(model, run, base)`, base = the fields every row carries; the model is freed on return."""
    runs = [r for r in runs if r.system == subject.system]
    if not runs:
        return []
    log(f"building {subject.system} model: {subject.label}")
    model = subject.build()
    rows = []
    for run in runs:
        impl = prepare(model, run, device, dtype)
        rows += measure(model, run, {
            "model": subject.label, "system": subject.system, "weights": subject.weights, "run": run.name,
            "path": run.path, "impl": impl, "weight_bytes": weight_bytes_read(model, run.path),
            "cache_bits": getattr(model.config, "cache_bits", 16),
            "dtype": str(dtype).split(".")[-1], "device": device_name(device)})
    del model
    free_memory(device)
    return rows


def decode_rows(model, run: Run, base: dict, args: BenchArgs, opts: DecodeOpts, device, dtype, copy_gbps,
                log) -> list[dict]:
    """One decode row per (context, batch) of `args`."""
    rows = []
    for ctx in args.context_list:
        for b in args.batch_list:
            row = {**base, "kind": "decode", "batch": b, "context": ctx, "status": "ok"}
            try:
                m = time_decode(model, run, b, ctx, opts, device, dtype)
                row.update(m, **bandwidth_fields(m, b, ctx, base["weight_bytes"], copy_gbps))
            except torch.OutOfMemoryError:
                row.update(status="oom", tokens_per_s=None)
                free_memory(device)
            rows.append(row)
            log(f"  {run.name:>13} B={b:<4} ctx={ctx:<6} " + (
                f"{row['tokens_per_s']:9.1f} tok/s  {row['step_ms']:8.2f} ms/step  {row['fill']}"
                if row["status"] == "ok" else "out of memory"))
    return rows


def median_of_repeats(rows: list[dict]) -> list[dict]:
    """One row per (system, run, batch, context): the repeat with the median step time, plus the step times of
    all repeats in the order they ran (`step_ms_repeats`, which pairs each MLA repeat with the GQA repeat that
    ran right after it) and the min/max tokens/s over them."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["system"], r["run"], r["batch"], r["context"]), []).append(r)
    merged = []
    for reps in groups.values():
        failed = [r for r in reps if not r.get("tokens_per_s")]
        if len(reps) == 1 or failed:  # a setting that ran out of memory in any repeat is reported as failed
            merged.append(failed[0] if failed else reps[0])
            continue
        ok = sorted(reps, key=lambda r: r["step_ms"])
        row = dict(ok[len(ok) // 2])  # the median repeat (the slower middle one for even counts), never an average
        row.update(repeats=len(reps), step_ms_repeats=[round(r["step_ms"], 3) for r in reps],
                   tokens_per_s_min=ok[-1]["tokens_per_s"], tokens_per_s_max=ok[0]["tokens_per_s"])
        merged.append(row)
    return merged


def bench(args: BenchArgs) -> list[dict]:
    """Time every run of `args.runs` on the MLA model and its GQA baseline, `args.repeats` times alternating; print
    the table (or JSON) and return the rows. --out is taken (reruns reuse their own) before anything is measured."""
    with run_dir(args.out, "bench", [args.model, args.baseline], continues=True) if args.out else nullcontext():
        return _bench(args)


def _bench(args: BenchArgs) -> list[dict]:
    runs = at_cache_bits(select_runs(args.runs, RUNS), args.cache_bit_list)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args)
    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    mla, gqa = subjects(args, dtype, device)
    check_settings(args, [mla, gqa], runs, device, dtype)
    opts = decode_opts(args, device)
    copy_gbps = copy_bandwidth(device)
    log(f"{device_name(device)}: measured copy bandwidth {copy_gbps:.1f} GB/s (read + write)")
    rows = []
    for rep in range(args.repeats):
        if args.repeats > 1:
            log(f"repeat {rep + 1}/{args.repeats}")
        for subject in (mla, gqa):
            rows += measure_subject(subject, runs, device, dtype, log, functools.partial(
                decode_rows, args=args, opts=opts, device=device, dtype=dtype, copy_gbps=copy_gbps, log=log))
    rows = median_of_repeats(rows)
    add_speedups(rows)
    meta = {"mla_model": mla.label, "gqa_model": gqa.label, "device": device_name(device), "dtype": str(dtype),
            "copy_gb_per_s": round(copy_gbps, 1), **versions("torch", "transformers", "triton"),
            "command": "ecomla bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None,
            "args": asdict(args)}
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table(rows))
    if args.out:
        log(f"wrote {write(args.out, rows, meta)}")
    return rows
