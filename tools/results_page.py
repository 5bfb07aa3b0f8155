"""docs/RESULTS.md, generated: its prose from docs/results/RESULTS.md.in, its tables from the records.

    python tools/results_page.py                            # render docs/RESULTS.md from docs/results/*.json
    python tools/results_page.py --check                    # exit 1 when docs/RESULTS.md is not what they give
    python tools/results_page.py --rerun zero-4x demo-4x    # rerun those records' commands, then render
    python tools/results_page.py --rerun teacher --work /tmp/w   # the commands' out/ folders go under /tmp/w

RECORDS holds, per record, the commands that measure it and the JSON file the last one writes. `--rerun` runs
them in --work (default: the repository root, where `out/` is git-ignored) through tools/record.py, which stores
the command, the CPU, the commit and the date next to the result. Every record's commands write under
out/NAME/ only, and a rerun refuses to start while that folder exists (a continued run would reuse old stages).
A record that is missing, or was measured by other commands than RECORDS holds now, renders as "not measured
yet", never as an old number.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDS_DIR = ROOT / "docs" / "results"
TEMPLATE = RECORDS_DIR / "RESULTS.md.in"
PAGE = ROOT / "docs" / "RESULTS.md"


@dataclass(frozen=True)
class Spec:
    steps: tuple[str, ...]  # shell lines, run in order in --work; only the last one's JSON is recorded
    result: str             # the JSON file the last step writes

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.steps[0]) if len(self.steps) == 1 else ["sh", "-c", " && ".join(self.steps)]

    @property
    def command(self) -> str:
        """The command as tools/record.py stores it."""
        return shlex.join(self.argv)

    @property
    def folder(self) -> str:
        return "/".join(self.result.split("/")[:2])  # out/NAME


RANKS = {"2x": 160, "4x": 64, "8x": 16}  # r_kv at d_rope 32 on SmolLM2-135M: (r_kv + 32) / 384 of the GQA cache
OTHER_INITS = ("xecomla", "random", "whitened", "rope-aware", "rope-whitened")
ZERO_EVAL = "--teacher default --tasks none --max-tokens 8192"  # held-out KL and perplexities, no task subsets


def zero_token(ratio: str) -> Spec:
    return Spec((f"python -m ecomla convert default out/zero-{ratio}/model --kv-rank {RANKS[ratio]} --rope-dim 32 "
                 f"--init fitted",
                 f"python -m ecomla eval out/zero-{ratio}/model --names {ratio}-fitted {ZERO_EVAL} "
                 f"--out out/zero-{ratio}/eval"), f"out/zero-{ratio}/eval/results.json")


def inits_4x() -> Spec:
    models = [f"out/inits-4x/{init}" for init in OTHER_INITS]
    converts = tuple(f"python -m ecomla convert default {m} --kv-rank 64 --rope-dim 32 --init {init}"
                     for m, init in zip(models, OTHER_INITS))
    return Spec((*converts, f"python -m ecomla eval {' '.join(models)} {ZERO_EVAL} --out out/inits-4x/eval"),
                "out/inits-4x/eval/results.json")


RECORDS: dict[str, Spec] = {
    "teacher": Spec(("python -m ecomla eval default --names teacher --teacher default --limit 'mmlu=96,*=24' "
                     "--max-tokens 8192 --out out/teacher",), "out/teacher/results.json"),
    **{f"zero-{r}": zero_token(r) for r in RANKS},
    "inits-4x": inits_4x(),
    **{f"demo-{r}": Spec((f"python -m ecomla demo --ratio {r} --out out/demo-{r}",), f"out/demo-{r}/results.json")
       for r in RANKS},
    "decode": Spec(("python -m ecomla bench default --kv-rank 16 --rope-dim 32 --contexts 4k,8k --batches 8,16 "
                    "--runs absorbed,gqa-dynamic,gqa-static --fill synthetic --warmup 2 --steps 5 --repeats 3 "
                    "--threads 2 --out out/decode",), "out/decode/results.json"),
    "export": Spec(("python -m ecomla convert default out/export/model --kv-rank 64 --rope-dim 32 --init fitted "
                    "--target deepseek-v3",
                    "python -m ecomla export out/export/model out/export/deepseek-v3",
                    "python -m ecomla eval out/export/deepseek-v3 --names export --teacher out/export/model "
                    "--no-teacher-row --tasks none --max-tokens 8192 --out out/export/eval"),
                   "out/export/eval/results.json"),
}


# ---- records ---------------------------------------------------------------------------------------------------
def load_records(folder: Path = RECORDS_DIR) -> dict[str, dict | None]:
    """{name: record}, None where the record is missing or its command is not the one RECORDS holds now."""
    recs = {}
    for name, spec in RECORDS.items():
        path = folder / f"{name}.json"
        rec = json.loads(path.read_text()) if path.is_file() else None
        recs[name] = rec if rec is not None and rec.get("command") == spec.command else None
    return recs


def rerun(names: list[str], work: Path) -> None:
    """Run each record's commands in `work` through tools/record.py; stop at the first that fails."""
    busy = [RECORDS[n].folder for n in names if (work / RECORDS[n].folder).exists()]
    if busy:
        sys.exit(f"{work / busy[0]} exists from an earlier run (its stages would be reused): move it away, "
                 f"or pass --work a fresh folder")
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    for name in names:
        spec = RECORDS[name]
        print(f"== {name}: {spec.command}", flush=True)
        record = [sys.executable, str(ROOT / "tools" / "record.py"), str(RECORDS_DIR / f"{name}.json"),
                  "--result", spec.result, "--", *spec.argv]
        if subprocess.run(record, cwd=work, env=env).returncode != 0:
            sys.exit(f"{name}: its command failed; no record written")


# ---- the page ----------------------------------------------------------------------------------------------------
def render(recs: dict[str, dict | None], template: str | None = None) -> str:
    """The template with each {{table}} replaced by its rendering from `recs`."""
    template = TEMPLATE.read_text() if template is None else template
    return re.sub(r"\{\{(\w[\w-]*)\}\}", lambda m: "\n".join(TABLES[m.group(1)](recs)), template)


TABLES: dict = {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/RESULTS.md is not what the records give")
    parser.add_argument("--rerun", nargs="+", metavar="NAME", choices=list(RECORDS),
                        help=f"rerun these records' commands first: {', '.join(RECORDS)}")
    parser.add_argument("--work", default=str(ROOT), help="folder the commands run in (their out/ goes there)")
    args = parser.parse_args(argv)
    if args.rerun:
        rerun(args.rerun, Path(args.work))
    page = render(load_records())
    if args.check:
        if not PAGE.is_file() or PAGE.read_text() != page:
            print("docs/RESULTS.md is not what the records give: run python tools/results_page.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(page)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
