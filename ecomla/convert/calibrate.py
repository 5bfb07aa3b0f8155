"""Calibration statistics for activation-aware conversion: per-layer second moment of the attention input.

    stats = layer_input_stats(source, tok, data="default", n_seqs=128, seq_len=256, seed=0)
    stats[i]["cov"]  # [D, D] = E[x x^T] of layer i's normed attention input (float64)

Sequences come from the *train* split of the shared chat split (ecomla.data.chat), never the held-out one.
Results are cached in $ECOMLA_CACHE/calibration/ keyed by source, data, size and seed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..common import cache_dir
from ..data.chat import load_chat, split_chat
from ..data.packing import PackedChat
from ..outputs import temp_path


def _cache_path(source_id: str, data: str, n_seqs: int, seq_len: int, seed: int) -> Path:
    key = json.dumps([source_id, data, n_seqs, seq_len, seed, "v1"])
    return cache_dir() / "calibration" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"


def calibration_batches(tok, data: str, n_seqs: int, seq_len: int, seed: int, batch_size: int = 8):
    train = split_chat(load_chat(data))["train"]
    packed = PackedChat(train, tok, seq_len, seed=seed + 7919, mask_prompt=False)  # a stream apart from training's
    return [packed.batch(k, min(batch_size, n_seqs - k))["input_ids"] for k in range(0, n_seqs, batch_size)]


@torch.no_grad()
def layer_input_stats(source, tok, source_id: str, data: str = "default", n_seqs: int = 128, seq_len: int = 256,
                      seed: int = 0, layers: list[int] | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """{layer: {"cov": E[x x^T] [D, D], "mean": E[x] [D], "tokens": n}} for the selected layers."""
    path = _cache_path(source_id, data, n_seqs, seq_len, seed)
    if path.is_file():
        stats = torch.load(path, weights_only=True)
        if layers is None or all(i in stats for i in layers):
            return stats
    blocks = getattr(source, source.base_model_prefix).layers
    layers = list(range(len(blocks))) if layers is None else layers
    D = source.config.hidden_size
    acc = {i: {"cov": torch.zeros(D, D, dtype=torch.float64), "mean": torch.zeros(D, dtype=torch.float64), "n": 0}
           for i in layers}

    def hook(i):
        def pre(_m, args, kwargs):
            x = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).reshape(-1, D).double()
            acc[i]["cov"] += x.T @ x
            acc[i]["mean"] += x.sum(0)
            acc[i]["n"] += x.shape[0]
        return pre

    handles = [blocks[i].self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i in layers]
    try:
        device = next(source.parameters()).device
        for ids in tqdm(calibration_batches(tok, data, n_seqs, seq_len, seed), desc="calibration", leave=False):
            getattr(source, source.base_model_prefix)(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    stats = {i: {"cov": a["cov"] / a["n"], "mean": a["mean"] / a["n"], "tokens": a["n"]} for i, a in acc.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    torch.save(stats, tmp)
    tmp.replace(path)
    return stats
