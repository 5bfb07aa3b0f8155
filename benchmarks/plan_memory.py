"""`ecomla plan` against the measured peak memory of `ecomla distill` KD steps on this CPU.

    python -m ecomla convert default /work/runs/plan/smollm2-4x --kv-rank 64 --rope-dim 32
    OMP_NUM_THREADS=1 python benchmarks/plan_memory.py --student /work/runs/plan/smollm2-4x --out /work/runs/plan/mem

Each configuration runs in its own process(es): the Trainer of `ecomla distill` (teacher = source, --precision fp32 by default,
--stage kd, --no-mask-prompt so that every position is a target, as the plan assumes) for --steps KD steps; the
2-process ones under `accelerate launch` (gloo): DDP, and FSDP2 with recipes/accelerate/fsdp-8gpu.yaml's settings on
2 processes in fp32 (on CPU processes through tests/fsdp_cpu.py, as tests/test_sharded.py runs it). glibc is told
to return every allocation of 64 KiB or more to the system when it is freed (MALLOC_MMAP_THRESHOLD_), so the
resident set follows the live tensors.

On a GPU (`--precision bf16`, the processes see CUDA) the measurement is the allocator's peak over steps 2..N
(torch.cuda.max_memory_allocated) and the last column its reserved peak:

    python benchmarks/plan_memory.py --student runs/smollm2-4x --precision bf16 --out runs/plan-mem-gpu

Measured on a CPU, per process: the peak resident set over steps 2..N (the first step compiles the loss and creates AdamW's
states; the peak is reset after it), less what is not tensors: the resident set after step 1 less the bytes of every
tensor alive then (both models' parameters and buffers, AdamW's states, DDP's gradient buckets; under FSDP2 each
process's own shards). The plan is
`ecomla plan` with the same settings (world size, batch, sequence length, precision, chunk, compiled loss). The table
prints both, the ratio, and the peak resident set itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {  # name: (processes, strategy, distill flags)
    "1p-b4x256": (1, "ddp", dict(batch_size=4, seq_len=256)),
    "1p-b4x256-eager": (1, "ddp", dict(batch_size=4, seq_len=256, compile_loss=False)),
    "1p-b2x512": (1, "ddp", dict(batch_size=2, seq_len=512)),
    "1p-b12x256-eager": (1, "ddp", dict(batch_size=12, seq_len=256, compile_loss=False)),  # chunks checkpointed
    "1p-b12x256": (1, "ddp", dict(batch_size=12, seq_len=256)),  # chunks checkpointed, compiled loss
    "2p-ddp-b2x256": (2, "ddp", dict(batch_size=2, seq_len=256)),
    "2p-fsdp2-b2x256": (2, "fsdp", dict(batch_size=2, seq_len=256)),
}
ROOT = Path(__file__).resolve().parents[1]
ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # the kernel's reset of VmHWM


def live_tensor_bytes(trainer) -> int:
    """Bytes of the tensors alive between steps: parameters, buffers, optimizer states, DDP's buckets (of a
    sharded tensor, this process's shard)."""
    import torch
    from torch.distributed.tensor import DTensor

    storages = {}

    def add(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    models = [trainer.student] + ([trainer.teacher] if trainer.teacher is not None else [])
    for m in models:
        for t in [*m.parameters(), *m.buffers()]:
            add(t)
    for state in trainer.optimizer.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor):
                add(t)
    ddp = trainer.model
    sizes = str(ddp._get_ddp_logging_data().get("bucket_sizes", "")) if hasattr(ddp, "reducer") else ""
    buckets = sum(int(x) for x in sizes.replace(",", " ").split())  # "4004000, 2000": bytes per bucket
    return sum(storages.values()) + buckets


def worker(args) -> None:
    """Inside one process of a configuration: build the Trainer, run the steps, write this rank's numbers."""
    if args.fsdp_on_cpu:  # the runs' PYTHONPATH is the checkout
        from tests.fsdp_cpu import allow_fsdp_on_cpu

        allow_fsdp_on_cpu()
    from ecomla.distill import DistillArgs
    from ecomla.distill.trainer import Trainer

    import torch

    flags = json.loads(args.flags)
    trainer = Trainer(DistillArgs(student=args.student, out=args.run, stage="kd", precision=args.precision,
                                  eval_tokens=0, mask_prompt=False, max_tokens=10**9, save_every=10**6, progress=False,
                                  **flags))
    cuda = trainer.acc.device.type == "cuda"  # on a GPU: the allocator's own peak, no resident-set arithmetic
    trainer.model.train()
    trainer._train_step()
    settled = 0 if cuda else rss() - live_tensor_bytes(trainer)  # what is not tensors, after the loss is compiled
    torch.cuda.reset_peak_memory_stats() if cuda else reset_peak()
    for _ in range(args.steps - 1):
        trainer._train_step()
    rank = trainer.acc.process_index
    peak = torch.cuda.max_memory_reserved() if cuda else peak_rss()
    measured = torch.cuda.max_memory_allocated() if cuda else peak_rss() - settled
    row = {"rank": rank, "peak_rss": peak, "not_tensors": settled, "measured": measured}
    Path(args.run).parent.joinpath(f"memory-{rank}.json").write_text(json.dumps(row))
    trainer.release()


def measure(name: str, student: str, steps: int, out: Path, precision: str) -> dict:
    """Run one configuration in fresh processes; the largest per-rank measurement."""
    procs, strategy, flags = CONFIGS[name]
    run = out / name
    run.mkdir(parents=True, exist_ok=True)
    for old in run.glob("memory-*.json"):
        old.unlink()
    shutil.rmtree(run / "distill", ignore_errors=True)
    me = [str(Path(__file__).resolve()), "--worker", "--student", student, "--steps", str(steps),
          "--flags", json.dumps(flags), "--run", str(run / "distill"), "--precision", precision]
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT)}
    if procs == 1:
        cmd = [sys.executable, *me]
    elif strategy == "fsdp":  # the FSDP2 recipe's accelerate config on `procs` processes, at this precision
        import torch

        sys.path.insert(0, str(ROOT))  # tests/ is not installed: the checkout's (as tools/same_outputs.py)
        from tests.fsdp_cpu import fsdp_config

        config = fsdp_config(run, procs, "bf16" if precision == "bf16" else "no")
        if not torch.cuda.is_available():
            env["ACCELERATE_USE_CPU"] = "1"
            me.append("--fsdp-on-cpu")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *me]
    else:
        import torch

        if not torch.cuda.is_available():  # gloo processes on the CPU (torchrun, as tests/test_distill.py starts them)
            env["ACCELERATE_USE_CPU"] = "1"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(procs), "--num_machines",
               "1", "--mixed_precision", "bf16" if precision == "bf16" else "no", "--dynamo_backend", "no",
               "--multi_gpu", *me]
    res = subprocess.run(cmd, env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True)
    if res.returncode:  # the error's own line, not the launcher's banner after it
        lines = res.stderr.strip().splitlines()
        return {"failed": next((x for x in reversed(lines) if "Error:" in x), lines[-1])}
    rows = [json.loads(p.read_text()) for p in sorted(run.glob("memory-*.json"))]
    return max(rows, key=lambda r: r["measured"])


def planned(name: str, student: str, precision: str) -> dict:
    from ecomla.plan import PlanArgs, plan_run

    procs, strategy, flags = CONFIGS[name]
    return plan_run(PlanArgs(student=student, strategy=strategy, world_size=procs, precision=precision,
                             memory_per_device="80GB",
                             batch_size=flags["batch_size"], seq_len=flags["seq_len"],
                             compile_loss=flags.get("compile_loss", True)))


def row(name: str, m: dict, r: dict) -> str:
    if "failed" in m:
        return f"{name:<20}{r['peak'] / 1e9:9.3f}  failed: {m['failed'][:200]}"
    return (f"{name:<20}{r['peak'] / 1e9:9.3f}{m['measured'] / 1e9:13.3f}{r['peak'] / m['measured']:15.3f}"
            f"{m['peak_rss'] / 1e9:13.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="an MLA checkpoint (from `ecomla convert`)")
    p.add_argument("--out", default="/work/runs/plan/mem", help="run folders and results.json")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="bf16: autocast, for a GPU (this CPU has no bf16 units)")
    p.add_argument("--from-results", action="store_true",
                   help="no new runs: the measurements in OUT/results.json against the plan of this checkout")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--fsdp-on-cpu", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--flags", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if Path(args.student).exists():  # the runs start in a temporary folder
        args.student = str(Path(args.student).resolve())
    unknown = [n for n in args.configs.split(",") if n not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    out = Path(args.out)
    stored = {r["config"]: r for r in json.loads((out / "results.json").read_text())} if args.from_results else {}
    results = []
    print(f"{'config':<20}{'plan GB':>9}{'measured GB':>13}{'plan/measured':>15}{'peak RSS GB':>13}")
    for name in args.configs.split(","):
        if args.from_results and name not in stored:
            continue
        m = stored[name] if args.from_results else measure(name, args.student, args.steps, out, args.precision)
        m = {k: v for k, v in m.items() if k not in ("config", "plan", "plan_rows")}
        r = planned(name, args.student, args.precision)
        results.append({"config": name, "plan": r["peak"], "plan_rows": r["rows"], **m})
        print(row(name, m, r), flush=True)
        if not args.from_results:
            (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
