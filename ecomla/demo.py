"""`ecomla demo` (what `make demo` runs): the pipeline on the embedded default, SmolLM2-135M-Instruct.

    ecomla demo                      # convert at 2x / 4x / 8x, measure the caches, compare answers
    ecomla demo --ratios 4x --out runs/demo

Stages: fetch the default model -> convert at each ratio (X-EcoMLA SVD init) -> generate with the
teacher and each student on the same chat prompts, reading cache bytes/token from the live cache ->
a summary table and `summary.json` in the output folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .args import arg
from .io import UserError

# ratio name -> (r_kv, d_rope) on SmolLM2-135M (G=3, d_h=64: 384 elements per token per layer)
RATIOS = {"2x": (160, 32), "4x": (64, 32), "8x": (16, 32)}
PROMPTS = ["What is the capital of France?", "Write one sentence about the ocean."]


@dataclass
class DemoArgs:
    out: str = arg("output folder (reused: finished stages are skipped on a rerun)", default="runs/demo")
    ratios: str = arg("comma-separated KV compression ratios to build: 2x, 4x, 8x", default="2x,4x,8x")
    max_new_tokens: int = arg("tokens per chat answer", default=24)

    def __post_init__(self):
        bad = [r for r in self.ratios.split(",") if r not in RATIOS]
        if bad:
            raise UserError(f"--ratios: unknown {bad}; choose from {', '.join(RATIOS)}")


def _convert(out: Path, ratio: str, log) -> dict:
    from .convert.convert import ConvertArgs, convert

    folder = out / f"student-{ratio}-xecomla"
    meta_file = folder / "ecomla_convert.json"
    if meta_file.is_file():
        log(f"[convert {ratio}] reusing {folder}")
        return json.loads(meta_file.read_text())
    r_kv, d_rope = RATIOS[ratio]
    log(f"[convert {ratio}] r_kv={r_kv} d_rope={d_rope} -> {folder}")
    return convert(ConvertArgs(src="default", out=str(folder), kv_rank=r_kv, rope_dim=d_rope), log=lambda *_: None)


def _layer_summary(meta: dict) -> str:
    errs = [r["kv_error"] for r in meta["layers"] if r.get("kv_error") is not None]
    qerrs = [r["q_error"] for r in meta["layers"] if r.get("q_error") is not None]
    return (f"kv_err mean {sum(errs) / len(errs):.3f} (min {min(errs):.3f}, max {max(errs):.3f}); "
            f"q_err mean {sum(qerrs) / len(qerrs):.3f}")


def main(args: DemoArgs, log=print) -> dict:
    from .generate.generate import generate
    from .io import load_model, load_tokenizer

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, teacher_path = load_model("default", dtype="float32")
    tok = load_tokenizer(teacher_path)
    rows, answers = [], {}
    res = generate(teacher, tok, PROMPTS, chat=True, max_new_tokens=args.max_new_tokens)
    rows.append({"model": "teacher (GQA)", "bytes_per_token": res["cache_bytes_per_token"], "compression": 1.0,
                 "tokens_per_s": res["tokens_per_s"], "layer_errors": "-"})
    answers["teacher"] = res["text"]
    for ratio in args.ratios.split(","):
        meta = _convert(out, ratio, log)
        student, _ = load_model(str(out / f"student-{ratio}-xecomla"), dtype="float32")
        res = generate(student, tok, PROMPTS, chat=True, max_new_tokens=args.max_new_tokens)
        rows.append({"model": f"student {ratio} (r_kv={RATIOS[ratio][0]}+{RATIOS[ratio][1]}, 0 tokens)",
                     "bytes_per_token": res["cache_bytes_per_token"],
                     "compression": rows[0]["bytes_per_token"] / res["cache_bytes_per_token"],
                     "tokens_per_s": res["tokens_per_s"], "layer_errors": _layer_summary(meta),
                     "convert_seconds": meta["summary"]["seconds"]})
        answers[ratio] = res["text"]
    summary = {"rows": rows, "answers": answers, "prompts": PROMPTS, "minutes": (time.time() - t0) / 60}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    lines = ["", f"{'model':<44} {'cache B/token':>13} {'smaller':>8} {'tok/s':>6}  per-layer SVD error"]
    for r in summary["rows"]:
        lines.append(f"{r['model']:<44} {r['bytes_per_token']:>13} {r['compression']:>7.2f}x "
                     f"{r['tokens_per_s']:>6.1f}  {r['layer_errors']}")
    lines.append("(cache bytes/token are read from the live cache of each generate() call, float32)")
    for i, p in enumerate(summary["prompts"]):
        lines.append(f"\nQ: {p}")
        for name, texts in summary["answers"].items():
            lines.append(f"  {name:>8}: {texts[i].strip()[:100]!r}")
    lines.append(f"\ndemo finished in {summary['minutes']:.1f} min")
    return "\n".join(lines)
