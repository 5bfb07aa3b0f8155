"""Dataclass arguments that are also the command line: each field's `help` is its `--help` text.

    @dataclass
    class ConvertArgs:
        src: str = arg("folder, hub id or 'default'", positional=True)
        kv_rank: int | None = arg("latent rank r_kv", default=None)

`add_dataclass_args(parser, ConvertArgs)` adds `SRC` and `--kv-rank`; `from_namespace` builds the
dataclass (running its `__post_init__` validation). `load_yaml_defaults` lets a recipe YAML supply
values that command-line flags then override. `command_line("convert", args)` is the way back: the exact
`ecomla convert ...` command that builds `args`.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import types
import typing
from pathlib import Path

import yaml

from .common import UserError

MISSING = dataclasses.MISSING


def arg(help: str, *, default=MISSING, positional: bool = False, choices=None, nargs=None, flag: str | None = None):
    meta = {"help": help, "positional": positional, "choices": choices, "nargs": nargs, "flag": flag}
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


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta:
            continue
        tp = _base_type(hints[f.name])
        default = _default(f)
        kw = {"help": meta["help"]}
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        if meta.get("nargs"):
            kw["nargs"] = meta["nargs"]
        if meta["positional"]:
            parser.add_argument(f.name, metavar=f.name.upper(), type=tp, **kw)
            continue
        flag = _flag(f)
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, **kw)
        else:
            kw["help"] += f" (default: {default})"
            parser.add_argument(flag, dest=f.name, type=tp, default=None, **kw)


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
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise UserError(f"unknown keys {sorted(unknown)} for {cls.__name__}; known: {sorted(names)}")
    for name in names:
        v = getattr(ns, name, None)
        if v is not None:
            values[name] = v
    return cls(**values)


def load_yaml_defaults(path: str | None) -> dict:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no such recipe file: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in data.items()}
