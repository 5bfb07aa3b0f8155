"""Distillation losses as small functions, computed in fp32 and in chunks of target tokens.

Shapes: N target tokens, V vocabulary, D hidden. p = teacher distribution, q = student distribution.
- forward KL(p || q) = sum_v p (log p - log q)        (the paper's loss, temperature 1)
- reverse KL(q || p) = sum_v q (log q - log p)
- JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
All three are `_divergence`. Forward KL runs it inside one custom autograd function (backward q - p in one
pass), eagerly or through torch.compile (the same function compiled; one compile per process, eager with one
warning where compiling fails). With temperature tau both logits are divided by tau and the loss is multiplied
by tau^2 (Hinton et al.), so gradients keep their scale across temperatures.

Normalisation: losses are averaged over target tokens (padding always excluded; prompt tokens excluded
when the data says so). The authors' trainer instead sums over every position of the batch, padding
included, and divides by the batch size (`kl_div(..., reduction="batchmean")`), which makes the scale
grow with sequence length. An all-masked batch gives 0, not NaN.

`chunked_loss` projects logits from hidden states `chunk` rows at a time. When all N x V logits would be large
(over `checkpoint_above` elements, 2^27 = 512 MB in fp32 by default) each chunk is also checkpointed, so
backward recomputes it instead of storing it; below that the graph is kept: recomputing lm_head would add to
every step's time to save memory that is not short.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import _StopRecomputationError, checkpoint

KINDS = ("forward", "reverse", "jsd")


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward",
             temperature: float = 1.0, beta: float = 0.5, compiled: bool = False) -> torch.Tensor:
    """Per-token divergence [N] between [N, V] logits (fp32 inside). compiled=True runs forward KL through
    torch.compile; other kinds ignore it."""
    if kind == "forward":
        fast = compiled and not _COMPILED["failed"]
        return (_compiled_forward_kl if fast else _forward_kl)(student_logits, teacher_logits, temperature)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if kind == "reverse":
        out = _divergence(s, t)[0]
    elif kind == "jsd":
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), 0)
        out = beta * _divergence(t, m)[0] + (1 - beta) * _divergence(s, m)[0]
    else:
        raise ValueError(f"loss kind must be one of {KINDS}, got {kind!r} (--loss)")
    return out * temperature**2


def _divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_v p (log p - log q) [N], and p [N, V], from log-probs [N, V]. 0 log 0 = 0: a top-k teacher is -inf
    off its support, clamped so that p = 0 there multiplies a finite number."""
    log_p = log_p.clamp_min(-1e30)
    p = log_p.exp()
    return torch.linalg.vecdot(p, log_p.sub_(log_q)), p


class _ForwardKL(torch.autograd.Function):
    """Per-token KL(p || softmax(z)) [N] from student logits z [N, V] and teacher log-probs [N, V].

    Plain autograd keeps five [N, V] intermediates and runs as many elementwise passes; here the forward keeps
    log q and p and the backward is one pass, dKL/dz = q - p."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        log_q = F.log_softmax(z, dim=-1, dtype=torch.promote_types(z.dtype, torch.float32))
        kl, p = _divergence(log_p.to(log_q.dtype), log_q)
        ctx.save_for_backward(log_q, p)
        ctx.in_dtype = z.dtype
        return kl

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        log_q, p = ctx.saved_tensors
        return log_q.exp().sub_(p).mul_(grad.unsqueeze(-1)).to(ctx.in_dtype), None


def _forward_kl(z: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Forward KL [N] from student logits z and teacher logits t [N, V]; what torch.compile compiles."""
    log_p = F.log_softmax(t.float() / temperature, dim=-1)
    scaled = z if temperature == 1.0 else z / temperature
    return _ForwardKL.apply(scaled, log_p) * temperature**2


_COMPILED = {"fn": None, "failed": False}  # one compile per process; after a failure, eager for good


def _compiled_forward_kl(z: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    if _COMPILED["fn"] is None:
        _COMPILED["fn"] = torch.compile(_forward_kl, dynamic=True)
    try:
        return _COMPILED["fn"](z, t, temperature)
    except _StopRecomputationError:  # checkpoint ending a chunk's recompute early: its signal, not a failure
        raise
    except Exception as e:  # the inductor backend raises many kinds (missing compiler, unsupported device)
        _COMPILED["failed"] = True
        warnings.warn(f"torch.compile of the KD loss failed ({type(e).__name__}: {str(e)[:200]}); "
                      "using the eager loss (pass --no-compile-loss to skip the attempt)")
        return _forward_kl(z, t, temperature)


def token_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [N] of [N, V] logits against [N] labels."""
    return F.cross_entropy(student_logits.float(), labels, reduction="none")


def _chunk_terms(s_h, t_logits, labels, head_w, head_b, kind, temperature, kl_w, ce_w, compiled=False):
    s_logits = F.linear(s_h, head_w, head_b)
    loss = (kl_w * token_kl(s_logits, t_logits, kind, temperature, compiled=compiled) if kl_w
            else s_logits.new_zeros(len(s_h), dtype=torch.float32))
    if ce_w:
        loss = loss + ce_w * token_ce(s_logits, labels)
    return loss.sum()


def chunked_loss(student_hidden: torch.Tensor, head: torch.nn.Linear, teacher_logits_fn, labels: torch.Tensor,
                 kind: str = "forward", temperature: float = 1.0, kl_weight: float = 1.0, ce_weight: float = 0.0,
                 chunk: int = 1024, checkpoint_above: int = 2**27, compiled: bool = False) -> tuple[torch.Tensor, int]:
    """Sum of kl_weight*KL + ce_weight*CE over N target rows, and N.

    student_hidden [N, D] are the student's final hidden states at target positions (after the final norm);
    `teacher_logits_fn(lo, hi)` returns the teacher's [hi-lo, V] logits for those rows (computed on demand so
    only one chunk of teacher logits exists at a time); labels [N] are the next tokens.
    """
    n = student_hidden.shape[0]
    total = student_hidden.float().sum() * 0.0  # zero with a graph, so an all-masked batch still backprops
    recompute = torch.is_grad_enabled() and student_hidden.requires_grad and n * head.weight.shape[0] > checkpoint_above
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        t_logits = teacher_logits_fn(lo, hi) if kl_weight else None
        args = (student_hidden[lo:hi], t_logits, labels[lo:hi], head.weight, head.bias, kind, temperature,
                kl_weight, ce_weight, compiled)
        if recompute:
            total = total + checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            total = total + _chunk_terms(*args)
    return total, n


def masked_mean(total: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """total / count, and 0 (with a graph) when nothing was a target."""
    count = int(count)
    return total / count if count > 0 else total * 0.0
