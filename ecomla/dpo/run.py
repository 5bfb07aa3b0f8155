"""`ecomla dpo MODEL (DATA | --make-pairs) --out DIR`: stage 2, DPO on the distilled student with TRL.

    ecomla dpo runs/kd-4x --config recipes/dpo-cpu-smollm2.yaml --out runs/dpo-4x     # offline, CPU
    ecomla dpo runs/kd-4x HuggingFaceH4/ultrafeedback_binarized --out runs/dpo --max-steps 100
    accelerate launch --config_file ds.yaml -m ecomla dpo runs/kd-1b --config recipes/dpo-gpu-llama-3.2-1b.yaml

The reference model is a frozen copy of MODEL, loaded separately (the paper: "the distilled student itself").
`--make-pairs` builds preference pairs offline from ShareGPT train prompts (teacher greedy = chosen, the
student's own sample = rejected; see `pairs.py`). OUT ends up a loadable HF checkpoint (+ MODEL's
ecomla_convert.json) with metrics.jsonl, pairs.jsonl when built, checkpoints/ for --resume, and
ecomla_dpo.json: the run's settings, data counts, DPO metrics and held-out KL / perplexity before and after.

In Python (what `ecomla demo` calls): `run_dpo(cpu_args("runs/demo/kd-4x", "runs/demo/dpo-4x", max_minutes=5))`.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets

from ..args import arg, flag_list, run_settings
from ..common import UserError, resolve_precision
from ..data.chat import load_chat, split_chat
from ..data.packing import PackedChat
from ..eval.fidelity import fidelity
from ..generate.generate import prepared
from ..io import load_model, load_tokenizer, mla_shapes, recorded_source, resolve
from ..mla import EcoMLAForCausalLM
from ..outputs import claim_run, mark_finished
from .data import COLUMNS, drop_long_prompts, load_preferences
from .pairs import PairSpec, build_pairs, load_cached, save_pairs, show
from .trainer import make_config, train

# The CPU default (recipes/dpo-cpu-smollm2.yaml holds the same values; a test keeps them equal). beta stays at the
# authors' 0.01; lr is 40x the authors' 5e-7 because a CPU run gets tens of steps, not thousands (the learning-rate
# runs behind this choice are in docs/DPO.md). Short answers and sequences keep a step and the pair generation
# affordable on 2 CPU cores.
CPU_RECIPE = dict(make_pairs=True, pairs=64, max_new_tokens=64, temperature=1.0, gen_batch_size=16, beta=0.01,
                  lr=2e-5, batch_size=4, grad_accum=1, epochs=2.0, max_length=256, max_prompt_length=128,
                  precision="auto", save_every=10, eval_tokens=4096)
# what a --resume may change: none of them shapes the pairs, their order, the schedule or the model
RESUMABLE = ("max_minutes", "save_every", "keep_last", "log_every", "eval_tokens", "gradient_checkpointing",
             "progress")


@dataclass
class DPOArgs:
    model: str = arg("model to train: the distilled student folder (from `ecomla distill`), any HF causal LM "
                     "folder, hub id or 'default'", positional=True)
    data: str | None = arg("preference data: a .json/.jsonl/.parquet file or save_to_disk folder, a hub id "
                           "(id or id:split), or a comma-separated mixture; columns prompt/chosen/rejected as "
                           "strings or {role, content} message lists. Omit with --make-pairs",
                           positional=True, nargs="?", default=None)
    out: str = arg("output folder", default="runs/dpo")
    make_pairs: bool = arg("build pairs offline: teacher's greedy answer = chosen, MODEL's own sampled answer "
                           "= rejected, on --chat-data train prompts; cached in OUT/pairs.jsonl", default=False)
    teacher: str | None = arg("teacher for --make-pairs and the held-out KL check (default: the source recorded "
                              "in MODEL/ecomla_convert.json)", default=None)
    pairs: int = arg("prompts to turn into pairs with --make-pairs (identical pairs are then dropped)", default=128)
    chat_data: str = arg("chat data: --make-pairs prompts come from its train split (first user turns), the "
                         "held-out check from its held-out split", default="default")
    max_new_tokens: int = arg("longest generated answer in --make-pairs", default=128)
    temperature: float = arg("sampling temperature of MODEL's rejected answers in --make-pairs", default=1.0)
    gen_batch_size: int = arg("prompts per generate() batch in --make-pairs", default=8)
    beta: float = arg("DPO beta: strength of the pull towards the reference (authors: 0.01)", default=0.01)
    lr: float = arg("peak learning rate, cosine schedule (authors' GPU setting: 5e-7; the CPU recipe: 2e-5)",
                    default=5e-7)
    warmup_ratio: float = arg("share of the steps spent warming up (authors: 0.1)", default=0.1)
    batch_size: int = arg("pairs per device per micro-batch (authors: 4)", default=4)
    grad_accum: int = arg("micro-batches per optimizer step", default=1)
    epochs: float = arg("passes over the pairs (authors: 1); --max-steps overrides", default=1.0)
    max_length: int = arg("prompt + answer tokens kept (longer ones are cut at the end; authors: 1024)",
                          default=1024)
    max_prompt_length: int = arg("pairs whose prompt is longer are dropped (authors: 512)", default=512)
    max_steps: int | None = arg("stop after this many optimizer steps (also sets the LR schedule's length)",
                                default=None)
    max_minutes: float | None = arg("stop cleanly (with a checkpoint) after this many minutes of training",
                                    default=None)
    resume: bool = arg("continue from the newest checkpoint in OUT/checkpoints (cached pairs are reused); every "
                       "other setting must match the first run except "
                       + flag_list(RESUMABLE), default=False)
    precision: str = arg("bf16 (mixed precision autocast, CPU and GPU), fp32, or auto: bf16 where the GPU or CPU "
                         "has bf16 units, else fp32", default="auto", choices=("auto", "bf16", "fp32"))
    gradient_checkpointing: bool = arg("recompute activations in the backward pass (saves GPU memory)", default=False)
    save_every: int = arg("checkpoint every N optimizer steps", default=50)
    keep_last: int = arg("checkpoints to keep", default=2)
    log_every: int = arg("log metrics every N optimizer steps", default=1)
    eval_tokens: int = arg("held-out chat tokens for the before/after KL and perplexity check (0 = skip)",
                           default=4096)
    seed: int = arg("seed for pair selection, sampling, data order", default=0)
    progress: bool = arg("show a progress bar", default=True)

    def __post_init__(self):
        if self.make_pairs == (self.data is not None):
            raise UserError("pass preference DATA or --make-pairs (exactly one)" if self.make_pairs else
                            "no preference data: pass DATA (a file, hub id or comma list) or --make-pairs")
        for name in ("pairs", "max_new_tokens", "gen_batch_size", "batch_size", "grad_accum", "max_length",
                     "max_prompt_length", "save_every", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_prompt_length >= self.max_length:
            raise UserError(f"--max-prompt-length ({self.max_prompt_length}) must be below --max-length "
                            f"({self.max_length}), or no answer token is left")
        if self.beta <= 0 or self.lr <= 0 or self.temperature <= 0 or self.epochs <= 0:
            raise UserError("--beta, --lr, --temperature and --epochs must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError("--warmup-ratio must be in [0, 1)")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError("--max-steps must be >= 1")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise UserError("--max-minutes must be > 0")
        if self.eval_tokens < 0:
            raise UserError("--eval-tokens must be >= 0")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise UserError("--precision must be auto, bf16 or fp32")
        self.precision = resolve_precision(self.precision)  # derived once


def cpu_args(model: str, out: str, **overrides) -> DPOArgs:
    """DPOArgs of the CPU recipe (recipes/dpo-cpu-smollm2.yaml), e.g. for `ecomla demo`."""
    return DPOArgs(model=model, out=out, **{**CPU_RECIPE, **overrides})


def _claim_out(args: DPOArgs, state):
    """The main process takes OUT (locked; a resume must keep the stored run's settings); the others wait."""
    lock = None
    if state.is_main_process:
        settings = {**run_settings(args), "model shapes": mla_shapes(args.model)}  # a folder may be re-converted
        lock = claim_run(args.out, "dpo", [args.model, args.data, args.teacher, args.chat_data], resume=args.resume,
                         settings=settings, may_change=RESUMABLE)
    state.wait_for_everyone()
    return lock


def _make_pairs(args, state, ref, model_path: str, teacher_spec: str | None, chat, out: Path, log) -> tuple:
    """Pairs from OUT's cache or built now (main process first; the others then read the cache)."""
    if teacher_spec is None:
        raise UserError(f"{args.model} records no source model (no ecomla_convert.json); pass --teacher")
    spec = PairSpec(student=str(Path(model_path).resolve()), teacher=str(resolve(teacher_spec)),
                    chat_data=args.chat_data, pairs=args.pairs, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, max_prompt_length=args.max_prompt_length,
                    gen_batch_size=args.gen_batch_size, seed=args.seed)
    with state.main_process_first():
        cached = load_cached(out, spec)
        if cached is not None:
            pairs, stats = cached
        else:
            teacher, tpath = load_model(teacher_spec, dtype="float32", device=state.device)
            ref.to(state.device)
            pairs, stats = build_pairs(spec, prepared(ref), prepared(teacher), load_tokenizer(tpath), chat["train"],
                                       log)
            if isinstance(ref, EcoMLAForCausalLM):
                ref.drop_decode_preparation()  # from here on it is DPO's reference model
            del teacher
            save_pairs(out, pairs, stats, spec)
    if state.is_main_process:
        if cached is not None:
            log(f"[pairs] reusing {out / 'pairs.jsonl'} (built with the same settings)")
        show(pairs, stats, log)
    return pairs, stats


def _preferences(args, state, ref, tok, model_path, teacher_spec, chat, out: Path, log):
    if args.make_pairs:
        pairs, stats = _make_pairs(args, state, ref, model_path, teacher_spec, chat, out, log)
        ds = datasets.Dataset.from_list([{c: p[c] for c in COLUMNS} for p in pairs])
        info = {"source": "make-pairs", "pairs": stats}
    else:
        ds, info = load_preferences(args.data)
        if state.is_main_process:
            log(f"[data] {len(ds)} pairs from {info['sources']} ({info['dropped']} empty or identical dropped)")
    ds, long = drop_long_prompts(ds, tok, args.max_prompt_length)
    if long and state.is_main_process:
        log(f"[data] dropped {long} pairs whose prompt exceeds --max-prompt-length {args.max_prompt_length}")
    return ds, {**info, "rows": len(ds), "long_prompts_dropped": long}


def heldout_check(args, state, model_path: str, out: Path, teacher_spec: str | None, chat, log) -> dict | None:
    """KL(teacher || model) and perplexity on held-out chat tokens, MODEL (before) vs OUT (after), fresh loads."""
    if args.eval_tokens <= 0 or not state.is_main_process:
        return None
    before = load_model(model_path, dtype="float32", device=state.device)[0]
    after = load_model(str(out), dtype="float32", device=state.device)[0]
    teacher = load_model(teacher_spec, dtype="float32", device=state.device)[0] if teacher_spec else None
    if teacher is not None and teacher.config.vocab_size != before.config.vocab_size:
        log(f"[check] teacher {teacher_spec} has another vocabulary: perplexity only")
        teacher = None
    batches = PackedChat(chat["heldout"], load_tokenizer(str(out)), 256, seed=0).take_tokens(args.eval_tokens, 4)
    res = fidelity({"before": before, "after": after}, teacher, batches, desc="held-out check",
                   progress=args.progress)
    keys = ("kl", "top1_agreement", "ppl", "tokens")
    return {"before": {k: res["before"][k] for k in keys}, "after": {k: res["after"][k] for k in keys},
            "teacher_ppl": res["teacher"]["ppl"] if teacher is not None else None, "teacher": teacher_spec}


def run_dpo(args: DPOArgs, log=print) -> dict:
    """The whole stage; returns the summary also written to OUT/ecomla_dpo.json."""
    t0, out = time.time(), Path(args.out)
    config = make_config(args, out)  # sets up the (distributed) state the way the Trainer will use it
    state = config.distributed_state
    lock = _claim_out(args, state)
    try:
        return _run(args, config, state, out, t0, log)
    finally:
        if lock is not None:
            lock.release()


def _run(args: DPOArgs, config, state, out: Path, t0: float, log) -> dict:
    policy, model_path = load_model(args.model, dtype="float32")
    ref = load_model(model_path, dtype="float32")[0].requires_grad_(False)  # the frozen copy: DPO's reference
    tok = load_tokenizer(model_path)
    teacher_spec = args.teacher or recorded_source(model_path)
    chat = split_chat(load_chat(args.chat_data)) if args.make_pairs or args.eval_tokens else None
    ds, data_info = _preferences(args, state, ref, tok, model_path, teacher_spec, chat, out, log)
    ref.cpu()
    gc.collect()
    t_train = time.time()
    result = train(args, config, policy, ref, tok, ds, out, model_path, log)
    del policy, ref
    gc.collect()
    check = heldout_check(args, state, model_path, out, teacher_spec, chat, log)
    summary = {"model": args.model, "data": data_info, "train": result, "heldout": check,
               "minutes": {"data": round((t_train - t0) / 60, 2), "train": result["minutes"],
                           "total": round((time.time() - t0) / 60, 2)}}
    if state.is_main_process:
        (out / "ecomla_dpo.json").write_text(json.dumps({"args": asdict(args), **summary}, indent=2))
        mark_finished(out)
        log(f"dpo: {result['stopped']} after {result['steps']}/{result['max_steps']} steps on {data_info['rows']} "
            f"pairs ({summary['minutes']['total']} min); {_describe(result['metrics'])}")
        if check:
            b, a = check["before"], check["after"]
            kl = f"KL {b['kl']:.4f} -> {a['kl']:.4f}, " if b["kl"] is not None else ""
            log(f"dpo: held-out ({b['tokens']} tokens) {kl}ppl {b['ppl']:.3f} -> {a['ppl']:.3f}")
    return summary


def _describe(metrics: dict) -> str:
    if not metrics:
        return "no step logged"
    first, last, tail = metrics["first"], metrics["last"], metrics["last10_mean"]
    return (f"loss {first['loss']:.4f} -> {last['loss']:.4f}, reward margin {last['rewards/margins']:.4f}, reward "
            f"accuracy {last['rewards/accuracies']:.2f} (last 10 logs: loss {tail['loss']:.4f}, margin "
            f"{tail['rewards/margins']:.4f}, accuracy {tail['rewards/accuracies']:.2f})")
