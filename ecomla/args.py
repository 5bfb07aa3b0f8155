"""Dataclass arguments that are also the command line: each field's `help` is its `--help` text.

    @dataclass
    class ConvertArgs:
        src: str = arg("folder, hub id or 'default'", positional=True)
        kv_rank: int | None = arg("latent rank r_kv", default=None)

`add_dataclass_args(parser, ConvertArgs)` adds `SRC` and `--kv-rank` (`advanced=True` fields under their own
heading); `from_namespace` builds the dataclass (running its `__post_init__` validation) and refuses a removed flag
or recipe key with its line in the dataclass's `RETIRED` table. `load_yaml_defaults` lets a recipe YAML supply
values that command-line flags then override. `command_line("convert", args)` is the way back: the exact
`ecomla convert ...` command that builds `args`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import types
import typing
from pathlib import Path

import yaml

from .common import UserError

MISSING = dataclasses.MISSING
RETIRED_DEST = "retired:"  # namespace prefix of a removed flag (the dataclass's RETIRED)


def arg(help: str, *, default=MISSING, positional: bool = False, choices=None, nargs=None, flag: str | None = None,
        advanced: bool = False):
    meta = {"help": help, "positional": positional, "choices": choices, "nargs": nargs, "flag": flag,
            "advanced": advanced}
    if default is MISSING:
        return dataclasses.field(metadata=meta)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp):
    """int | None -> int; list[str] -> str; Literal handled by choices."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    if origin in (list, tuple):
        return _base_type(typing.get_args(tp)[0])
    return tp


def _default(f: dataclasses.Field):
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def flag_name(name: str) -> str:
    """A field's command-line flag: max_tokens -> --max-tokens."""
    return "--" + name.replace("_", "-")


def flag_list(names) -> str:
    """'--a, --b' for field names, e.g. for a message or a help text."""
    return ", ".join(map(flag_name, names))


def run_settings(args, skip=("out", "resume")) -> dict:
    """A run's arguments by field name, without `skip`: what a resumed or rerun run must keep (ecomla/outputs.py)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.name not in skip}


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or flag_name(f.name)


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    advanced = parser.add_argument_group("advanced (most runs leave these at their defaults)")  # shown if not empty
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta:
            continue
        target = advanced if meta.get("advanced") else parser
        tp = _base_type(hints[f.name])
        default = _default(f)
        kw = {"help": meta["help"]}
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        if meta.get("nargs"):
            kw["nargs"] = meta["nargs"]
        if meta["positional"]:
            target.add_argument(f.name, metavar=f.name.upper(), type=tp, **kw)
            continue
        flag = _flag(f)
        if tp is bool:
            target.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, **kw)
        else:
            kw["help"] += f" (default: {default})"
            if _is_list(hints[f.name]):  # a repeated list flag adds to the list (`--prompt A --prompt B`: both)
                kw["action"] = "extend"
            target.add_argument(flag, dest=f.name, type=tp, default=None, **kw)
    for name in getattr(cls, "RETIRED", {}):  # known, hidden, refused by from_namespace with its line
        parser.add_argument(flag_name(name), "--no-" + flag_name(name)[2:], dest=RETIRED_DEST + name, nargs="?",
                            const=True, default=None, help=argparse.SUPPRESS)


def _is_list(tp) -> bool:
    """list[...] or list[...] | None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(tp))
    return typing.get_origin(tp) in (list, tuple)


def command_line(stage: str, args) -> str:
    """`ecomla STAGE ...` that builds `args`: its positionals, then every flag whose value is not the default."""
    parts = ["ecomla", stage]
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if "help" not in f.metadata or (not f.metadata["positional"] and value == _default(f)):
            continue
        if f.metadata["positional"]:
            parts += [str(v) for v in (value if isinstance(value, list) else [value]) if v is not None]
        elif isinstance(value, bool):
            parts.append(_flag(f) if value else "--no-" + _flag(f)[2:])
        else:
            parts += [_flag(f), *map(str, value if isinstance(value, list) else [value])]
    return shlex.join(parts)


def from_namespace(cls, ns: argparse.Namespace, base: dict | None = None):
    """Build `cls` from parsed flags; flags left unset fall back to `base` (e.g. a YAML recipe), then defaults."""
    values = dict(base or {})
    for name, why in getattr(cls, "RETIRED", {}).items():
        if name in values or getattr(ns, RETIRED_DEST + name, None) is not None:
            raise UserError(f"{flag_name(name)} was removed: {why}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise UserError(f"--config: unknown keys {sorted(unknown)} for {cls.__name__}; known: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in values and "help" in f.metadata:
            values[f.name] = _recipe_value(f, hints[f.name], values[f.name])
    for name in names:
        v = getattr(ns, name, None)
        if v is not None:
            values[name] = v
    return cls(**values)


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _recipe_value(f: dataclasses.Field, tp, value):
    """A value read from a --config recipe, checked against its field's type (argparse checks the flags): numbers
    become strings for string options (`limit: 200`), a single string becomes a one-item list."""
    base = _base_type(tp)
    if value is None:
        if type(None) in typing.get_args(tp):
            return None
        raise UserError(f"--config: {f.name} needs a value ({_TYPE_NAMES.get(base, 'a value')}), got nothing")
    if _is_list(tp):
        items = value if isinstance(value, list) else [value]
        return [_scalar(f, base, v) for v in items]
    return _scalar(f, base, value)


_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")  # YAML 1.1 reads `lr: 1e-4` as a string


def _scalar(f: dataclasses.Field, base, value):
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    text = isinstance(value, str) and value.strip()
    if base is bool and isinstance(value, bool) or base is int and numeric and isinstance(value, int):
        out = value
    elif base is int and text and _INT.fullmatch(text):
        out = int(text)
    elif base is float and (numeric or text and _FLOAT.fullmatch(text)):
        out = float(value)
    elif base is str and (isinstance(value, str) or numeric):
        out = str(value)
    else:
        raise UserError(f"--config: {f.name} must be {_TYPE_NAMES.get(base, base)}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and out not in choices:
        raise UserError(f"--config: {f.name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return out


def load_yaml_defaults(path: str | None) -> dict:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path}: no such recipe file")
    try:
        text = p.read_text()
    except UnicodeDecodeError as err:
        raise UserError(f"--config {path} is not a text file (a YAML recipe of option: value lines)") from err
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise UserError(f"--config {path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(data, dict):
        raise UserError(f"--config {path} must hold a mapping of option: value, not a {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise UserError(f"--config {path}: keys must be option names, got {bad[0]!r}")
    return {k.replace("-", "_"): v for k, v in data.items()}
