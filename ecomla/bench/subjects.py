"""What `ecomla bench` compares: an MLA model and its GQA source, each built on demand.

Only one model is in memory at a time (so peak memory and the max-batch search see one model).
MODEL may be
- an MLA checkpoint (`ecomla convert` output): the baseline is `--baseline` or the "source" recorded in
  its `ecomla_convert.json`;
- a GQA checkpoint or `default`: it is its own baseline, and the MLA model keeps its weights with random
  MLA attention of `--kv-rank/--rope-dim/--q-rank` (same shapes as a conversion, so the same speed);
- omitted, with `--shape NAME`: both models are synthetic (random weights of a preset shape).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..io import UserError, load_config, load_model
from .shapes import mla_config, mla_spec, shape_config, synthetic_model


@dataclass
class Subject:
    label: str  # the `model` field of result rows
    kind: str  # "mla" or "gqa"
    weights: str  # "checkpoint", "synthetic" or "source+random-mla"
    build: Callable[[], torch.nn.Module]


def recorded_source(path: str) -> str | None:
    meta = Path(path) / "ecomla_convert.json"
    if not meta.is_file():
        return None
    return json.loads(meta.read_text()).get("source")


def subjects(args, dtype: torch.dtype, device: str) -> tuple[Subject, Subject]:
    """(MLA subject, GQA subject) for BenchArgs `args`."""
    if args.model is None:
        if args.shape is None:
            raise UserError("give MODEL (an MLA checkpoint, a GQA checkpoint or 'default') or --shape NAME")
        src = shape_config(args.shape)
        spec = mla_spec(src, args.kv_rank, args.rope_dim, args.q_rank)
        cfg = mla_config(src, spec)
        return (
            Subject(f"{args.shape} mla {spec.kv_lora_rank}+{spec.qk_rope_head_dim}", "mla", "synthetic",
                    lambda: synthetic_model(cfg, dtype, device, args.seed)),
            Subject(f"{args.shape} gqa", "gqa", "synthetic", lambda: synthetic_model(src, dtype, device, args.seed)),
        )
    if args.shape is not None:
        raise UserError("give MODEL or --shape, not both")
    config, path = load_config(args.model)
    if config.model_type == "ecomla":
        baseline = args.baseline or recorded_source(path)
        if baseline is None:
            raise UserError(f"{path} has no ecomla_convert.json naming its source; pass --baseline SRC")
        return (
            Subject(path, "mla", "checkpoint", lambda: load_model(path, dtype=dtype, device=device)[0]),
            Subject(baseline, "gqa", "checkpoint", lambda: load_model(baseline, dtype=dtype, device=device)[0]),
        )
    if args.baseline is not None:
        raise UserError(f"{args.model} is a GQA checkpoint and is its own baseline; --baseline is for an MLA MODEL")
    spec = mla_spec(config, args.kv_rank, args.rope_dim, args.q_rank)
    cfg = mla_config(config, spec)
    return (
        Subject(f"{path} -> mla {spec.kv_lora_rank}+{spec.qk_rope_head_dim} (random MLA attention)", "mla",
                "source+random-mla", lambda: mla_from_source(path, cfg, dtype, device, args.seed)),
        Subject(path, "gqa", "checkpoint", lambda: load_model(path, dtype=dtype, device=device)[0]),
    )


def mla_from_source(path: str, config, dtype: torch.dtype, device: str, seed: int):
    """The source's embeddings/MLP/norms/o_proj with randomly initialised MLA attention (speed only)."""
    from ..convert.convert import materialise

    src, _ = load_model(path, dtype=dtype)
    sd = dict(src.state_dict())
    del src
    return materialise(config, sd, dtype, seed).to(device)
