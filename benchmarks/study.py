"""One runner for studies: variants -> (convert) -> (distill) -> eval -> one table.

    python benchmarks/study.py --out runs/rope-share \
        --variant rope32 "--kv-rank 64 --rope-dim 32 --init fitted" \
        --variant rope16 "--kv-rank 80 --rope-dim 16 --init fitted"        # two ways to cache 96 elements
    python benchmarks/study.py --out runs/kd --model teacher default \
        --variant 4x-kd "--kv-rank 64 --init fitted" "--stage kd --max-tokens 49152" --record docs/results/kd.json

    from benchmarks.study import Variant, run_study
    rows = run_study([Variant("4x", convert=["--kv-rank", "64"]), Variant("mine", build=my_writer)], "runs/x")

A variant is a name and how its model is made: `ecomla convert SRC FOLDER` arguments (`convert`), an existing
model (`model`), or a Python callable that writes a checkpoint into the folder it is given (`build`, e.g. a
conversion with FitChoice fields set directly); then, optionally, `ecomla distill` arguments (`distill`). Every
step writes a folder under --work named by its inputs (a hash of stage, input and arguments; `build-NAME` for a
callable: delete it to rebuild), so a rerun reuses what finished, continues a distillation, shares one conversion
between variants, and remakes a step whose arguments changed. Nothing is keyed by the code: after a change that
affects the outputs, use a fresh --out and --work. Each model is measured alone by `ecomla eval MODEL --teacher
SRC` with --eval's flags (KL and top-1 agreement to SRC, perplexities, tasks, KV bytes per token from a live cache).
Writes OUT/results.json ({"rows": one dict per variant: the eval's metrics plus how it was made}), OUT/table.md
(printed too) and OUT/quality_vs_kv.png; --record FILE also writes the rows as a measurement record
(tools/record.py), for the results page.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ecomla.args import from_namespace, load_yaml_defaults
from ecomla.cli import COMMANDS, build_parser
from ecomla.common import UserError
from ecomla.distill.quiet import library_bars_off
from ecomla.eval.report import plot_quality_vs_kv, table
from ecomla.outputs import MANIFEST, started

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo root importable
from tools.record import write_record  # noqa: E402

EVAL = "--tasks none --max-tokens 8192"  # RESULTS' held-out instrument: KL, top-1, perplexities; no tasks
FINISHED = {"convert": "config.json", "build": "config.json", "distill": "ecomla_train.json", "eval": "results.json"}


@dataclass
class Variant:
    name: str
    convert: list[str] | None = None  # `ecomla convert SRC OUT` flags
    model: str | None = None  # an existing model: a folder, hub id or 'default'
    build: Callable[[Path], None] | None = None  # writes a checkpoint into the folder it is given
    distill: list[str] | None = None  # `ecomla distill STUDENT` flags, run on the model above

    def __post_init__(self):
        if [self.convert, self.model, self.build].count(None) != 2:
            raise UserError(f"variant {self.name!r}: give exactly one of convert flags, a model or a build callable")

    def how(self) -> dict:
        """How the model was made, for its row: the flags as typed, the model, the callable's name."""
        made = {"convert": self.convert and shlex.join(self.convert), "model": self.model,
                "build": getattr(self.build, "__name__", None), "distill": self.distill and shlex.join(self.distill)}
        return {k: v for k, v in made.items() if v is not None}


def stage_args(stage: str, argv: list[str], who: str):
    """The arguments dataclass of `ecomla STAGE ARGV...` (a `--config` recipe included, as the CLI reads it),
    validated: a bad flag is refused before any work."""
    try:
        ns = build_parser().parse_args([stage, *argv])
    except SystemExit:  # argparse printed what is wrong
        raise UserError(f"{who}: `ecomla {stage}` refuses {shlex.join(argv)}") from None
    return from_namespace(COMMANDS[stage].args, ns, load_yaml_defaults(ns.config))


def folder(work: Path, stage: str, *inputs) -> Path:
    return work / f"{stage}-{hashlib.sha1(json.dumps(inputs).encode()).hexdigest()[:10]}"


def plan(v: Variant, src: str, work: Path) -> tuple[list[tuple[str, object, Path]], str]:
    """The steps that make `v`'s model, (stage, its arguments or the build callable, its folder), and the model."""
    steps, who = [], f"variant {v.name!r}"
    if v.convert is not None:
        model = folder(work, "convert", src, v.convert)
        steps.append(("convert", stage_args("convert", [src, str(model), *v.convert], who), model))
    elif v.build is not None:
        model = work / f"build-{v.name}"
        steps.append(("build", v.build, model))
    else:
        model = v.model
    if v.distill is not None:
        start, model = model, folder(work, "distill", str(model), v.distill)
        argv = [str(start), "--out", str(model), "--eval-tokens", "0", "--no-progress", *v.distill]
        steps.append(("distill", stage_args("distill", argv, who), model))
    return steps, str(model)


def run_steps(steps: list[tuple[str, object, Path]], log) -> None:
    """Run each step not finished yet; a distillation that started resumes."""
    for stage, args, out in steps:
        if (out / FINISHED[stage]).is_file():
            log(f"[study] reuse {stage}: {out}")
            continue
        log(f"[study] {stage}: {out}")
        if stage == "build":
            args(out)
            continue
        if stage == "distill" and started(out):
            args.resume = True
        with library_bars_off():  # as `ecomla STAGE` shows it: the stage's own bar, not "Loading weights"
            COMMANDS[stage].run(args)


def measure(model: str, src: str, eval_argv: list[str], out: Path, log) -> dict:
    """The eval's row of `model`, from OUT/eval/eval-HASH (keyed by the model, when it was made, and the flags)."""
    made = json.loads((Path(model) / MANIFEST).read_text()).get("created") if started(model) else None
    measured = folder(out / "eval", "eval", model, made, src, eval_argv)
    argv = [model, "--teacher", src, "--no-teacher-row", "--out", str(measured), *eval_argv]
    run_steps([("eval", stage_args("eval", argv, "--eval"), measured)], log)
    return json.loads((measured / "results.json").read_text())["models"][0]


def run_study(variants: list[Variant], out, *, src: str = "default", work=None, eval_flags: str = EVAL,
              record=None, command: list[str] | None = None, log=print) -> list[dict]:
    """Make and measure every variant; write OUT/results.json, OUT/table.md and the plot; return the rows.
    `record`: also write them as a measurement record of `command` (default: this process's command line)."""
    out = Path(out)
    work = Path(work) if work else out / "models"
    names = [v.name for v in variants]
    if not variants or len(set(names)) != len(names):
        raise UserError(f"give variants with distinct names, got {names}")
    eval_argv = shlex.split(eval_flags)
    stage_args("eval", ["MODEL", "--teacher", src, *eval_argv], "--eval")
    plans = [plan(v, src, work) for v in variants]  # every flag checked before any work
    rows = []
    for v, (steps, model) in zip(variants, plans):
        run_steps(steps, log)
        rows.append({**measure(model, src, eval_argv, out, log), "name": v.name, **v.how()})
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"rows": rows, "src": src, "eval": eval_flags}, indent=1))
    text = "\n".join(table({"models": rows})) + "\n"
    (out / "table.md").write_text(text)
    plot_quality_vs_kv({"models": rows}, out / "quality_vs_kv.png")
    print(text)
    if record:
        write_record(record, rows, command)
        log(f"[study] wrote {record}")
    return rows


def parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The flags every study script takes (a study adds its own)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=out, help="results.json, table.md, the plot and the evals (default: %(default)s)")
    p.add_argument("--work", default=None, help="where converted / distilled models go (default: OUT/models)")
    p.add_argument("--src", default="default", help="the model converted from, and the teacher of the KL")
    p.add_argument("--eval", default=EVAL, help="`ecomla eval` flags of every measurement (default: %(default)s)")
    p.add_argument("--record", default=None, help="also write the rows as a measurement record (tools/record.py)")
    return p


def run_cli(a: argparse.Namespace, variants: list[Variant], command: list[str] | None = None) -> list[dict]:
    """`run_study` from parsed flags (`command`: what --record stores; default: this process's command line); a
    mistake the user can fix exits with one line."""
    try:
        return run_study(variants, a.out, src=a.src, work=a.work, eval_flags=a.eval, record=a.record, command=command)
    except UserError as err:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {err}")


def main(argv: list[str] | None = None) -> list[dict]:
    p = parser(__doc__, "runs/study")
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME CONVERT [DISTILL]",
                   help="a model converted from SRC with these `ecomla convert` flags, then distilled with these "
                   "`ecomla distill` flags if given (each a quoted string)")
    p.add_argument("--model", nargs="+", action="append", default=[], metavar="NAME MODEL [DISTILL]",
                   help="an existing model (folder, hub id, 'default'), distilled with these flags if given")
    a = p.parse_args(argv)
    if any(not 2 <= len(x) <= 3 for x in a.variant + a.model):
        p.error("--variant and --model take NAME, then CONVERT flags or a MODEL, then optional DISTILL flags")
    distill = lambda x: shlex.split(x[2]) if len(x) == 3 else None  # noqa: E731
    variants = [Variant(x[0], model=x[1], distill=distill(x)) for x in a.model]
    variants += [Variant(x[0], convert=shlex.split(x[1]), distill=distill(x)) for x in a.variant]
    return run_cli(a, variants, None if argv is None else ["python", "benchmarks/study.py", *argv])


if __name__ == "__main__":
    main()
