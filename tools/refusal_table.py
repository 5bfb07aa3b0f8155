"""The bad-input table of docs/RELIABILITY.md: run the parametrised refusal tests and print each case's message.

    python tools/refusal_table.py > /tmp/table.md

Runs `pytest tests/test_bad_inputs.py tests/test_outputs.py` with ECOMLA_REFUSALS set, so `assert_refused`
(tests/helpers.py) logs the one line each bad input got; temporary paths are shown relative to pytest's folder.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ("tests/test_bad_inputs.py", "tests/test_outputs.py")


def collect() -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "refusals.jsonl"
        env = {**os.environ, "ECOMLA_REFUSALS": str(log)}
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FILES], cwd=ROOT,
                             env=env, capture_output=True, text=True)
        print(res.stdout.strip().splitlines()[-1], file=sys.stderr)
        return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def short(message: str) -> str:
    """Temporary paths relative to pytest's base folder; the `ecomla STAGE: error:` prefix dropped."""
    message = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/", "", message)
    return message.split(": error: ", 1)[-1].replace("|", "\\|")


def main() -> None:
    rows = collect()
    print("| case | stage | what it gets (exit 2, this one line on stderr) |\n|---|---|---|")
    for r in rows:
        case = re.search(r"\[(.+?)\]", r["test"])
        name = case.group(1) if case else r["test"].split("::")[-1].split(" ")[0]
        stage = r["message"].split(":", 1)[0].removeprefix("ecomla ")
        print(f"| `{name}` | {stage} | {short(r['message'])} |")
    print(f"\n{len(rows)} refusals", file=sys.stderr)


if __name__ == "__main__":
    main()
