"""Fidelity to the teacher on held-out data: perplexity, per-token KL(teacher || student), top-1 agreement.

All models see the same batches; the teacher runs once per batch and its logits are shared. Only target
tokens count (assistant tokens for chat, every token for plain text). Full-vocabulary logits exist for at
most `chunk` target rows at a time.

With `kv_cache` (a `kvcache.KVCacheSpec`) the models are measured decode-style: fed one token at a time through
that cache, so every position reads its keys and values from it, as in generation (the teacher keeps its full
forward). Each model's result then also says what its live cache held after the first batch (`kv_cache`).

Notation: B batch, T block length, N target tokens in a batch, V vocabulary.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..losses import token_kl
from .kvcache import KVCacheSpec, bytes_summary, decode_hidden


def final_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Final normed hidden states [B, T, D] of any HF causal LM (without computing logits)."""
    base = getattr(model, model.base_model_prefix)
    return base(input_ids=input_ids, use_cache=False).last_hidden_state


def _targets(batch: dict, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = batch["input_ids"].to(device)
    sel = batch["loss_mask"][:, 1:].to(device)  # token t+1 is the target of position t
    return ids, sel, ids[:, 1:][sel]  # [B, T], [B, T-1], [N]


@torch.no_grad()
def fidelity(models: dict, teacher, batches: list[dict], chunk: int = 1024, desc: str = "fidelity",
             kv_cache: KVCacheSpec | None = None, progress: bool = True) -> dict:
    """{name: {"nll", "ppl", "tokens", and vs the teacher "kl", "top1_agreement"}}; the teacher is included.
    With teacher=None only perplexities are computed (kl / top1_agreement are None). With `kv_cache` the models
    (not the teacher) decode through it, and their results gain "kv_cache" (`kvcache.bytes_summary`). `progress`
    False hides the bar (a run's --no-progress)."""
    ref = teacher if teacher is not None else next(iter(models.values()))
    device = next(ref.parameters()).device
    names = ("teacher", *models) if teacher is not None else tuple(models)
    stats = {name: {"nll": 0.0, "kl": 0.0, "agree": 0, "tokens": 0} for name in names}
    caches = {}
    for batch in tqdm(batches, desc=desc, leave=False, disable=not progress):
        ids, sel, labels = _targets(batch, device)
        t_h = final_hidden(teacher, ids)[:, :-1][sel] if teacher is not None else None  # [N, D]
        hidden = {}
        for name, m in models.items():
            if kv_cache is None:
                hidden[name] = final_hidden(m, ids)[:, :-1][sel]
            else:
                h, cache = decode_hidden(m, ids, kv_cache)  # [B, T, D]
                hidden[name] = h[:, :-1][sel]
                caches.setdefault(name, bytes_summary(cache, ids.shape[0]))  # the first batch: --batch-size rows
        for lo in range(0, labels.numel(), chunk):
            hi = min(labels.numel(), lo + chunk)
            y = labels[lo:hi]
            t_logits = None
            if teacher is not None:
                t_logits = teacher.get_output_embeddings()(t_h[lo:hi]).float()
                _accumulate(stats["teacher"], t_logits, t_logits, y)
            for name, h in hidden.items():
                s_logits = models[name].get_output_embeddings()(h[lo:hi]).float()
                _accumulate(stats[name], s_logits, t_logits, y)
    out = {name: _finish(s) for name, s in stats.items()}
    for name, summary in caches.items():
        out[name]["kv_cache"] = {"spec": kv_cache.text, **summary}
    return out


def _accumulate(s: dict, logits: torch.Tensor, t_logits: torch.Tensor | None, y: torch.Tensor) -> None:
    s["nll"] += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    s["tokens"] += int(y.numel())
    if t_logits is None:
        s["kl"] = s["agree"] = None
        return
    s["kl"] += float(token_kl(logits, t_logits, "forward").sum())
    s["agree"] += int((logits.argmax(-1) == t_logits.argmax(-1)).sum())


def _finish(s: dict) -> dict:
    n = max(s["tokens"], 1)
    return {"nll": s["nll"] / n, "ppl": math.exp(s["nll"] / n), "kl": None if s["kl"] is None else s["kl"] / n,
            "top1_agreement": None if s["agree"] is None else s["agree"] / n, "tokens": s["tokens"]}
