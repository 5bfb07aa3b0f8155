"""`ecomla plan STUDENT`: the memory of one `ecomla distill` KD step per device, before any weights load.

    ecomla plan recipes/distill-gpu-llama-3.2-1b-kv64-teacher-8b.yaml --strategy fsdp --world-size 8 \
        --memory-per-device 80GB
    ecomla plan out/smollm2-4x --precision fp32 --memory-per-device 16GB       # an ecomla checkpoint
    ecomla plan default --kv-rank 64 --rope-dim 32 --teacher default             # a source, as it would convert

Prints weights, gradients and AdamW states (sharded or not by --strategy and --world-size), the frozen teacher
(replicated, or under fsdp its decoder layers sharded, as distill does), the activations at batch x seq-len with and without gradient
checkpointing, the chunked KD logits, the step's peak, and whether it fits --memory-per-device; if not, the micro-batch
or strategy that would. The arithmetic and what it counts: memory.py. Checked against measured peaks on a CPU:
benchmarks/plan_memory.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, replace

from ..args import arg
from ..common import UserError
from ..convert.args import ConvertArgs
from ..distill.args import TRAINABLE, DistillArgs
from .memory import GB, RESERVE, STRATEGIES, Setup, fits, largest_batch, plan
from .models import resolve_models, shapes

SETTINGS = ("seq_len", "batch_size", "grad_accum", "precision", "chunk", "compile_loss", "trainable")


@dataclass
class PlanArgs:
    student: str = arg("the student: an ecomla checkpoint folder or its config.json; a distill recipe (recipes/*.yaml: "
                       "its header's `ecomla convert` line is the student, its keys the teacher and batch); or a source "
                       "model (folder, config.json, 'default', hub id) with --kv-rank, as `ecomla convert` would make "
                       "it", positional=True)
    teacher: str | None = arg("teacher: 'source', a folder, config.json or hub id (unset: the recipe's, else "
                              "'source')", default=None)
    strategy: str = arg("how the student is spread over devices: ddp (replicated), fsdp or zero3 (sharded)",
                        default="ddp", choices=STRATEGIES)
    world_size: int = arg("devices (processes)", default=1)
    memory_per_device: str = arg("memory of one device, e.g. 40GB, 80GB (GB = 10^9 bytes); "
                                 f"{RESERVE // GB} GB of it is kept for the CUDA context and allocator", default="80GB")
    seq_len: int | None = arg("tokens per block (unset: the recipe's, else distill's)", default=None)
    batch_size: int | None = arg("blocks per micro-batch per device (unset: the recipe's, else distill's)",
                                 default=None)
    grad_accum: int | None = arg("micro-batches per optimizer step (unset: the recipe's, else distill's)",
                                 default=None)
    precision: str | None = arg("bf16 (autocast) or fp32 (unset: the recipe's; its 'auto' plans bf16, a GPU's)",
                                default=None, choices=("bf16", "fp32"))
    kv_rank: int | None = arg("a source STUDENT: its latent rank r_kv, as `ecomla convert --kv-rank`", default=None)
    rope_dim: int = arg("a source STUDENT: d_rope, as `ecomla convert --rope-dim`", default=32)
    q_rank: str = arg("a source STUDENT: r_q, as `ecomla convert --q-rank`", default="auto")
    trainable: str | None = arg("distill's --trainable (unset: the recipe's, else all)", default=None,
                                choices=TRAINABLE, advanced=True)
    chunk: int | None = arg("distill's --chunk (unset: the recipe's, else distill's)", default=None, advanced=True)
    compile_loss: bool | None = arg("distill's --compile-loss (unset: the recipe's, else on)", default=None,
                                    advanced=True)
    json: bool = arg("print the plan as JSON", default=False)

    def __post_init__(self):
        if self.world_size < 1:
            raise UserError(f"--world-size must be >= 1, got {self.world_size}")
        self.memory = parse_memory(self.memory_per_device)
        for name in ("seq_len", "batch_size", "grad_accum", "chunk"):
            if getattr(self, name) is not None and getattr(self, name) < (2 if name == "seq_len" else 1):
                raise UserError(f"--{name.replace('_', '-')} must be >= {2 if name == 'seq_len' else 1}")


def parse_memory(text: str) -> float:
    """'80GB' / '80' / '40 GB' -> bytes (GB = 10^9); 'GiB' = 2^30."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(GB|G|GiB)?\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"--memory-per-device {text!r}: give a size like 40GB or 80GB")
    return float(m.group(1)) * (2**30 if m.group(2) == "GiB" else GB)


def setup_of(args: PlanArgs, recipe: dict) -> tuple[Setup, str]:
    """The step's settings and --trainable: the flag, else the recipe's value, else distill's default."""
    defaults = {f.name: f.default for f in dataclasses.fields(DistillArgs) if f.name in SETTINGS}
    value = {k: next(v for v in (getattr(args, k), recipe.get(k), defaults[k]) if v is not None) for k in SETTINGS}
    precision = "bf16" if value["precision"] == "auto" else value["precision"]
    return Setup(strategy=args.strategy, world=args.world_size, batch=value["batch_size"], seq_len=value["seq_len"],
                 grad_accum=value["grad_accum"], precision=precision, chunk=value["chunk"],
                 compiled=bool(value["compile_loss"])), value["trainable"]


def plan_run(args: PlanArgs) -> dict:
    """Everything `ecomla plan` prints, as a dict (bytes)."""
    convert = None
    if args.kv_rank is not None:
        convert = ConvertArgs(src=args.student, out="-", kv_rank=args.kv_rank, rope_dim=args.rope_dim,
                              q_rank=args.q_rank)
    models = resolve_models(args.student, args.teacher, convert)
    setup, trainable = setup_of(args, models["recipe"])
    s = shapes(models["student"], models["teacher"], trainable)
    p, ckpt = plan(s, setup), plan(s, replace(setup, checkpointing=True))
    out = {"student": models["student_label"], "teacher": models["teacher_label"], "setup": dataclasses.asdict(setup),
           "trainable": trainable, "student_params": s.student_params, "trained_params": s.trained_params,
           "teacher_params": s.teacher_params, "rows": p.rows, "activations_checkpointed": ckpt.rows["activations"],
           "peak": p.peak, "peak_checkpointed": ckpt.peak, "memory": args.memory,
           "fits": fits(p, args.memory), "fits_checkpointed": fits(ckpt, args.memory)}
    if not out["fits"]:
        out["instead"] = alternatives(s, setup, args.memory)
    return out


def alternatives(s, setup: Setup, memory: float) -> list[str]:
    """What would fit, per strategy: the largest micro-batch that keeps the global batch (--grad-accum raised),
    without and with gradient checkpointing."""
    global_batch = setup.batch * setup.grad_accum
    found = []
    for strategy in dict.fromkeys((setup.strategy, *STRATEGIES)):
        options = []
        for ckpt in (False, True):
            trial = replace(setup, strategy=strategy, checkpointing=ckpt)
            b = largest_batch(s, trial, memory)
            if b:
                peak = plan(s, replace(trial, batch=b, grad_accum=global_batch // b)).peak / GB
                options.append(("with gradient checkpointing " if ckpt else "")
                               + f"--batch-size {b} --grad-accum {global_batch // b} ({peak:.1f} GB)")
        if options:
            found.append(f"--strategy {strategy}: " + "; ".join(options))
    return found or ["nothing at this world size and sequence length: more devices or a shorter --seq-len"]


def format_plan(r: dict) -> str:
    st = r["setup"]
    gb = lambda b: f"{b / GB:8.2f}"  # noqa: E731
    lines = [f"student  {r['student']}: {r['student_params'] / 1e6:,.1f}M params, {r['trained_params'] / 1e6:,.1f}M "
             f"trained ({r['trainable']})",
             f"teacher  {r['teacher']}: {r['teacher_params'] / 1e6:,.1f}M params, "
             + ("its decoder layers sharded like the student's" if st["strategy"] == "fsdp"
                else "replicated on every device"),
             f"KD step on {st['world']} device(s), {st['strategy']}, {st['precision']}: micro-batch {st['batch']} x "
             f"{st['seq_len']} ({st['batch'] * (st['seq_len'] - 1):,} target rows at most), grad_accum "
             f"{st['grad_accum']}, chunk {st['chunk']}", "", f"{'per device':<34}{'GB':>8}"]
    for name, value in r["rows"].items():
        if value:
            lines.append(f"  {name:<32}{gb(value)}")
    lines.append(f"  {'activations, checkpointed':<32}{gb(r['activations_checkpointed'])}")
    lines.append(f"{'peak':<34}{gb(r['peak'])}   (gradient checkpointing: {r['peak_checkpointed'] / GB:.2f})")
    verdict = "fits" if r["fits"] else "does not fit"
    ckpt = "fits" if r["fits_checkpointed"] else "does not fit"
    lines.append(f"{verdict} in {r['memory'] / GB:g} GB per device ({RESERVE / GB:g} GB kept free); with gradient "
                 f"checkpointing it {ckpt}")
    for alt in r.get("instead", []):
        lines.append(f"  would fit: {alt}")
    return "\n".join(lines)


def run_plan(args: PlanArgs) -> dict:
    """`ecomla plan`: print the plan (or its JSON); returns it."""
    r = plan_run(args)
    print(json.dumps(r, indent=2) if args.json else format_plan(r))
    return r
