"""Measurement records: the files docs/RESULTS.md is generated from (tools/results_page.py reads them).

    python tools/record.py docs/results/NAME.json --result OUT/results.json -- python -m ecomla eval ... --out OUT
    from tools.record import write_record                # a study script's --record FILE

A record is one small JSON file: {"command": the command as typed, "cpu": what ran it, "commit": the code it ran
(short hash, "-dirty" if tracked files differed), "date": ISO date, "result": what the command measured}.
The CLI form runs the command, then copies the JSON file it wrote (`--result`) into the record; a failed command
writes no record.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_label() -> str:
    """'AMD EPYC (no bf16)' or 'Intel Xeon ... (AMX, bf16)': the two kinds of machine timings differ on."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = " ".join(value.split())
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    if "amx_tile" in flags or "amx_bf16" in flags:
        return f"{model} (AMX, bf16)"
    return f"{model} ({'bf16' if 'avx512_bf16' in flags else 'no bf16'})"


def commit() -> str:
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def write_record(path: str | os.PathLike, result, command: list[str] | None = None, code: str | None = None) -> dict:
    """Write a record of `result` (JSON-able) measured by `command` (default: this process's command line) on
    `code` (default: `commit()` now; pass what `commit()` said when the command started, since the tree may have
    been edited while it ran)."""
    argv = command if command is not None else [Path(sys.executable).name, *sys.argv]
    record = {"command": shlex.join(argv), "cpu": cpu_label(), "commit": code or commit(),
              "date": datetime.date.today().isoformat(), "result": result}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)
    return record


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        sys.exit("usage: python tools/record.py RECORD.json --result FILE.json -- COMMAND ...")
    cut = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("record", help="the record to write (docs/results/NAME.json)")
    parser.add_argument("--result", required=True, help="the JSON file the command writes")
    args, command = parser.parse_args(argv[:cut]), argv[cut + 1:]
    code = commit()  # the code the command runs: the tree as it starts
    if subprocess.run(command).returncode != 0:
        sys.exit(f"{shlex.join(command)} failed: no record written")
    write_record(args.record, json.loads(Path(args.result).read_text()), command, code)
    print(f"wrote {args.record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
