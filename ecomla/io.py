"""Model/tokenizer resolution and atomic checkpoint folders, shared by every stage.

A MODEL argument is `default` (the embedded SmolLM2-135M-Instruct), a local folder, or a hub id.
Outputs are written to `<out>.tmp-<pid>` and renamed into place, so a crash never leaves a
half-written checkpoint where a user expects a good one.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

import torch

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UserError(Exception):
    """A mistake the user can fix; the CLI prints the message alone, without a traceback."""


def resolve(spec: str) -> str:
    """`default` -> the cached default checkpoint (fetched once); a folder -> itself; else a hub id."""
    if spec == "default":
        from .assets.smollm2 import default_model_dir

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
    from transformers import AutoConfig

    import ecomla  # noqa: F401  (registers the ecomla model type)

    path = resolve(spec)
    try:
        return AutoConfig.from_pretrained(path), path
    except (OSError, ValueError) as err:
        raise _hub_hint(spec, err) from err


def load_model(spec: str, dtype: str | torch.dtype = "auto", device: str | None = None):
    """(model in eval mode, resolved path). Missing/unexpected weights raise (transformers is strict for us)."""
    from transformers import AutoModelForCausalLM

    import ecomla  # noqa: F401

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
    from transformers import AutoTokenizer

    path = resolve(spec_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"no tokenizer in {spec_or_path}: {err}".splitlines()[0]) from err


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder next to `out`; on success it replaces `out`, on error it is removed."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def count_params(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
