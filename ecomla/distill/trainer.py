"""The stage-1 training loop on accelerate: setup, `ild_step` / `kd_step`, the run, checkpoints, finish.

One optimizer step = `grad_accum` micro-batches of `batch_size` blocks on each of `world` processes.
Step s, micro-batch m, rank r reads blocks [(s*ga + m)*world*B + r*B, ... + B) of the packed train split,
so the data position is just the step counter: a resumed run (model, optimizer, scheduler, RNG restored
by accelerate) continues on exactly the blocks the uninterrupted run would have seen.

Steps [0, S_ild) are layer-wise alignment (MLA parameters only, lr `ild_lr`), then [S_ild, S_ild+S_kd)
are end-to-end KD (the `trainable` set, lr `lr`); each stage has its own warmup + cosine. S_kd comes from
--max-tokens, or from the speed measured on the first KD steps when --max-minutes sizes it (budget.py); it is
stored in every checkpoint. Every block the trainer sees has a target token (data/packing.py). The run ends with
the final HF checkpoint in OUT/ and a held-out KL / perplexity check. `clock` (time.monotonic unless a test
injects another) is the one source of time: the budget, the step times, the calibration.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, set_seed
from tqdm.auto import tqdm

from ..args import run_settings
from ..common import UserError, cache_dir
from ..data.chat import load_chat, split_chat
from ..data.packing import MixedBlocks, PackedChat, PackedText
from ..data.text import load_texts
from ..eval.fidelity import fidelity
from ..io import (checkpoint_dtype, drop_tied_aliases, load_model, load_tokenizer, mla_shapes, recorded_source,
                  resolve, save_trained)
from ..mla.attention import MLAAttention
from ..mla.model import with_cache_bits
from ..outputs import claim_run, mark_finished, publish, temp_path
from .args import RESUMABLE, DistillArgs
from .budget import ENDINGS, Budget, schedule, warmup_steps
from .objective import ILDBatch, KDBatch, Objective
from .quiet import library_bars_off, show
from .sharding import check_sharding, gathered, shard_frozen, sharded
from .teacher import TeacherLogits, TopKCache, attention_io


def param_groups(student) -> dict[str, list[torch.nn.Parameter]]:
    """mla: the new MLA projections; attn: o_proj and kept attention; rest: embeddings, MLP, norms."""
    groups = {"mla": [], "attn": [], "rest": []}
    seen = set()
    for layer in student.model.layers:
        attn = layer.self_attn
        for name, p in attn.named_parameters():
            key = "mla" if isinstance(attn, MLAAttention) and not name.startswith("o_proj") else "attn"
            groups[key].append(p)
            seen.add(id(p))
    groups["rest"] = [p for p in student.parameters() if id(p) not in seen]
    return groups


def accelerator(precision: str, find_unused_parameters: bool) -> Accelerator:
    """An Accelerator; accelerate keeps one mixed precision per process, so asking another is a clear error."""
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    try:
        return Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", kwargs_handlers=[ddp])
    except ValueError as err:  # "AcceleratorState has already been initialized and cannot be changed ..."
        if "already been initialized" not in str(err):
            raise
        raise UserError(f"--precision {precision}: this process already trained with another precision, and "
                        "accelerate allows one per process; run this distillation in a new process") from err


class Trainer:
    def __init__(self, args: DistillArgs, clock=time.monotonic):
        self.args = a = args
        self.clock = clock
        self.out = Path(a.out)
        self.ckpt_root = self.out / "checkpoints"
        self.acc = accelerator(a.precision, find_unused_parameters=a.stage != "kd" and a.trainable != "mla")
        check_sharding(self.acc, runs_ild=a.stage != "kd" and a.ild_tokens > 0)
        self.lock = self._claim_out()
        try:
            set_seed(a.seed)
            self.world = self.acc.num_processes
            with library_bars_off():  # one bar: the training's own
                self._load_models()
                self._setup_data()
            self._setup_optim()
            self.step, self.elapsed_before, self.kd_here = 0, 0.0, 0
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Let go of OUT's lock (the main process holds it from construction to the end of `run`)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ---- setup -------------------------------------------------------------------------------
    def _claim_out(self):
        """The main process takes OUT (locked; a resume must keep the stored run's settings) before any load."""
        a, lock = self.args, None
        if self.acc.is_main_process:
            settings = {**run_settings(a), "student shapes": mla_shapes(a.student),  # a folder may be re-converted
                        "--max-minutes given": a.max_minutes is not None}  # its value may change, not whether
            inputs = [a.student, None if a.teacher == "source" else a.teacher, a.data, a.text_data]
            if a.resume:
                self._newest_checkpoint()  # refused before the claim, which writes the lock file
            lock = claim_run(self.out, "distill", inputs, resume=a.resume, settings=settings, may_change=RESUMABLE)
        self.acc.wait_for_everyone()
        return lock

    def _newest_checkpoint(self) -> Path | None:
        """OUT's newest checkpoint, if any; one holding pickled state (from an older ecomla) is refused."""
        ckpts = sorted(self.ckpt_root.glob("step-???????"))
        if ckpts and list(ckpts[-1].glob("custom_checkpoint_*")):
            raise UserError(f"--resume: {ckpts[-1]} holds pickled state (written by an older ecomla), which is "
                            "not loaded; start a new --out")
        return ckpts[-1] if ckpts else None

    def _load_models(self):
        a = self.args
        self.student, self.student_path = load_model(a.student, dtype="float32")
        with_cache_bits(self.student, a.cache_bits, a.student)  # quantization-aware: the latent the cache will hold
        if a.gradient_checkpointing:  # each decoder layer's forward is recomputed in the backward pass (training only)
            self.student.activation_checkpointing_enable()
        self.mla_layers = [i for i, l in enumerate(self.student.model.layers) if isinstance(l.self_attn, MLAAttention)]
        if not self.mla_layers:
            raise UserError(f"{a.student} has no MLA layer; convert it first with `ecomla convert`")
        self.source_spec = recorded_source(self.student_path)
        self.teacher_spec = self.source_spec if a.teacher == "source" else a.teacher
        if self.teacher_spec is None:
            raise UserError(f"{a.student} records no source model; pass --teacher")
        dtype = "bfloat16" if a.precision == "bf16" else "float32"
        need_teacher = a.stage != "ild" and a.kl_weight > 0

        def frozen(spec: str, shard: bool):  # placed by sharding.py's rule: sharded or replicated
            return shard_frozen(load_model(spec, dtype=dtype)[0].requires_grad_(False), self.acc, shard)

        self.teacher = frozen(self.teacher_spec, shard=a.teacher_topk == 0) if need_teacher else None
        if self.teacher is not None and self.teacher.config.vocab_size != self.student.config.vocab_size:
            raise UserError(f"teacher {self.teacher_spec} has vocabulary {self.teacher.config.vocab_size}, the "
                            f"student {self.student.config.vocab_size}: KD needs the same tokenizer (--teacher)")
        self.source = None
        if a.stage != "kd" and a.ild_tokens > 0:
            if self.source_spec is None:
                raise UserError("layer-wise alignment needs the source model recorded by `ecomla convert` "
                                "(or pass --stage kd)")
            same = self.teacher is not None and resolve(self.source_spec) == resolve(self.teacher_spec)
            self.source = self.teacher if same else frozen(self.source_spec, shard=True)

    def _setup_data(self):
        a = self.args
        self.tok = load_tokenizer(self.student_path)
        self.split = split_chat(load_chat(a.data))
        self.packed = PackedChat(self.split["train"], self.tok, a.seq_len, seed=a.seed, mask_prompt=a.mask_prompt,
                                 skip_untargeted=True)
        if a.text_data is not None:  # a share of the blocks from plain text (every token a target)
            text = PackedText(load_texts(a.text_data), self.tok, a.seq_len, seed=a.seed)
            self.packed = MixedBlocks(self.packed, text, a.text_share)
        self.tokens_per_step = self.world * a.batch_size * a.grad_accum * a.seq_len
        self.ild_steps = math.ceil(a.ild_tokens / self.tokens_per_step) if (a.stage != "kd" and a.ild_tokens > 0) else 0
        self.has_kd = a.stage != "ild"
        cap = (None if a.kd_tokens is None else math.ceil(a.kd_tokens / self.tokens_per_step)) if self.has_kd else 0
        self.budget = Budget(cap=cap, minutes=a.max_minutes if self.has_kd else None, save_every=a.save_every)
        self.topk = None
        if a.teacher_topk > 0 and self.has_kd:
            self.topk = TopKCache(cache_dir() / "teacher_topk", str(resolve(self.teacher_spec)), a.data, a.seq_len,
                                  a.seed, a.teacher_topk, a.mask_prompt)

    def _setup_optim(self):
        a = self.args
        groups = param_groups(self.student)
        trained = {"mla"} | ({"attn"} if a.trainable in ("all", "attention") and self.has_kd else set()) | (
            {"rest"} if a.trainable == "all" and self.has_kd else set())
        for name, ps in groups.items():
            for p in ps:
                p.requires_grad_(name in trained)
        self.objective = Objective(self.student, kind=a.loss, temperature=a.temperature, kl_weight=a.kl_weight,
                                   ce_weight=a.ce_weight, chunk=a.chunk, compiled=a.compile_loss)
        opt_groups = [{"params": [p for p in groups[n] if p.requires_grad], "lr": 1.0, "name": n}
                      for n in sorted(trained)]
        self.optimizer = torch.optim.AdamW(opt_groups, lr=1.0, betas=a.beta_pair, weight_decay=a.weight_decay)
        self.model, self.optimizer = self.acc.prepare(self.objective, self.optimizer)
        self.acc.register_save_state_pre_hook(drop_tied_aliases)

    @property
    def total_steps(self) -> int | None:
        """ILD + KD steps; None while a time budget has not fixed the KD stage's length."""
        return None if self.budget.steps is None else self.ild_steps + self.budget.steps

    def lr_at(self, step: int, group: str) -> float:
        """The learning rate of `group` at `step`: a pure function of the step and the stored KD length."""
        a = self.args
        if step < self.ild_steps:
            warm = warmup_steps(self.ild_steps, a.warmup_ratio)
            return a.ild_lr * schedule(step, self.ild_steps, warm, a.min_lr_ratio) if group == "mla" else 0.0
        if group == "attn" and a.trainable == "mla" or group == "rest" and a.trainable != "all":
            return 0.0
        return a.lr * self.budget.multiplier(step - self.ild_steps, a.warmup_ratio, a.min_lr_ratio)

    # ---- one optimizer step ------------------------------------------------------------------
    def blocks(self, step: int, micro: int) -> list[int]:
        a = self.args
        base = (step * a.grad_accum + micro) * self.world * a.batch_size + self.acc.process_index * a.batch_size
        return list(range(base, base + a.batch_size))

    def batch(self, blocks: list[int]) -> dict[str, torch.Tensor]:
        b = self.packed.batch(blocks[0], len(blocks))
        return {k: v.to(self.acc.device) for k, v in b.items()}

    def ild_step(self, step: int) -> dict:
        """Layer-wise alignment: the loss is the global relative error, averaged over MLA layers."""
        with self.acc.autocast():  # per micro-batch ({layer: source input}, {layer: source output}), each [B, T, D]
            io = [attention_io(self.source, self.batch(self.blocks(step, m))["input_ids"], self.mla_layers)
                  for m in range(self.args.grad_accum)]
        local = {i: sum(float(y[i].float().pow(2).sum()) for _, y in io) for i in io[0][1]}
        denoms = {i: self.acc.reduce(torch.tensor(v, device=self.acc.device), "sum") for i, v in local.items()}
        total = sum(self._backward(m, ILDBatch(x, y, denoms, scale=float(self.world))) for m, (x, y) in enumerate(io))
        return {"stage": "ild", "loss": self._sum_over_ranks(total), **self._update()}

    def kd_step(self, step: int) -> dict:
        """End-to-end KD: the loss is the mean per target token over ranks and micro-batches."""
        blocks = [self.blocks(step, m) for m in range(self.args.grad_accum)]
        batches = [self.batch(b) for b in blocks]
        targets = self._sum_over_ranks(sum(int(b["loss_mask"][:, 1:].sum()) for b in batches))
        count = max(targets, 1.0)
        total = 0.0
        for m, (blk, b) in enumerate(zip(blocks, batches)):
            teacher = self._teacher_logits(b, blk)
            total += self._backward(m, KDBatch(b["input_ids"], b["loss_mask"], teacher, scale=self.world / count))
        return {"stage": "kd", "loss": self._sum_over_ranks(total) / count, "targets": int(targets), **self._update()}

    def _backward(self, micro: int, batch: ILDBatch | KDBatch) -> float:
        """Forward + backward of one micro-batch (gradients synchronised on the last); its local loss sum."""
        last = micro == self.args.grad_accum - 1
        with nullcontext() if last else self.acc.no_sync(self.model):
            loss, part = self.model(batch)
            self.acc.backward(loss)
        return float(part)

    def _update(self) -> dict:
        """Clip, set this step's rates, optimizer step, zero grads; the gradient norm and the rate this step used."""
        a = self.args
        # the prepared model's own parameter list (frozen ones have no gradient and add nothing): accelerate's FSDP2
        # clipping recognises the model only by that exact list
        norm = self.acc.clip_grad_norm_(list(self.model.parameters()), a.grad_clip) if a.grad_clip > 0 else None
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(self.step, g["name"])
        lr = max(g["lr"] for g in self.optimizer.param_groups)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": None if norm is None else float(norm), "lr": lr}

    def _sum_over_ranks(self, x: float) -> float:
        return float(self.acc.reduce(torch.tensor(float(x), device=self.acc.device), "sum"))

    def _teacher_logits(self, b: dict, blocks: list[int]):
        if self.args.kl_weight == 0:
            return None
        if self.topk is not None:  # blocks past the cache's end (a time budget fills it as it goes) are added first
            self.topk.fill(self.teacher, self.packed, blocks, len(blocks), self.acc.device)
            return self.topk.load(blocks, self.student.config.vocab_size, self.acc.device)
        return TeacherLogits(self.teacher, b["input_ids"], b["loss_mask"])

    # ---- checkpoints -------------------------------------------------------------------------
    def shared_temp(self, path: Path) -> Path:
        """PATH's `temp_path` for a folder every process writes into: the main process's name, sent to all."""
        return broadcast_object_list([temp_path(path) if self.acc.is_main_process else None])[0]

    def save_checkpoint(self, elapsed: float, fix_length: bool = False) -> Path:
        """Model, optimizer and RNG states, and trainer.json (step, minutes, the KD length and its measurements).
        fix_length: a time budget fixes the KD stage's length now, from what this save cost, and stores it here."""
        final = self.ckpt_root / f"step-{self.step:07d}"
        tmp = self.shared_temp(final)  # every process writes its RNG state into it
        t = self.clock()
        self.acc.save_state(str(tmp))
        self.acc.wait_for_everyone()  # every process has written into TMP before the main process renames it
        if fix_length:
            save_s = self.clock() - t
            self._fix_length(elapsed + save_s, save_s)
        if self.acc.is_main_process:
            (tmp / "trainer.json").write_text(json.dumps({"step": self.step, "elapsed_s": elapsed,
                                                          "tokens": self.step * self.tokens_per_step,
                                                          "kd": self.budget.state()}))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in sorted(self.ckpt_root.glob("step-???????"))[: -self.args.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    def _fix_length(self, spent: float, save_s: float | None = None, replan: bool = False) -> None:
        """The KD stage's length from the main process's measurements (at CALIBRATION, or again at each look:
        budget.py), the same on every process."""
        if self.acc.is_main_process and replan:
            self.budget.replan(spent)
        elif self.acc.is_main_process:
            self.budget.fix(spent, save_s)
        state = broadcast_object_list([self.budget.state() if self.acc.is_main_process else None])[0]
        self.budget.load(state)

    def resume(self) -> None:
        """Restore the newest checkpoint (none yet: start at step 0). Nothing in it is unpickled: tensors load
        with weights_only=True and the KD length is JSON in trainer.json."""
        ckpt = self._newest_checkpoint()
        if ckpt is not None:
            self.acc.load_state(str(ckpt), load_kwargs={"weights_only": True})
            state = json.loads((ckpt / "trainer.json").read_text())
            self.step, self.elapsed_before = state["step"], state["elapsed_s"]
            if self.budget.timed:
                self.budget.load(state["kd"])
        metrics = self.out / "metrics.jsonl"
        if self.acc.is_main_process and metrics.is_file():  # drop steps (and a final row) logged after it
            rows = [line for line in metrics.read_text().splitlines() if line]
            keep = [r for r in rows if json.loads(r).get("step", 1 << 62) < self.step]
            metrics.write_text("".join(k + "\n" for k in keep))

    # ---- the run ----------------------------------------------------------------------------
    def log(self, row: dict) -> None:
        if not self.acc.is_main_process:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if "step" in row and self.tensorboard is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                if row.get(key) is not None:
                    self.tensorboard.add_scalar(f"{row['stage']}/{key}", row[key], row["step"])

    def _start(self) -> None:
        """Resume an earlier run, open TensorBoard, fill the top-k teacher cache up to the KD length, or the
        --max-tokens steps while a time budget has not fixed it (blocks past the fill are added as they come)."""
        a = self.args
        if a.resume:
            self.resume()
        self.tensorboard = None
        if self.acc.is_main_process:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:  # tensorboard is optional
                pass
        kd_steps = self.budget.cap if self.budget.steps is None else self.budget.steps
        if self.topk is not None and self.acc.is_main_process and kd_steps is not None:
            per_step = self.world * a.batch_size * a.grad_accum
            end = (self.ild_steps + kd_steps) * per_step
            self.topk.fill(self.teacher, self.packed, range(self.ild_steps * per_step, end), a.batch_size,
                           self.acc.device)
        self.acc.wait_for_everyone()

    def run(self) -> dict:
        """Train to the end (or the time budget), then finish; OUT's lock is released however it ends."""
        try:
            return self._run()
        finally:
            self.release()

    def _more(self) -> bool:
        return self.total_steps is None or self.step < self.total_steps

    def _out_of_time(self, spent: float, times: list[float]) -> bool:
        """Whether the next step and the final checkpoint would pass --max-minutes (the main process decides)."""
        a = self.args
        if a.max_minutes is None or not times:
            return False
        late = spent + sum(times[-5:]) / len(times[-5:]) + (self.budget.save_s or 0.0) > a.max_minutes * 60
        return broadcast_object_list([late])[0] if self.world > 1 else late

    def _train_step(self) -> dict:
        """One optimizer step; its metrics row, with the step's own tokens/s."""
        k = self.step - self.ild_steps  # KD step index, negative during ILD
        ts = self.clock()
        row = self.ild_step(self.step) if k < 0 else self.kd_step(self.step)
        self.step += 1
        seconds = self.clock() - ts
        if k >= 0:
            self.kd_here += 1  # KD steps run by this process: its first ones are not timed
        return {**row, "step": self.step - 1, "tokens": self.step * self.tokens_per_step,
                "tokens_per_s": self.tokens_per_step / seconds if seconds > 0 else None}

    def _run(self) -> dict:
        a = self.args
        self._start()
        t0 = self.clock()
        spent = lambda: self.elapsed_before + self.clock() - t0  # noqa: E731  (resumes included)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (a.progress and self.acc.is_main_process),
                   desc="distill", unit="step")
        times, stopped = [], None  # each step's whole cycle: the step, its log row and the bar; not checkpoints
        self.model.train()
        try:
            while self._more():
                start = self.clock()
                if self._out_of_time(spent(), times):
                    stopped = "clock"
                    break
                row = self._train_step()
                self.log({**row, "elapsed_s": round(spent(), 2)})
                show(bar, row)
                times.append(self.clock() - start)
                self.budget.record(self.step - 1 - self.ild_steps, self.kd_here, times[-1])
                if self.budget.due(self.step - self.ild_steps):
                    self.save_checkpoint(spent(), fix_length=True)
                    bar.total = self.total_steps
                    bar.refresh()
                elif self.budget.replan_due(self.step - self.ild_steps):
                    self._fix_length(spent(), replan=True)
                    self.save_checkpoint(spent())
                    bar.total = self.total_steps
                    bar.refresh()
                elif self.step % a.save_every == 0 and self._more():
                    self.save_checkpoint(spent())
        except KeyboardInterrupt:
            stopped = "interrupted"
        bar.close()
        self.save_checkpoint(spent())
        if stopped == "interrupted":
            raise KeyboardInterrupt
        stopped = stopped or (self.budget.ended_by() if self.has_kd else "ild-tokens")
        return self.finish(stopped, spent())

    # ---- finish -----------------------------------------------------------------------------
    def save_final(self) -> None:
        """Write the student as a loadable HF folder into OUT (staged, then published into place), in the dtype of
        the checkpoint it started from (it trains in fp32)."""
        objective = self.acc.unwrap_model(self.model)
        state = self.acc.get_state_dict(self.model)  # gathered from the shards under FSDP (a collective)
        if not self.acc.is_main_process:
            return
        stage = temp_path(self.out / ".final")
        with library_bars_off():
            save_trained(objective.student, stage, {k.removeprefix("student."): v for k, v in state.items()},
                         checkpoint_dtype(self.student_path))
        self.tok.save_pretrained(stage)
        publish(stage, self.out, self.student_path)

    def heldout_check(self) -> dict | None:
        """KL to the teacher, top-1 agreement and perplexities on --eval-tokens held-out chat tokens."""
        a = self.args
        if a.eval_tokens <= 0 or self.teacher is None or not (self.acc.is_main_process or sharded(self.acc)):
            return None  # sharded models run on every process in step; the main process reports
        student = self.acc.unwrap_model(self.model).student.eval()
        heldout = PackedChat(self.split["heldout"], self.tok, a.seq_len, seed=0)
        batches = heldout.take_tokens(a.eval_tokens, a.batch_size)
        with self.acc.autocast(), gathered(self.model, self.acc):
            res = fidelity({"student": student}, self.teacher, batches, desc="held-out check",
                           progress=a.progress and self.acc.is_main_process)
        if not self.acc.is_main_process:
            return None
        s = res["student"]
        return {"kl_to_teacher": s["kl"], "top1_agreement": s["top1_agreement"], "ppl_chat": s["ppl"],
                "teacher_ppl_chat": res["teacher"]["ppl"], "tokens": s["tokens"]}

    def finish(self, stopped: str, elapsed: float) -> dict:
        """Final checkpoint, held-out check, OUT/ecomla_train.json (arguments + summary); the summary."""
        self.save_final()
        self.acc.wait_for_everyone()
        check = self.heldout_check()
        summary = {"stopped": stopped, "steps": self.step, "tokens": self.step * self.tokens_per_step,
                   "ild_steps": self.ild_steps, "kd_steps": self.budget.steps, "kd_length": self.budget.summary(),
                   "minutes": round(elapsed / 60, 2), "teacher": self.teacher_spec, "heldout": check,
                   "world_size": self.world}
        if self.acc.is_main_process:
            self.log({"final": summary})
            args = {k: getattr(self.args, k) for k in self.args.__dataclass_fields__}
            (self.out / "ecomla_train.json").write_text(json.dumps({"args": args, **summary}, indent=2))
            mark_finished(self.out)
            print(f"distill: {ENDINGS[stopped]} after {self.step} steps ({summary['tokens']:,} tokens, "
                  f"{summary['minutes']} min); held-out: {check}")
        if self.tensorboard is not None:
            self.tensorboard.close()
        return summary

