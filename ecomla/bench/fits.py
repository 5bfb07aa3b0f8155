"""Whether every (context, batch) of a bench run can run at all, checked before any model is built.

A context past the model's positions, or a batch whose cache cannot fit in memory, would otherwise hang (filling
a cache of 100M tokens) or die inside torch after minutes. Memory is a lower bound: weights + the cache the run
reserves (context + warm-up + timed steps rows per sequence, at the cache bytes per token that `ecomla.mla`'s
shape accounting gives), against what is free now: `torch.cuda.mem_get_info` on CUDA, psutil's available memory
(else os.sysconf's available pages) on CPU. Activations and the decode preparation's folded weights come on top, so
a setting that passes may still run out of memory (bench reports that row as "oom"); one that fails cannot run.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM

from ..common import UserError
from ..mla.config import EcoMLAConfig, SourceShape

try:
    import psutil
except ImportError:  # optional: os.sysconf gives the same figure on Linux
    psutil = None


def cache_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes one token occupies in the cache, summed over layers: [c_kv | k_rope] (or its quantized row) for MLA
    layers, K and V for GQA."""
    if isinstance(config, EcoMLAConfig):
        return config.kv_bytes_per_token(dtype.itemsize)
    return SourceShape.of(config).kv_elements * dtype.itemsize


def weight_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of the model's unique parameters, counted on a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) * dtype.itemsize


def available_bytes(device: str) -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    if psutil is not None:
        return psutil.virtual_memory().available
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def check_positions(label: str, config, contexts: list[int]) -> None:
    """Every context must lie within the model's positions (the few decode steps after it may run past them, as the
    documented 8k runs of SmolLM2's 8192 positions do)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and max(contexts) > limit:
        raise UserError(f"--contexts {max(contexts)}: {label} has {limit} positions; use contexts <= {limit}")


def check_memory(label: str, config, contexts: list[int], batches: list[int], extra: int, dtype: torch.dtype,
                 device: str) -> None:
    """The largest batch at every context must fit: weights + batch * (context + extra) cache rows <= free memory."""
    weights, per_token = weight_bytes(config, dtype), cache_bytes_per_token(config, dtype)
    free = available_bytes(device)
    for ctx in contexts:
        per_sequence = per_token * (ctx + extra)
        fits = max(0, (free - weights) // per_sequence)
        if max(batches) > fits:
            need = weights + max(batches) * per_sequence
            hint = f"the largest batch that fits at that context is {fits}" if fits else "lower --contexts"
            raise UserError(f"--batches {max(batches)} at context {ctx}: {label} needs at least {_size(need)} "
                            f"({_size(weights)} of weights + {per_token} B/token of cache), {_size(free)} is free on "
                            f"{device}; {hint}")
