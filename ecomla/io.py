"""Loading what a stage reads: models, configs and tokenizers by MODEL argument, and a checkpoint's provenance.

A MODEL argument is `default` (the embedded SmolLM2-135M-Instruct), a local folder, or a hub id.
Importing any part of ecomla registers the "ecomla" model type (ecomla/__init__.py), so MLA checkpoints load
through the Auto classes.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .assets.smollm2 import default_model_dir
from .common import DTYPES, UserError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Config fields every weight shape depends on: transformers would silently fill in its own default for a missing one
# (Llama's 32 heads) and the load would fail deep inside, or build a wrong model.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


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


def _load_error(spec: str, path: str, err: Exception) -> UserError:
    """One line for a model or config that transformers could not load: for a local folder, what is wrong with it;
    for a hub id, also that the hub may be unreachable."""
    first = " ".join(line.strip() for line in str(err).splitlines()[:2])  # a validation error's cause is line 2
    if Path(path).is_dir():
        return UserError(f"could not load {spec!r}: {type(err).__name__}: {first}")
    return UserError(f"could not load {spec!r}: {type(err).__name__}: {first}. "
                     "If this is a hub id, the hub may be unreachable here: pass a local folder or 'default'.")


def _config_json(folder: Path) -> dict:
    """A local checkpoint's config.json, read by us first so that a broken file is named as such."""
    file = folder / "config.json"
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file} is not valid JSON ({err}); write or download the checkpoint's config again") from err
    if not isinstance(raw, dict):
        raise UserError(f"{file} must hold a JSON object of config fields, not a {type(raw).__name__}")
    return raw


def _check_shape_fields(config, raw: dict, file: Path) -> None:
    """Refuse a config.json that leaves out a field the weight shapes depend on (`SHAPE_FIELDS`)."""
    aliases = getattr(config, "attribute_map", {}) or {}
    missing = [f for f in SHAPE_FIELDS if hasattr(config, f) and f not in raw and aliases.get(f) not in raw]
    if missing:
        raise UserError(f"{file} lacks {', '.join(missing)}: the weights' shapes depend on them; "
                        "restore the checkpoint's full config.json")


def _check_weights(folder: Path) -> None:
    """Every safetensors file of a local checkpoint opens (its header covers the file): an interrupted download
    or a garbage file is refused here, naming the file, instead of failing inside transformers."""
    files = sorted(folder.glob("*.safetensors"))
    if not files and not any(folder.glob("*.bin")):
        raise UserError(f"{folder} has no weights (no *.safetensors); pass a complete checkpoint folder")
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise UserError(f"{file} is not a complete safetensors file ({err}); it may be an interrupted download: "
                            "fetch or write the checkpoint again") from err


def _check_shapes(loaded: dict, path: str) -> None:
    """Refuse weights whose shapes differ from what config.json builds (`loaded`: transformers' loading info)."""
    bad = sorted(loaded.get("mismatched_keys") or [], key=str)
    if bad:
        name, got, want = bad[0][:3]
        raise UserError(f"{path}: {len(bad)} weights do not match config.json (e.g. {name} is {tuple(got)} in the "
                        f"safetensors file, {tuple(want)} by the config); restore the checkpoint's own config.json")


def load_config(spec: str):
    """(config, resolved path). A local config.json must be JSON and name every field in `SHAPE_FIELDS`."""
    path = resolve(spec)
    folder = Path(path)
    raw = _config_json(folder) if folder.is_dir() else None
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, StrictDataclassError) as err:  # StrictDataclassError: a field fails validation
        raise _load_error(spec, path, err) from err
    if raw is not None:
        _check_shape_fields(config, raw, folder / "config.json")
    return config, path


def mla_shapes(spec: str) -> str:
    """A checkpoint's attention layer shapes in one line, from its config alone, e.g. 'kv 64 + rope 32, q 384 x30'
    ('GQA x30' for a source model)."""
    config = load_config(spec)[0]
    layers = getattr(config, "mla_layers", None) or [None] * config.num_hidden_layers
    kinds = [f"kv {m['kv_lora_rank']} + rope {m['qk_rope_head_dim']}, q {m['q_lora_rank']}" if m else "GQA"
             for m in layers]
    return "; ".join(f"{k} x{kinds.count(k)}" for k in dict.fromkeys(kinds))


def check_model(spec: str):
    """(config, resolved path) of a model whose config and weight files are sound, without reading the weights:
    what `load_model` checks first, for a stage that loads the model only after other work."""
    config, path = load_config(spec)
    if Path(path).is_dir():
        _check_weights(Path(path))
    return config, path


def load_model(spec: str, dtype: str | torch.dtype = "auto", device: str | None = None):
    """(model in eval mode, resolved path). Missing/unexpected weights raise (transformers is strict for us); a
    broken local config.json or safetensors file is a UserError naming the file."""
    config, path = check_model(spec)
    dt = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    try:  # mis-shaped tensors are reported (not raised from inside transformers) and refused below
        model, loaded = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dt, output_loading_info=True,
                                                             ignore_mismatched_sizes=True)
    except (OSError, ValueError) as err:
        raise _load_error(spec, path, err) from err
    _check_shapes(loaded, path)
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


def drop_tied_aliases(models, weights, _folder) -> None:
    """Keep one name per parameter in each state dict of `weights` (accelerate's save-state hook, and a state
    gathered from FSDP shards before save_pretrained). A tied parameter (lm_head = embed_tokens) has two names;
    accelerate would save both, then remove the second with a warning that the checkpoint may be broken, and a
    gathered state holds two copies that no longer share storage. The model ties them again on load, so the
    second name is left out here and nothing is warned about."""
    for model, state in zip(models, weights):
        first = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if first.setdefault(id(p), name) != name:
                state.pop(name, None)


def checkpoint_dtype(spec: str) -> torch.dtype:
    """The dtype a checkpoint's config names for its weights (float32 when it names none)."""
    dtype = load_config(spec)[0].dtype
    return dtype if isinstance(dtype, torch.dtype) else DTYPES.get(dtype, torch.float32)


def save_trained(model, folder: Path, state: dict, dtype: torch.dtype) -> None:
    """`model` as a from_pretrained folder holding the weights of `state` (a trainer's, maybe gathered from shards)
    in `dtype`, the dtype its checkpoint came in: a model trained in fp32 from a bf16 checkpoint is written back in
    bf16, and config.json says so (save_pretrained would name the training dtype). One name per tied weight."""
    drop_tied_aliases([model], [state], None)
    model.save_pretrained(folder, state_dict={k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    config.save_pretrained(folder)
