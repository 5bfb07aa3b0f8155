"""What stage 1 needs from FSDP2 (accelerate's `fsdp_version: 2`): the config it accepts, where the frozen models
live, and how to run the sharded student outside its training forward.

    accelerate launch --config_file recipes/accelerate/fsdp-8gpu.yaml -m ecomla distill STUDENT --config RECIPE

- `check_sharding`: refuses, in one line and before any model loads, a setup this trainer cannot run: FSDP1, a
  decoder layer that is not its own unit, layer-wise alignment without MLAAttention as its own unit (ILD calls
  each MLA attention directly, outside its decoder layer's forward), FSDP asked for on CPU processes (accelerate
  1.16 keeps FSDP for GPU-type devices and would train them as plain data parallel), and DeepSpeed (accelerate
  runs its engine's optimizer step inside `backward`, on every micro-batch: this trainer accumulates micro-batches
  itself and sets each step's learning rate after the backward passes).
- The frozen teacher (and the ILD source) follow one rule, `shard_frozen`: under FSDP, when every process runs
  it at every step (a live teacher, the ILD source), each of its decoder layers is sharded like the student's and
  gathered only while it runs; its embeddings, final norm and head stay whole on every process (the head is
  applied chunk by chunk outside the model's forward). Otherwise (DDP, DeepSpeed, one process, and the
  `--teacher-topk` cache that the main process fills alone) it is replicated whole on every device.
- `gathered`: the student's parameters outside its decoder layers (embeddings, final norm, head) gathered, so a
  forward that does not go through the training objective (the held-out check, run by every process in step)
  can read them.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import accelerate
from accelerate.utils import DistributedType
from torch.distributed.fsdp import fully_shard

from ..common import UserError

RECIPE = "recipes/accelerate/fsdp-8gpu.yaml"


def sharded(acc) -> bool:
    return acc.distributed_type == DistributedType.FSDP


def check_sharding(acc, runs_ild: bool) -> None:
    """One line naming what to change, for a sharded setup stage 1 cannot run; DDP and one process pass."""
    if acc.distributed_type == DistributedType.DEEPSPEED:  # accelerate's DeepSpeed steps inside backward()
        raise UserError("accelerate config: DeepSpeed is not supported by ecomla distill (its engine steps the "
                        "optimizer inside backward, every micro-batch, before the step's learning rate is set); "
                        f"use {RECIPE}")
    if not sharded(acc):
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            raise UserError(f"accelerate config: FSDP runs on GPUs only (accelerate {accelerate.__version__} trains "
                            "CPU processes as plain data parallel); use recipes/accelerate/cpu-2proc.yaml on CPUs")
        return
    plugin = acc.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise UserError(f"accelerate config: set fsdp_version: 2 (FSDP1 is not supported; {RECIPE})")
    wrapped = set(plugin.transformer_cls_names_to_wrap or [])
    if "EcoMLADecoderLayer" not in wrapped:
        raise UserError("accelerate config: fsdp_transformer_layer_cls_to_wrap must name EcoMLADecoderLayer "
                        f"(fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP; {RECIPE})")
    if runs_ild and "MLAAttention" not in wrapped:
        raise UserError("--stage: layer-wise alignment under FSDP calls each MLAAttention on its own; add "
                        f"MLAAttention to fsdp_transformer_layer_cls_to_wrap ({RECIPE}) or pass --stage kd")


def shard_frozen(model, acc, shard: bool):
    """MODEL placed by the rule above: its decoder layers sharded (FSDP2, `shard`), else whole on acc.device."""
    if not (shard and sharded(acc)):
        return model.to(acc.device)
    base = getattr(model, model.base_model_prefix)
    for layer in base.layers:  # same device mesh as the student (accelerate's default: every process)
        fully_shard(layer, reshard_after_forward=True)
    return model.to(acc.device)  # what stays whole: embeddings, norms, head, rotary buffers


@contextmanager
def gathered(prepared, acc):
    """Inside: the root FSDP unit's parameters (everything outside the wrapped layers) unsharded."""
    if not sharded(acc):
        yield
        return
    prepared.unshard()
    try:
        yield
    finally:
        prepared.reshard()
