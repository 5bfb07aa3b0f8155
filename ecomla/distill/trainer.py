"""The stage-1 training loop on accelerate: setup / step / train / save_checkpoint / resume.

One optimizer step = `grad_accum` micro-batches of `batch_size` blocks on each of `world` processes.
Step s, micro-batch m, rank r reads blocks [(s*ga + m)*world*B + r*B, ... + B) of the packed train split,
so the data position is just the step counter: a resumed run (model, optimizer, scheduler, RNG restored
by accelerate) continues on exactly the blocks the uninterrupted run would have seen.

Steps [0, S_ild) are layer-wise alignment (MLA parameters only, lr `ild_lr`), then [S_ild, S_ild+S_kd)
are end-to-end KD (the `trainable` set, lr `lr`); each stage has its own warmup + cosine.
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
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm

from ..io import UserError, load_model, load_tokenizer, resolve
from ..mla.attention import MLAAttention
from .objective import Objective
from .run import DistillArgs
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


def schedule(step: int, steps: int, warmup_ratio: float, floor: float) -> float:
    """Multiplier for step `step` of a `steps`-step stage: linear warmup over max(1, warmup_ratio*steps)
    steps (the first step already moves), then cosine from 1 down to `floor` at the last step."""
    warm = max(1, round(warmup_ratio * steps))
    if step < warm:
        return (step + 1) / warm
    p = (step - warm) / max(1, steps - 1 - warm)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


class Trainer:
    def __init__(self, args: DistillArgs):
        self.args = a = args
        self.out = Path(a.out)
        ddp = DistributedDataParallelKwargs(find_unused_parameters=a.stage != "kd" and a.trainable != "mla")
        # Several runs in one process (the demo, tests) may differ in precision; the process group is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.acc = Accelerator(mixed_precision="bf16" if a.precision == "bf16" else "no", kwargs_handlers=[ddp])
        set_seed(a.seed)
        self.world = self.acc.num_processes
        self._load_models()
        self._setup_data()
        self._setup_optim()
        self.step, self.elapsed_before = 0, 0.0

    # ---- setup -------------------------------------------------------------------------------
    def _load_models(self):
        a = self.args
        self.student, self.student_path = load_model(a.student, dtype="float32")
        if not any(isinstance(l.self_attn, MLAAttention) for l in self.student.model.layers):
            raise UserError(f"{a.student} has no MLA layer; convert it first with `ecomla convert`")
        meta = Path(self.student_path) / "ecomla_convert.json"
        self.source_spec = json.loads(meta.read_text())["source"] if meta.is_file() else None
        teacher_spec = self.source_spec if a.teacher == "source" else a.teacher
        if teacher_spec is None:
            raise UserError(f"{a.student} records no source model; pass --teacher")
        tdtype = "bfloat16" if a.precision == "bf16" else "float32"
        need_teacher = a.stage != "ild" and a.kl_weight > 0
        self.teacher = load_model(teacher_spec, dtype=tdtype, device=self.acc.device)[0] if need_teacher else None
        if self.teacher is not None and self.teacher.config.vocab_size != self.student.config.vocab_size:
            raise UserError(f"teacher {teacher_spec} has vocabulary {self.teacher.config.vocab_size}, the student "
                            f"{self.student.config.vocab_size}: KD needs the same tokenizer")
        self.teacher_spec = teacher_spec
        self.source = None
        if a.stage != "kd" and a.ild_tokens > 0:
            if self.source_spec is None:
                raise UserError("layer-wise alignment needs the source model recorded by `ecomla convert`")
            same = self.teacher is not None and resolve(self.source_spec) == resolve(teacher_spec)
            self.source = self.teacher if same else load_model(self.source_spec, dtype=tdtype, device=self.acc.device)[0]
        for m in (self.teacher, self.source):
            if m is not None:
                m.requires_grad_(False)

    def _setup_data(self):
        from ..data.chat import load_chat, split_chat
        from ..data.packing import PackedChat

        a = self.args
        self.tok = load_tokenizer(self.student_path)
        self.split = split_chat(load_chat(a.data))
        self.packed = PackedChat(self.split["train"], self.tok, a.seq_len, seed=a.seed, mask_prompt=a.mask_prompt)
        per_step = self.world * a.batch_size * a.grad_accum * a.seq_len
        self.tokens_per_step = per_step
        self.ild_steps = math.ceil(a.ild_tokens / per_step) if (a.stage != "kd" and a.ild_tokens > 0) else 0
        self.kd_steps = math.ceil(a.max_tokens / per_step) if a.stage != "ild" else 0
        self.total_steps = self.ild_steps + self.kd_steps
        self.topk = None
        if a.teacher_topk > 0 and self.kd_steps:
            from ..assets.wheels import cache_dir

            self.topk = TopKCache(cache_dir() / "teacher_topk", str(resolve(self.teacher_spec)), a.data, a.seq_len,
                                  a.seed, a.teacher_topk, a.mask_prompt)

    def _setup_optim(self):
        a = self.args
        groups = param_groups(self.student)
        trained = {"mla"} | ({"attn"} if a.trainable in ("all", "attention") and self.kd_steps else set()) | (
            {"rest"} if a.trainable == "all" and self.kd_steps else set())
        for name, ps in groups.items():
            for p in ps:
                p.requires_grad_(name in trained)
        self.objective = Objective(self.student, a.loss, a.temperature, a.kl_weight, a.ce_weight, a.chunk,
                                   compile_loss=a.compile_loss)
        opt_groups = [{"params": [p for p in groups[n] if p.requires_grad], "lr": 1.0, "name": n} for n in sorted(trained)]
        self.optimizer = torch.optim.AdamW(opt_groups, lr=1.0, betas=a.beta_pair, weight_decay=a.weight_decay)
        lambdas = [lambda s, n=g["name"]: self.lr_at(s, n) for g in opt_groups]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambdas)
        self.model, self.optimizer = self.acc.prepare(self.objective, self.optimizer)
        self.acc.register_for_checkpointing(self.scheduler)

    def lr_at(self, step: int, group: str) -> float:
        a = self.args
        if step < self.ild_steps:
            return a.ild_lr * schedule(step, self.ild_steps, a.warmup_ratio, a.min_lr_ratio) if group == "mla" else 0.0
        if group == "attn" and a.trainable == "mla" or group == "rest" and a.trainable != "all":
            return 0.0
        return a.lr * schedule(step - self.ild_steps, self.kd_steps, a.warmup_ratio, a.min_lr_ratio)

    # ---- one optimizer step ------------------------------------------------------------------
    def blocks(self, step: int, micro: int) -> list[int]:
        a = self.args
        base = (step * a.grad_accum + micro) * self.world * a.batch_size + self.acc.process_index * a.batch_size
        return list(range(base, base + a.batch_size))

    def batch(self, blocks: list[int]) -> dict[str, torch.Tensor]:
        b = self.packed.batch(blocks[0], len(blocks))
        return {k: v.to(self.acc.device) for k, v in b.items()}

    def train_step(self, step: int) -> dict:
        a = self.args
        stage = "ild" if step < self.ild_steps else "kd"
        micro = [self.blocks(step, m) for m in range(a.grad_accum)]
        batches = [self.batch(b) for b in micro]
        if stage == "ild":
            ild = [self._ild_inputs(b) for b in batches]
            local = {i: sum(float(t[i].float().pow(2).sum()) for _, t in ild) for i in ild[0][1]}
            denoms = {i: self.acc.reduce(torch.tensor(v, device=self.acc.device), "sum") for i, v in local.items()}
            count = 1.0
        else:
            count = float(self.acc.reduce(torch.tensor(float(sum(int(b["loss_mask"][:, 1:].sum()) for b in batches)),
                                                       device=self.acc.device), "sum"))
        total = 0.0
        for m, b in enumerate(batches):
            sync = nullcontext() if m == a.grad_accum - 1 else self.acc.no_sync(self.model)
            with sync:
                if stage == "ild":
                    inputs, targets = ild[m]
                    loss, part, _ = self.model("ild", inputs=inputs, targets=targets, denoms=denoms,
                                               scale=float(self.world))
                else:
                    loss, part, _ = self.model("kd", input_ids=b["input_ids"], loss_mask=b["loss_mask"],
                                               teacher_logits_fn=self._teacher_fn(b, micro[m]),
                                               scale=self.world / max(count, 1.0))
                self.acc.backward(loss)
                total += float(part)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = self.acc.clip_grad_norm_(params, a.grad_clip) if a.grad_clip > 0 else None
        lr = max(g["lr"] for g in self.optimizer.param_groups)  # the rate this step used
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = float(self.acc.reduce(torch.tensor(total, device=self.acc.device), "sum"))
        if stage == "kd":  # mean per target token; ILD parts are already global relative errors
            loss /= max(count, 1.0)
        return {"stage": stage, "loss": loss, "grad_norm": None if norm is None else float(norm), "lr": lr}

    def _ild_inputs(self, b: dict):
        layers = [i for i, l in enumerate(self.student.model.layers) if isinstance(l.self_attn, MLAAttention)]
        with self.acc.autocast():
            return attention_io(self.source, b["input_ids"], layers)

    def _teacher_fn(self, b: dict, blocks: list[int]):
        if self.args.kl_weight == 0:
            return None
        if self.topk is not None:
            return self.topk.load(blocks, self.student.config.vocab_size, self.acc.device)
        return TeacherLogits(self.teacher, b["input_ids"], b["loss_mask"])

    # ---- checkpoints -------------------------------------------------------------------------
    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self, elapsed: float) -> Path:
        final = self.ckpt_root / f"step-{self.step:07d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        if self.acc.is_main_process:
            (tmp / "trainer.json").write_text(json.dumps({"step": self.step, "elapsed_s": elapsed,
                                                          "tokens": self.step * self.tokens_per_step}))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in sorted(self.ckpt_root.glob("step-???????"))[: -self.args.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    def resume(self) -> None:
        ckpts = sorted(self.ckpt_root.glob("step-???????"))
        if not ckpts:
            raise UserError(f"--resume: no checkpoint in {self.ckpt_root}")
        self.acc.load_state(str(ckpts[-1]))
        state = json.loads((ckpts[-1] / "trainer.json").read_text())
        self.step, self.elapsed_before = state["step"], state["elapsed_s"]
        metrics = self.out / "metrics.jsonl"
        if self.acc.is_main_process and metrics.is_file():  # drop steps logged after that checkpoint
            keep = [l for l in metrics.read_text().splitlines() if l and json.loads(l).get("step", -1) < self.step]
            metrics.write_text("".join(k + "\n" for k in keep))

    # ---- the run ----------------------------------------------------------------------------
    def log(self, row: dict) -> None:
        if not self.acc.is_main_process:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if "step" in row and self.tensorboard() is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                if row.get(key) is not None:
                    self._tb.add_scalar(f"{row['stage']}/{key}", row[key], row["step"])

    def tensorboard(self):
        """A SummaryWriter on OUT/tensorboard when the tensorboard package is installed, else None."""
        if not hasattr(self, "_tb"):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                self._tb = None
        return self._tb

    def run(self) -> dict:
        from .finish import finish

        a = self.args
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            if not a.resume and (self.ckpt_root.exists() or (self.out / "metrics.jsonl").exists()):
                raise UserError(f"{self.out} holds an earlier run; pass --resume to continue it or choose another --out")
        self.acc.wait_for_everyone()
        if a.resume:
            self.resume()
        if self.topk is not None and self.acc.is_main_process:
            per_step = self.world * a.batch_size * a.grad_accum
            self.topk.fill(self.teacher, self.packed, range(self.ild_steps * per_step, self.total_steps * per_step),
                           a.batch_size, self.acc.device)
        self.acc.wait_for_everyone()
        t0 = time.time()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (a.progress and self.acc.is_main_process),
                   desc="distill", unit="step")
        step_times, stopped = [], "done"
        self.model.train()
        try:
            while self.step < self.total_steps:
                if a.max_minutes is not None and step_times:  # a budget for the whole run, resumes included
                    spent = self.elapsed_before + time.time() - t0
                    if spent + sum(step_times[-5:]) / len(step_times[-5:]) > a.max_minutes * 60:
                        stopped = "time budget"
                        break
                ts = time.time()
                row = self.train_step(self.step)
                self.step += 1
                step_times.append(time.time() - ts)
                row.update(step=self.step - 1, tokens=self.step * self.tokens_per_step,
                           tokens_per_s=self.tokens_per_step / step_times[-1],
                           elapsed_s=round(self.elapsed_before + time.time() - t0, 2))
                self.log(row)
                bar.set_postfix(stage=row["stage"], loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                bar.update(1)
                if self.step % a.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint(self.elapsed_before + time.time() - t0)
        except KeyboardInterrupt:
            stopped = "interrupted"
        bar.close()
        self.save_checkpoint(self.elapsed_before + time.time() - t0)
        if stopped == "interrupted":
            raise KeyboardInterrupt
        return finish(self, stopped, self.elapsed_before + time.time() - t0)
