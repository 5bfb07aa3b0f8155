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

from dataclasses import dataclass
from typing import Callable

import torch

from ..common import UserError
from ..convert.convert import materialise
from ..io import check_model, load_model, recorded_source
from .shapes import mla_config, shape_config, synthetic_model


@dataclass
class Subject:
    label: str  # the `model` field of result rows
    system: str  # "mla" or "gqa"
    weights: str  # "checkpoint", "synthetic" or "source+random-mla"
    build: Callable[[], torch.nn.Module]
    config: object  # the config `build` makes a model of (positions and memory are checked against it first)


def subjects(args, dtype: torch.dtype, device: str) -> tuple[Subject, Subject]:
    """(MLA subject, GQA subject) for BenchArgs `args`."""
    if args.model is None:
        if args.shape is None:
            raise UserError("give MODEL (an MLA checkpoint, a GQA checkpoint or 'default') or --shape NAME")
        src = shape_config(args.shape)
        cfg = mla_config(src, args.kv_rank, args.rope_dim, args.q_rank)
        return (
            Subject(f"{args.shape} mla {args.kv_rank}+{args.rope_dim}", "mla", "synthetic",
                    lambda: synthetic_model(cfg, dtype, device, args.seed), cfg),
            Subject(f"{args.shape} gqa", "gqa", "synthetic", lambda: synthetic_model(src, dtype, device, args.seed),
                    src),
        )
    if args.shape is not None:
        raise UserError("give MODEL or --shape, not both")
    config, path = check_model(args.model)
    if config.model_type == "ecomla":
        baseline = args.baseline or recorded_source(path)
        if baseline is None:
            raise UserError(f"{path} has no ecomla_convert.json naming its source; pass --baseline SRC")
        base_config, _ = check_model(baseline)
        return (
            Subject(path, "mla", "checkpoint", lambda: load_model(path, dtype=dtype, device=device)[0], config),
            Subject(baseline, "gqa", "checkpoint", lambda: load_model(baseline, dtype=dtype, device=device)[0],
                    base_config),
        )
    if args.baseline is not None:
        raise UserError(f"{args.model} is a GQA checkpoint and is its own baseline; --baseline is for an MLA MODEL")
    cfg = mla_config(config, args.kv_rank, args.rope_dim, args.q_rank)
    return (
        Subject(f"{path} -> mla {args.kv_rank}+{args.rope_dim} (random MLA attention)", "mla",
                "source+random-mla", lambda: mla_from_source(path, cfg, dtype, device, args.seed), cfg),
        Subject(path, "gqa", "checkpoint", lambda: load_model(path, dtype=dtype, device=device)[0], config),
    )


def mla_from_source(path: str, config, dtype: torch.dtype, device: str, seed: int):
    """The source's embeddings/MLP/norms/o_proj with randomly initialised MLA attention (speed only)."""
    src, _ = load_model(path, dtype=dtype)
    sd = dict(src.state_dict())
    del src
    return materialise(config, sd, dtype, seed).to(device)
