"""`ecomla demo` (what `make demo` runs): the whole pipeline on the embedded default, with a report.

    ecomla demo                                  # SmolLM2-135M-Instruct -> 4x MLA (timings: docs/RESULTS.md)
    ecomla demo --ratio 8x --budget-minutes 20 --out runs/demo-8x
    ecomla demo --dpo                            # add stage 2 (DPO); off by default: building the pairs and
                                                 # training take as long again as the rest (docs/DPO.md)

Stages, each skipped when its output already exists (so an interrupted run continues where it stopped):
  assets -> convert (--init, default fitted) -> distill (end-to-end KD within --budget-minutes, after layer-wise
  alignment when --ild-tokens > 0; resumes from its last checkpoint) -> [dpo] -> eval (teacher, 0-token and trained
  student: held-out KL and perplexities; a fixed task subset sized to the budget for the teacher and the trained
  students, not the 0-token one) -> chat answers side by side -> decode speed and measured cache bytes at a long
  context -> OUT/report.md + OUT/results.json + plots.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .args import arg, command_line, run_settings
from .bench.run import BenchArgs, bench
from .bench.shapes import parse_sizes
from .common import UserError
from .convert.convert import ConvertArgs, convert
from .convert.inits import INITS
from .data.chat import load_chat
from .data.text import check_text
from .demo_report import write_report
from .distill import DistillArgs, distill
from .dpo.run import cpu_args, run_dpo
from .eval.run import EvalArgs, evaluate
from .eval.tasks import parse_limit, parse_tasks
from .generate.generate import GenerateArgs, generate, prepared
from .io import load_config, load_model, load_tokenizer, resolve
from .mla import SourceShape
from .mla.quant import check_cache_bits
from .outputs import claim_run, finished, started, temp_path

PROMPTS = ["What is the capital of France?", "Give me two tips for staying focused while studying."]
BENCH_RUNS = "absorbed,gqa-dynamic,gqa-static"  # the MLA decode path vs transformers' two GQA caches


@dataclass
class DemoArgs:
    out: str = arg("output folder; rerunning with the same settings continues an interrupted run",
                   default="runs/demo")
    ratio: str = arg("KV-cache compression above 1, written like 4x (r_kv = 2*G*d_h/ratio - d_rope)", default="4x")
    budget_minutes: float = arg("training minutes: end-to-end KD, after layer-wise alignment when --ild-tokens > 0; "
                                "the KD schedule is sized to fill them on this machine", default=12.0)
    init: str = arg("conversion init (see `ecomla convert --help`; why fitted: docs/RESULTS.md)", default="fitted")
    model: str = arg("source model", default="default")
    data: str = arg("chat data for calibration, training and held-out metrics", default="default")
    text: str = arg("plain text for the text perplexity ('boolq', 'lambada' or a file)", default="boolq")
    train_text: str = arg("plain text for a quarter of the training blocks, so the student keeps more than chat "
                          "('lambada': 402k tokens of book passages, read by no evaluation; a file; 'none': chat "
                          "only). 12 minutes at 4x on an AMD CPU: held-out text KL 1.205 against 1.240 chat-only, "
                          "chat 0.960 against 0.929", default="lambada")
    rope_dim: int = arg("d_rope", default=32)
    cache_bits: int = arg("latent cache bits: 4 or 8 (c_kv and the rotary part in groups of 32 with a scale and zero "
                          "each), trained for with quantization-aware KD and measured as decoding reads it, or 16; "
                          "at 4x, 4 bits make the cache 12.8x smaller than the bf16 GQA cache (docs/RESULTS.md "
                          "section 5)", default=4)
    ild_tokens: int = arg("tokens for layer-wise alignment before KD (0: KD only, which keeps the fitted start; "
                          "docs/RESULTS.md)", default=0)
    seq_len: int = arg("training block length (512 x 2 measured a little better than 256 x 4 per minute)",
                       default=512)
    batch_size: int = arg("training blocks per step", default=2)
    tasks: str = arg("lm-eval tasks ('all' = the paper's 7 available offline, 'none')", default="all")
    limit: str | None = arg("documents per task (default: sized to --budget-minutes)", default=None)
    eval_tokens: int = arg("held-out target tokens for KL / perplexity", default=4096)
    dpo: bool = arg("run stage 2 (DPO) after distillation", default=False)
    dpo_minutes: float = arg("training minutes for DPO with --dpo (building the pairs comes on top)", default=8.0)
    dpo_pairs: int = arg("preference pairs to build with --dpo", default=32)
    bench_contexts: str = arg("contexts for the decode-speed comparison", default="512,2k")
    bench_batch: int = arg("batch for the decode-speed comparison", default=4)
    max_new_tokens: int = arg("tokens per chat answer", default=48)
    calib_seqs: int = arg("calibration sequences for activation-aware inits", default=128)

    def __post_init__(self):
        m = re.fullmatch(r"(\d+(?:\.\d*)?)x", str(self.ratio).strip().lower())
        self.compression = float(m.group(1)) if m else 0.0
        if self.compression <= 1:
            raise UserError(f"--ratio must be a compression above 1 written like 4x, got {self.ratio!r}")
        if self.budget_minutes <= 0 or self.dpo_minutes <= 0:
            raise UserError(f"--budget-minutes and --dpo-minutes must be > 0, got {self.budget_minutes} and "
                            f"{self.dpo_minutes}")
        if self.rope_dim < 2 or self.rope_dim % 2:
            raise UserError(f"--rope-dim must be a positive even number (rotary dims come in pairs), "
                            f"got {self.rope_dim}")
        for name in ("seq_len", "batch_size", "eval_tokens", "dpo_pairs", "bench_batch", "max_new_tokens",
                     "calib_seqs"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        check_cache_bits(self.cache_bits)
        if self.ild_tokens < 0:
            raise UserError(f"--ild-tokens must be >= 0, got {self.ild_tokens}")
        self.check_inputs()

    def check_inputs(self) -> None:
        """What the later stages would refuse, refused before the first stage writes anything."""
        if self.init not in INITS:
            raise UserError(f"--init {self.init!r}: choose from {', '.join(INITS)}")
        parse_sizes(self.bench_contexts, "--bench-contexts")
        parse_limit(self.limit, parse_tasks(self.tasks))
        if self.model != "default":
            try:
                resolve(self.model)
            except UserError as err:
                raise UserError(f"--model: {err}") from None
        check_text(self.text, "--text")
        if self.train_text != "none":
            check_text(self.train_text, "--train-text")
        data = Path(self.data)
        if (self.data.startswith((".", "/", "~")) or data.suffix in (".json", ".jsonl", ".parquet", ".arrow")) \
                and not data.exists():
            raise UserError(f"--data {self.data}: no such data file or folder (or use 'default')")

    def default_limit(self) -> str:
        n = max(20, min(200, int(self.budget_minutes * 2)))  # 24 documents per task for the 12-minute default
        return f"mmlu={4 * n},*={n}"


class Demo:
    def __init__(self, args: DemoArgs, log=print):
        self.a, self.log = args, log
        self.out = Path(args.out)
        self.lock = claim_run(self.out, "demo", [args.model, args.data, args.text], continues=True,
                              settings=run_settings(args, skip=("out",)))  # finished stages are reused: same run
        self.timings: dict[str, float] = {}
        self.commands: dict[str, str] = {}
        self.state = self._load("state.json") or {}

    def _load(self, name):
        p = self.out / name
        return json.loads(p.read_text()) if p.is_file() else None

    def _save(self, name, obj):
        tmp = temp_path(self.out / name)
        tmp.write_text(json.dumps(obj, indent=2))
        tmp.replace(self.out / name)

    def announce(self, stage: str, args, done: bool, folder: Path) -> bool:
        """Record the command that runs `stage` with `args`; True when it must run (its output is not there yet)."""
        self.commands[stage] = command_line(stage, args)
        self.log(f"reusing {folder}" if done else self.commands[stage])
        return not done

    def stage(self, name: str, fn):
        t0 = time.time()
        self.log(f"\n== {name} ==")
        result = fn()
        self.timings[name] = round((time.time() - t0) / 60, 2)
        self.state.setdefault("minutes", {})[name] = self.state.get("minutes", {}).get(name, 0) + self.timings[name]
        self._save("state.json", self.state)
        return result

    # ---- stages ------------------------------------------------------------------------------
    def assets(self):
        path = resolve(self.a.model)
        cfg, _ = load_config(path)
        self.source, self.config = path, cfg
        if self.a.data == "default":
            load_chat("default")
        self.log(f"source: {path}")

    def convert(self) -> Path:
        folder = self.out / "student-0tok"
        r_kv = SourceShape.of(self.config).kv_rank_for_ratio(self.a.compression, self.a.rope_dim)
        args = ConvertArgs(src=self.a.model, out=str(folder), kv_rank=r_kv, rope_dim=self.a.rope_dim, init=self.a.init,
                           calib_data=self.a.data, calib_seqs=self.a.calib_seqs, calib_len=min(256, self.a.seq_len),
                           overwrite=True)
        if self.announce("convert", args, done=finished(folder, "convert"), folder=folder):
            convert(args, log=self.log)
        return folder

    def distill(self, student: Path) -> Path:
        folder = self.out / "student-kd"
        done = finished(folder, "distill")
        args = DistillArgs(student=str(student), teacher="source", data=self.a.data, out=str(folder),
                           stage="both", ild_tokens=self.a.ild_tokens,  # the minutes size the schedule
                           max_minutes=self.a.budget_minutes, seq_len=self.a.seq_len, batch_size=self.a.batch_size,
                           eval_tokens=0, save_every=20, resume=started(folder) and not done,
                           text_data=None if self.a.train_text == "none" else self.a.train_text, text_share=0.25,
                           cache_bits=None if self.a.cache_bits == 16 else self.a.cache_bits)
        if self.announce("distill", args, done=done, folder=folder):
            distill(args)
        return folder

    def dpo(self, student: Path) -> Path | None:
        if not self.a.dpo:
            return None
        folder = self.out / "student-dpo"
        done = finished(folder, "dpo")
        args = cpu_args(str(student), str(folder), max_minutes=self.a.dpo_minutes, chat_data=self.a.data,
                        pairs=self.a.dpo_pairs, resume=started(folder) and not done)
        if self.announce("dpo", args, done=done, folder=folder):
            run_dpo(args, log=self.log)
        return folder

    def evaluate(self, models: dict[str, Path]) -> dict:
        limit = self.a.limit or self.a.default_limit()
        names = ",".join(models)
        paths = [str(p) for p in models.values()]
        folder = self.out / "eval"
        trained = ",".join(["teacher", *list(models)[1:]])  # the 0-token student: KL and perplexities only
        args = EvalArgs(models=paths, names=names, teacher=self.a.model, tasks=self.a.tasks, limit=limit,
                        max_tokens=self.a.eval_tokens, data=self.a.data, text=self.a.text, tasks_for=trained,
                        cache_bits=None if self.a.cache_bits == 16 else self.a.cache_bits, out=str(folder))
        done = finished(folder, "eval")  # the demo's settings fix its models: a finished eval has them all
        return evaluate(args, log=self.log) if self.announce("eval", args, done, folder / "results.json") else \
            self._load("eval/results.json")

    def chat(self, models: dict[str, str]) -> dict:
        cached = self._load("chat.json")
        if cached and list(cached["answers"]) == list(models):
            return cached
        tok = load_tokenizer(self.source)
        answers = {}
        for name, path in models.items():
            model = prepared(load_model(path, dtype="float32")[0])
            res = generate(model, tok, PROMPTS, chat=True, max_new_tokens=self.a.max_new_tokens)
            answers[name] = [t.strip() for t in res["text"]]
        self.commands["generate"] = command_line("generate", GenerateArgs(list(models.values())[-1], [PROMPTS[0]],
                                                                          chat=True))
        out = {"prompts": PROMPTS, "answers": answers}
        self._save("chat.json", out)
        return out

    def bench(self, student: Path) -> list[dict]:
        folder = self.out / "bench"
        args = BenchArgs(model=str(student), contexts=self.a.bench_contexts, batches=str(self.a.bench_batch),
                         runs=BENCH_RUNS, steps=6, warmup=2, out=str(folder))
        done = finished(folder, "bench")
        return bench(args) if self.announce("bench", args, done, folder) else self._load("bench/results.json")["rows"]

    # ---- the run ------------------------------------------------------------------------------
    def run(self) -> dict:
        """Every stage in order (finished ones reused); OUT's lock is released however it ends."""
        try:
            return self._run()
        finally:
            self.lock.release()

    def _run(self) -> dict:
        t0 = time.time()
        self.stage("assets", self.assets)
        student0 = self.stage("convert", self.convert)
        trained = self.stage("distill", lambda: self.distill(student0))
        dpo = self.stage("dpo", lambda: self.dpo(trained)) if self.a.dpo else None
        models = {"student-0tok": student0, "student-kd": trained, **({"student-dpo": dpo} if dpo else {})}
        results = self.stage("eval", lambda: self.evaluate(models))
        chat = self.stage("chat", lambda: self.chat({"teacher": self.source, **{k: str(v) for k, v in models.items()}}))
        speed = self.stage("bench", lambda: self.bench(trained))
        summary = write_report(self, results, chat, speed, models, minutes=(time.time() - t0) / 60)
        self.log(summary)
        return results


def demo(args: DemoArgs) -> dict:
    return Demo(args).run()
