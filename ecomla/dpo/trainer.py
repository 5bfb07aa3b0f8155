"""TRL's DPOTrainer on an ecomla model, with stage 1's budgets, resume, progress and metrics.jsonl.

    result = train(args, make_config(args, out), policy, ref, tok, dataset, out, model_path)

Everything DPO is TRL's (sigmoid loss, collation, reference log-probs, accelerate / DeepSpeed / FSDP set-up);
this file maps DPOArgs onto DPOConfig and adds three callbacks: `Budget` stops after the step that would
overrun --max-minutes (or after Ctrl-C) and has the Trainer save a checkpoint; `MetricsLog` appends one
row per logging step to OUT/metrics.jsonl; `Progress` is a one-line bar (or a line every 10 steps).
`--resume` continues from the newest checkpoint: model, optimizer, scheduler, RNG and data position are
restored by transformers' Trainer, and metrics rows logged after that checkpoint are dropped.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import warnings
from pathlib import Path

import torch
from accelerate import PartialState
from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from ..io import checkpoint_dtype, save_trained
from ..outputs import publish, temp_path

SHOWN = {"loss": "loss", "rewards/margins": "margin", "rewards/accuracies": "acc"}


def make_config(args, out: Path):
    """DPOArgs -> TRL's DPOConfig (a transformers TrainingArguments; building it sets up the distributed state)."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(out / "checkpoints"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=args.warmup_ratio,  # a float in [0, 1) is a share of the steps in transformers 5
        beta=args.beta, loss_type=["sigmoid"], max_length=args.max_length, optim="adamw_torch",
        bf16=args.precision == "bf16", use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=args.gradient_checkpointing, logging_steps=args.log_every, logging_first_step=True,
        save_strategy="steps", save_steps=args.save_every, save_total_limit=args.keep_last, report_to="none",
        disable_tqdm=True, seed=args.seed,
    )


class Budget(TrainerCallback):
    """Stop after the current step when the next one would overrun `max_minutes`, or on Ctrl-C (a second
    Ctrl-C interrupts at once); the Trainer then logs and saves a checkpoint. Ranks agree on the decision."""

    def __init__(self, max_minutes: float | None):
        self.max_s = None if max_minutes is None else max_minutes * 60
        self.stopped, self.times, self._sigint, self._old = "done", [], False, None

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = self.last = time.time()
        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)

            def handler(*_):
                self._sigint = True
                signal.signal(signal.SIGINT, signal.default_int_handler)

            signal.signal(signal.SIGINT, handler)

    def on_step_end(self, args, state, control, **kw):
        now = time.time()
        self.times.append(now - self.last)
        self.last = now
        recent = self.times[-5:]
        over = self.max_s is not None and now - self.t0 + sum(recent) / len(recent) > self.max_s
        code = 2 if self._sigint else 1 if over else 0
        dist = args.distributed_state
        if dist.num_processes > 1:  # every rank must stop at the same step, for the same reason
            flag = torch.tensor(code, device=dist.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            code = int(flag)
        if code and state.global_step < state.max_steps:
            self.stopped = "interrupted" if code >= 2 else "time budget"
            control.should_training_stop = control.should_save = control.should_log = True
        return control

    def on_train_end(self, args, state, control, **kw):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class MetricsLog(TrainerCallback):
    """One JSON row per logging step in OUT/metrics.jsonl (TRL's loss, rewards/*, logps/*, lr, grad_norm). After
    a resume, `before` (the last kept row's `CARRIED` counts) continues the run's elapsed seconds and TRL's token
    count, which restarts at 0 in a new trainer, so the rows read as one uninterrupted run's."""

    def __init__(self, path: Path, before: dict):
        self.path, self.before, self.t0 = path, before, time.time()

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.time()

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return  # the end-of-training summary goes into ecomla_dpo.json instead
        row = {"step": state.global_step, **logs,
               "elapsed_s": round(self.before.get("elapsed_s", 0.0) + time.time() - self.t0, 2)}
        if "num_tokens" in row:
            row["num_tokens"] += self.before.get("num_tokens", 0)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class Progress(TrainerCallback):
    """A tqdm bar with loss / reward margin / reward accuracy; without a bar, a line every 10 steps."""

    def __init__(self, bar: bool, log=print):
        self.use_bar, self.log, self.bar = bar, log, None

    def on_train_begin(self, args, state, control, **kw):
        if state.is_world_process_zero and self.use_bar:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="dpo", unit="step")

    def on_step_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        shown = {v: f"{logs[k]:.4g}" for k, v in SHOWN.items() if k in logs}
        if self.bar is not None:
            self.bar.set_postfix(shown)
        elif state.global_step % 10 == 0 or state.global_step == 1 or control.should_training_stop:
            values = " ".join(f"{k}={v}" for k, v in shown.items())
            self.log(f"[dpo] step {state.global_step}/{state.max_steps} {values}")

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()


CARRIED = ("elapsed_s", "num_tokens")  # counts a resumed run continues from its last kept metrics row


def resume_point(out: Path, log=print) -> tuple[str | None, dict]:
    """(newest checkpoint or None, the `CARRIED` counts of the last row logged before it); trims metrics.jsonl
    back to it."""
    root = out / "checkpoints"
    ckpt = get_last_checkpoint(str(root)) if root.is_dir() else None
    metrics = out / "metrics.jsonl"
    step = int(re.search(r"checkpoint-(\d+)$", ckpt).group(1)) if ckpt else 0
    if ckpt is None:
        log(f"[dpo] --resume: no checkpoint in {root} yet; starting at step 0")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line] if metrics.is_file() else []
    keep = [r for r in rows if r.get("step", step + 1) <= step]
    if PartialState().is_main_process and metrics.is_file():
        metrics.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return ckpt, ({k: keep[-1][k] for k in CARRIED if k in keep[-1]} if keep else {})


def save_final(trainer, out: Path, model_path: str) -> None:
    """The trained policy as a loadable HF folder in OUT, in MODEL's dtype (it trains in fp32), published with
    MODEL's ecomla_convert.json. The weights are gathered by accelerate, a collective every process joins (under
    FSDP from the shards: transformers' save_model writes nothing for FSDP's sharded state dict type)."""
    state = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.is_world_process_zero():
        stage = temp_path(out / ".final")
        save_trained(trainer.accelerator.unwrap_model(trainer.model), stage, state, checkpoint_dtype(model_path))
        trainer.processing_class.save_pretrained(stage)
        publish(stage, out, model_path)
    trainer.accelerator.wait_for_everyone()


def summarise(rows: list[dict]) -> dict:
    """First and last logged loss / reward margin / reward accuracy, and their means over the last 10 logs."""
    if not rows:
        return {}
    tail = rows[-10:]
    keys = [k for k in ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")
            if k in rows[0]]
    return {"first": {k: rows[0][k] for k in keys}, "last": {k: rows[-1][k] for k in keys},
            "last10_mean": {k: sum(r[k] for r in tail) / len(tail) for k in keys}}


def train(args, config, policy, ref, tok, dataset, out: Path, model_path: str, log=print) -> dict:
    """Run DPOTrainer with `config` (from make_config; resuming if asked) and write the final checkpoint into OUT;
    returns counts and metrics. Checkpoints go to OUT/checkpoints/checkpoint-N."""
    from trl import DPOTrainer

    ckpt, before = resume_point(out, log) if args.resume else (None, {})
    budget = Budget(args.max_minutes)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=config, train_dataset=dataset,
                         processing_class=tok,
                         callbacks=[budget, MetricsLog(out / "metrics.jsonl", before),
                                    Progress(args.progress, log)])
    trainer.remove_callback(PrinterCallback)  # Progress replaces transformers' per-log dict printing
    trainer.remove_callback(ProgressCallback)
    t0 = time.time()
    with warnings.catch_warnings():  # TRL's own call of a transformers property deprecated in v5: not the user's to fix
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        trainer.train(resume_from_checkpoint=ckpt)
    if budget.stopped == "interrupted":
        raise KeyboardInterrupt
    save_final(trainer, out, model_path)
    metrics = out / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line] if metrics.is_file() else []
    world = trainer.accelerator.num_processes
    return {"stopped": budget.stopped, "steps": trainer.state.global_step, "max_steps": trainer.state.max_steps,
            "resumed_from": ckpt, "pairs_per_step": args.batch_size * args.grad_accum * world, "world_size": world,
            "minutes": round((before.get("elapsed_s", 0.0) + time.time() - t0) / 60, 2), "metrics": summarise(rows)}
