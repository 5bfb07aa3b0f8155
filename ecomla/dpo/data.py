"""Preference data for DPO: load any prompt / chosen / rejected dataset into one layout TRL's DPOTrainer takes.

    ds, stats = load_preferences("HuggingFaceH4/ultrafeedback_binarized,HuggingFaceH4/orca_dpo_pairs")
    ds, stats = load_preferences("runs/dpo-4x/pairs.jsonl")
    ds, dropped = drop_long_prompts(ds, tok, max_prompt_length=512)

A DATA argument is a local .json / .jsonl / .parquet / .arrow file or `save_to_disk` folder, a hub id
(`id` or `id:split`; without a split the first of train_prefs, train is used), or a comma-separated list
of these: a mixture, rows concatenated in the order given.

Rows need `prompt`, `chosen` and `rejected`, in either of TRL's layouts:
- plain: three strings;
- conversational: `chosen` / `rejected` are [{role, content}] message lists and `prompt` a string or a
  message list. Sets such as ultrafeedback_binarized store the whole conversation in chosen / rejected:
  the opening turns the two share become the prompt and only what follows is kept as the completion.
Output rows are {prompt, chosen, rejected} all plain or all conversational (prompt ends with a user turn,
completions start with an assistant turn). Rows whose completions are empty or identical are dropped and
counted; anything else that does not fit raises one UserError naming the source and what to change.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from ..data.chat import ROLES
from ..common import UserError

COLUMNS = ("prompt", "chosen", "rejected")
SPLITS = ("train_prefs", "train")
SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow"}
HOW = ("columns 'prompt', 'chosen', 'rejected' holding strings (plain layout) or lists of {role, content} "
       "messages (conversational layout)")


def _open(spec: str) -> datasets.Dataset:
    path = Path(spec)
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as err:
            raise UserError(f"{spec} is a folder but not a `save_to_disk` dataset; pass a .jsonl/.parquet file, "
                            "a saved dataset folder or a hub id") from err
        if isinstance(ds, datasets.DatasetDict):
            split = next((s for s in SPLITS if s in ds), None)
            if split is None:
                raise UserError(f"{spec}: no split named {' or '.join(SPLITS)} (has {list(ds)})")
            ds = ds[split]
        return ds
    if path.exists():
        kind = SUFFIXES.get(path.suffix)
        if kind is None:
            raise UserError(f"{spec}: unsupported preference file type {path.suffix!r}; use .json, .jsonl, "
                            ".parquet or .arrow")
        if path.stat().st_size == 0:
            raise UserError(f"{spec} is empty; each row needs {HOW}")
        try:
            return datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as err:  # datasets raises many types for a corrupt or ragged file
            raise UserError(f"could not read {spec}: {_first_line(err)}. Each row needs {HOW}") from err
    if spec.startswith((".", "/", "~")) or path.suffix in SUFFIXES:
        raise UserError(f"no such preference file or folder: {spec}")
    return _open_hub(spec)


def _open_hub(spec: str) -> datasets.Dataset:
    name, _, split = spec.partition(":")
    try:
        if not split:
            names = datasets.get_dataset_split_names(name)
            split = next((s for s in SPLITS if s in names), None)
            if split is None:
                raise UserError(f"{name} has no {' or '.join(SPLITS)} split (has {names}); pass {name}:SPLIT")
        return datasets.load_dataset(name, split=split)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"could not load preference dataset {spec!r} from the hub ({_first_line(err)}); pass a "
                        "local file, or use --make-pairs offline") from err


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return type(err).__name__ + (f": {lines[0][:300]}" if lines else "")


def _messages(value, where: str, column: str) -> list[dict]:
    """A message list -> [{role, content}] with known roles; anything else is a UserError."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: '{column}' must be a non-empty list of {{role, content}} messages, got "
                        f"{type(value).__name__}. Each row needs {HOW}")
    out = []
    for m in value:
        role = ROLES.get(str(m.get("role", m.get("from", ""))).lower()) if isinstance(m, dict) else None
        content = m.get("content", m.get("value")) if isinstance(m, dict) else None
        if role is None or not isinstance(content, str):
            raise UserError(f"{where}: '{column}' has a message {str(m)[:80]!r} that is not {{role: system|user|"
                            "assistant, content: str}")
        out.append({"role": role, "content": content})
    return out


def _shared_turns(chosen: list[dict], rejected: list[dict]) -> int:
    """Opening turns chosen and rejected share, leaving at least one turn of each as the completion."""
    k = 0
    while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
        k += 1
    return k


def normalise_row(row: dict, where: str) -> dict | None:
    """One row -> {prompt, chosen, rejected} (plain strings or message lists), None to drop it, or UserError."""
    prompt, chosen, rejected = (row.get(c) for c in COLUMNS)
    if isinstance(chosen, str) and isinstance(rejected, str):
        if isinstance(prompt, list):  # message prompt, string answers: conversational
            chosen, rejected = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
        elif not isinstance(prompt, str):
            raise UserError(f"{where}: 'prompt' must be a string or a message list, got {type(prompt).__name__}")
        else:
            if not prompt.strip():
                raise UserError(f"{where}: 'prompt' is empty")
            keep = chosen.strip() and rejected.strip() and chosen.strip() != rejected.strip()
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected} if keep else None
    if isinstance(chosen, str) or isinstance(rejected, str):
        raise UserError(f"{where}: 'chosen' is {type(chosen).__name__} but 'rejected' is {type(rejected).__name__}; "
                        f"both must be strings or both message lists")
    chosen, rejected = _messages(chosen, where, "chosen"), _messages(rejected, where, "rejected")
    k = _shared_turns(chosen, rejected)
    if k:  # the conversation is repeated in chosen / rejected; any prompt column is the same text again
        turns = chosen[:k]
    elif isinstance(prompt, str) and prompt.strip():
        turns = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        turns = _messages(prompt, where, "prompt")
    else:
        raise UserError(f"{where}: no prompt: 'prompt' is {type(prompt).__name__} and chosen / rejected share no "
                        "opening turns")
    chosen, rejected = chosen[k:], rejected[k:]
    if turns[-1]["role"] != "user" or chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
        raise UserError(f"{where}: the prompt must end with a user turn and chosen / rejected continue it with an "
                        f"assistant turn (got prompt ending {turns[-1]['role']!r}, chosen starting "
                        f"{chosen[0]['role']!r}, rejected starting {rejected[0]['role']!r})")
    if not any(m["content"].strip() for m in chosen) or not any(m["content"].strip() for m in rejected):
        return None
    return None if chosen == rejected else {"prompt": turns, "chosen": chosen, "rejected": rejected}


def _normalise(ds: datasets.Dataset, spec: str) -> tuple[datasets.Dataset, int]:
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise UserError(f"{spec}: preference data is missing column(s) {missing} (found {ds.column_names}); it needs "
                        f"{HOW}. Rename the columns or convert the file.")
    if len(ds) == 0:
        raise UserError(f"{spec}: no rows")
    rows = []
    for i, row in enumerate(ds.select_columns(list(COLUMNS))):
        out = normalise_row(row, f"{spec}, row {i}")
        if out is not None:
            rows.append(out)
    if not rows:
        raise UserError(f"{spec}: every row has an empty completion or chosen == rejected; nothing to learn from")
    layouts = {isinstance(r["prompt"], list) for r in rows}
    if len(layouts) > 1:
        raise UserError(f"{spec}: mixes plain (string) and conversational (message list) rows; use one layout")
    return datasets.Dataset.from_list(rows), len(ds) - len(rows)


def load_preferences(spec: str) -> tuple[datasets.Dataset, dict]:
    """(Dataset of prompt / chosen / rejected, {"sources": {spec: rows kept}, "dropped": n}) for DATA `spec`."""
    parts = [s.strip() for s in spec.split(",") if s.strip()]
    if not parts:
        raise UserError("no preference data given: pass DATA (a file, hub id or comma list) or --make-pairs")
    sets, stats = [], {"sources": {}, "dropped": 0, "layout": None}
    for part in parts:
        ds, dropped = _normalise(_open(part), part)
        layout = "conversational" if isinstance(ds[0]["prompt"], list) else "plain"
        if stats["layout"] not in (None, layout):
            raise UserError(f"{part} is {layout} but earlier sources are {stats['layout']}: a mixture needs one layout")
        stats["layout"] = layout
        stats["sources"][part] = len(ds)
        stats["dropped"] += dropped
        sets.append(ds)
    return (datasets.concatenate_datasets(sets) if len(sets) > 1 else sets[0]), stats


def prompt_lengths(tok, prompts: list, chunk: int = 512) -> list[int]:
    """Tokens of each prompt as TRL renders it (chat template + generation prompt for message lists)."""
    out = []
    for lo in range(0, len(prompts), chunk):
        part = prompts[lo:lo + chunk]
        if isinstance(part[0], list):
            ids = tok.apply_chat_template(part, tokenize=True, add_generation_prompt=True, return_dict=False)
        else:
            ids = tok(part, add_special_tokens=False)["input_ids"]
        out += [len(x) for x in ids]
    return out


def drop_long_prompts(ds: datasets.Dataset, tok, max_prompt_length: int) -> tuple[datasets.Dataset, int]:
    """Drop rows whose prompt exceeds `max_prompt_length` tokens (TRL 1.x truncates only prompt+completion)."""
    if isinstance(ds[0]["prompt"], list) and not getattr(tok, "chat_template", None):
        raise UserError("conversational preference data needs a tokenizer with a chat template; MODEL's has none")
    keep = [i for i, n in enumerate(prompt_lengths(tok, ds["prompt"])) if n <= max_prompt_length]
    if not keep:
        raise UserError(f"every prompt is longer than --max-prompt-length {max_prompt_length} tokens; raise it")
    return (ds.select(keep) if len(keep) < len(ds) else ds), len(ds) - len(keep)
