"""What `ecomla plan` plans: the student and teacher configs from its arguments, and their shapes, counted on models
built on the meta device (no weights are read or allocated).

A model argument is an ecomla checkpoint folder or its config.json, a source model (folder, config.json, 'default',
a hub id when the hub is reachable), or one of the GPU recipes' hub ids, whose published shapes are built in
(`PUBLISHED`, the bench's presets) so that they plan without the hub. A distill recipe (recipes/*.yaml) names its
student by the `ecomla convert` line of its header and its teacher by its `teacher` key.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ..args import add_dataclass_args, from_namespace, load_yaml_defaults
from ..bench.shapes import shape_config
from ..common import UserError
from ..convert.args import ConvertArgs
from ..convert.layers import planned_config
from ..distill.trainer import param_groups
from ..io import load_config, recorded_source, resolve
from ..mla import EcoMLAForCausalLM
from ..mla.config import EcoMLAConfig
from .memory import LayerShape, Shapes

PUBLISHED = {  # hub id -> the bench's preset of its published config.json shapes (Instruct = base shapes)
    "meta-llama/Llama-3.2-1B-Instruct": "llama-3.2-1b", "meta-llama/Llama-3.2-1B": "llama-3.2-1b",
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b", "meta-llama/Llama-3.1-8B": "llama-3.1-8b",
}
TRAINED = {"all": ("mla", "attn", "rest"), "attention": ("mla", "attn"), "mla": ("mla",)}  # distill's --trainable


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers at all: an unreachable one makes transformers retry for about 40 s."""
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def model_config(spec: str, flag: str):
    """(config, where it came from) of a model argument, without weights."""
    if spec in PUBLISHED:
        return shape_config(PUBLISHED[spec]), "published shapes, built in"
    path = Path(spec)
    if path.is_file():
        if path.suffix != ".json":
            raise UserError(f"{flag} {spec}: pass a checkpoint folder, its config.json or a hub id")
        try:
            return AutoConfig.from_pretrained(str(path)), str(path)
        except (OSError, ValueError) as err:
            raise UserError(f"{flag} {spec}: not a model config ({str(err).splitlines()[0]})") from err
    if spec != "default" and not path.exists() and not hub_reachable():
        resolve(spec)  # a malformed name or a missing folder is named as such first
        raise UserError(f"{flag} {spec}: the hub is unreachable from here; pass a local folder or its config.json")
    return load_config(spec)[0], resolve(spec)


def recipe_convert_line(recipe: Path) -> ConvertArgs:
    """The `ecomla convert` command of a recipe's header comment, parsed as `ecomla convert` parses it."""
    head = [line.lstrip("# ").strip() for line in recipe.read_text().splitlines() if line.startswith("#")]
    lines = [line for line in head if line.startswith("ecomla convert ")]
    if not lines:
        raise UserError(f"{recipe}: its header has no `ecomla convert` line naming the student; plan the student's "
                        "checkpoint or source instead")
    parser = argparse.ArgumentParser(prog="ecomla convert")
    add_dataclass_args(parser, ConvertArgs)
    return from_namespace(ConvertArgs, parser.parse_args(shlex.split(lines[0])[2:]))


def resolve_models(student: str, teacher: str | None, convert: ConvertArgs | None) -> dict:
    """{student config, teacher config, their labels, the recipe's settings}: STUDENT as a recipe, an MLA config, or a
    source with `convert` (the conversion flags given to the plan)."""
    recipe = {}
    if Path(student).suffix in (".yaml", ".yml"):
        recipe = load_yaml_defaults(student)
        convert = recipe_convert_line(Path(student))
        teacher = teacher or recipe.get("teacher", "source")
        student = convert.src
    config, where = model_config(student, "STUDENT")
    source = None
    if isinstance(config, EcoMLAConfig):
        source = recorded_source(where) if Path(where).is_dir() else None
    elif convert is None:
        raise UserError(f"{student} is a {config.model_type} model, not an MLA checkpoint: give --kv-rank (with "
                        "--rope-dim, --q-rank) to plan its conversion")
    else:
        source, config = student, planned_config(convert, config)
        where = f"{where}, converted as `ecomla convert` {_convert_flags(convert)}"
    teacher = teacher or "source"
    if teacher == "source":
        if source is None:
            raise UserError(f"{student} records no source model: pass --teacher")
        teacher = source
    t_config, t_where = model_config(teacher, "--teacher")
    return {"student": config, "student_label": f"{student} ({where})", "teacher": t_config,
            "teacher_label": f"{teacher} ({t_where})", "recipe": recipe}


def _convert_flags(c: ConvertArgs) -> str:
    return f"--kv-rank {c.kv_rank} --rope-dim {c.rope_dim} --q-rank {c.q_rank}"


def build_meta(config):
    """The model on the meta device: its parameters have shapes and no storage."""
    with torch.device("meta"):
        if isinstance(config, EcoMLAConfig):
            return EcoMLAForCausalLM(config)
        return AutoModelForCausalLM.from_config(config)


def unique_numel(params) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def shapes(student_config: EcoMLAConfig, teacher_config, trainable: str) -> Shapes:
    """What the memory arithmetic needs, counted on the meta-device models."""
    student, teacher = build_meta(student_config), build_meta(teacher_config)
    groups = param_groups(student)
    linears = [m.weight for m in student.modules() if isinstance(m, torch.nn.Linear)]
    root = [*student.model.embed_tokens.parameters(), *student.model.norm.parameters(), *student.lm_head.parameters()]
    c = student_config
    return Shapes(
        hidden=c.hidden_size, intermediate=c.intermediate_size, heads=c.num_attention_heads,
        kv_heads=c.num_key_value_heads, head_dim=c.head_dim, vocab=c.vocab_size,
        layers=tuple(LayerShape(c.mla_spec(i)) for i in range(c.num_hidden_layers)),
        student_params=unique_numel(student.parameters()),
        trained_params=unique_numel(p for g in TRAINED[trainable] for p in groups[g]),
        linear_params=sum(w.numel() for w in linears), root_params=unique_numel(root),
        layer_params=max(unique_numel(layer.parameters()) for layer in student.model.layers),
        head_params=student.lm_head.weight.numel(), teacher_params=unique_numel(teacher.parameters()),
        teacher_root_params=unique_numel([*teacher.model.embed_tokens.parameters(), *teacher.model.norm.parameters(),
                                          *teacher.lm_head.parameters()]),
        teacher_layer_params=max(unique_numel(layer.parameters()) for layer in teacher.model.layers),
        teacher_hidden=teacher_config.hidden_size)
