"""Loading what a stage reads: models, configs and tokenizers by MODEL argument, and a checkpoint's provenance.

A MODEL argument is `default` (the embedded SmolLM2-135M-Instruct), a local folder, or a hub id.
Importing any part of ecomla registers the "ecomla" model type (ecomla/__init__.py), so MLA checkpoints load
through the Auto classes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .assets.smollm2 import default_model_dir
from .common import DTYPES, UserError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve(spec: str) -> str:
    """`default` -> the cached default checkpoint (fetched once); a folder -> itself; else a hub id."""
    if spec == "default":
        return str(default_model_dir())
    p = Path(spec)
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{spec} is a file; pass a checkpoint folder (with config.json), a hub id or 'default'")
        if not (p / "config.json").is_file():
            raise UserError(f"{spec} has no config.json; pass a Hugging Face checkpoint folder, a hub id or 'default'")
        return str(p)
    if spec.startswith((".", "/", "~")) or not HUB_ID.match(spec):
        raise UserError(f"no such folder: {spec} (pass a checkpoint folder, a hub id or 'default')")
    return spec


def _hub_hint(spec: str, err: Exception) -> UserError:
    return UserError(
        f"could not load {spec!r}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
        "If this is a hub id, the hub may be unreachable here: pass a local folder or 'default'."
    )


def load_config(spec: str):
    path = resolve(spec)
    try:
        return AutoConfig.from_pretrained(path), path
    except (OSError, ValueError) as err:
        raise _hub_hint(spec, err) from err


def load_model(spec: str, dtype: str | torch.dtype = "auto", device: str | None = None):
    """(model in eval mode, resolved path). Missing/unexpected weights raise (transformers is strict for us)."""
    path = resolve(spec)
    dt = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
    except (OSError, ValueError) as err:
        raise _hub_hint(spec, err) from err
    if device:
        model.to(device)
    return model.eval(), path


def load_tokenizer(spec_or_path: str):
    path = resolve(spec_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"no tokenizer in {spec_or_path}: {err}".splitlines()[0]) from err


def recorded_source(model_path: str | Path) -> str | None:
    """The source model `ecomla convert` recorded in MODEL/ecomla_convert.json (kept by distill and dpo), or None."""
    meta = Path(model_path) / "ecomla_convert.json"
    return json.loads(meta.read_text()).get("source") if meta.is_file() else None


def count_params(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
