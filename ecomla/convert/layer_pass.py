"""The fitted init's pass over calibration data: teacher and student side by side, one decoder layer at a time.

    for layer in layer_pass(teacher, student, batches, choice):
        layer.moments       # the layer's input moments, and what the teacher's attention does with them
        layer.load(tensors)  # the layer's fitted tensors, into the student (fitted.py), before the pass moves on

`teacher` is the source as an all-GQA EcoMLAForCausalLM, `student` the converted model (both float32); each keeps
every sequence's residual stream (h_t, h_s [B, T, D]), advanced through a layer once the caller has loaded it.
One-shot calibration (the default): h_s = h_t at every layer; `FitChoice.sequential`: the student's stream runs
through the converted layers below. `refit_o`: ridge least squares on the student's per-head attention outputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..mla import EcoMLAForCausalLM
from ..mla.attention import GQAAttention, MLAAttention, build_mask
from .fit import ridge_solve
from .inits import FitChoice

# o_proj is refitted only with at least this many calibration tokens per input (H*d_v); with fewer the least-squares
# problem is close to underdetermined and the refit fits noise.
MIN_TOKENS_PER_INPUT = 8


@dataclass
class LayerInputs:
    """One MLA layer as the pass reaches it (lists: one entry per calibration batch)."""

    index: int
    moments: dict[str, torch.Tensor]  # of its inputs (`_moments`), and what the teacher's attention does with them
    #                                   (`attention_moments`) unless FitChoice.attention_metric is 'none'
    attn: MLAAttention  # the student's layer, which the fitted tensors are loaded into
    x_s: list[torch.Tensor]  # the student's normed attention inputs [B, T, D]
    targets: list[torch.Tensor]  # what o_proj is refitted towards [B, T, D] (FitChoice.o_target)
    ropes: list  # the student's (cos, sin) at this layer
    mask: torch.Tensor | None

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        params = dict(self.attn.named_parameters())
        for name, t in tensors.items():
            params[name].data.copy_(t.to(params[name].dtype))

    def refit_o(self, choice: FitChoice) -> tuple[dict[str, torch.Tensor], dict]:
        """o_proj refitted on the per-head attention outputs z_s [B*T, H*d_v] of the tensors loaded so far
        (`refit_o`): its tensors by name, and the errors before and after."""
        z = []
        hook = self.attn.o_proj.register_forward_pre_hook(lambda _m, a: z.append(a[0].reshape(-1, a[0].shape[-1])))
        try:
            for x, rope in zip(self.x_s, self.ropes):
                self.attn(x, rope=rope, attention_mask=self.mask, mla_path="decompressed")
        finally:
            hook.remove()
        w, b, row = refit_o(self.attn.o_proj, z, self.targets, choice)
        return {"o_proj.weight": w} | ({"o_proj.bias": b} if b is not None else {}), row


@torch.no_grad()
def layer_pass(teacher: EcoMLAForCausalLM, student: EcoMLAForCausalLM, batches: list[torch.Tensor],
               choice: FitChoice) -> Iterator[LayerInputs]:
    """Hand over each MLA layer's inputs in turn (module docstring); the caller loads the layer before resuming."""
    T = batches[0].shape[1]
    pos = [torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1) for ids in batches]
    ropes_t = [teacher.model.rotary(p, torch.float32) for p in pos]
    ropes_s = [student.model.rotary(p, torch.float32) for p in pos]
    h_t = [teacher.model.embed_tokens(ids) for ids in batches]  # [B, T, D] each
    h_s = [h.clone() for h in h_t]
    layers = list(zip(teacher.model.layers, student.model.layers))
    for i, (t_layer, s_layer) in enumerate(tqdm(layers, desc="fitting layers", leave=False)):
        mask = build_mask(None, T, 0, student.config.layer_window(i), h_t[0].device)
        y_t = [t_layer.self_attn(t_layer.input_layernorm(h), rope=r[i], attention_mask=mask)
               for h, r in zip(h_t, ropes_t)]  # teacher attention outputs [B, T, D]
        attn = s_layer.self_attn
        if isinstance(attn, MLAAttention):
            x_s, x_t = [s_layer.input_layernorm(h) for h in h_s], [t_layer.input_layernorm(h) for h in h_t]
            moments = _moments(x_s, x_t if choice.sequential else None)
            if choice.attention_metric != "none":
                moments |= attention_moments(t_layer.self_attn, x_t, x_s, [r[i] for r in ropes_t], mask)
            targets = [y + (a - b) if choice.o_target == "residual" else y for y, a, b in zip(y_t, h_t, h_s)]
            yield LayerInputs(i, moments, attn, x_s, targets, [r[i] for r in ropes_s], mask)
        for k in range(len(batches)):
            if choice.sequential:
                y_s = attn(s_layer.input_layernorm(h_s[k]), rope=ropes_s[k][i], attention_mask=mask)
            h_t[k] = h_t[k] + y_t[k]
            h_t[k] = h_t[k] + t_layer.mlp(t_layer.post_attention_layernorm(h_t[k]))
            if choice.sequential:
                h_s[k] = h_s[k] + y_s
                h_s[k] = h_s[k] + s_layer.mlp(s_layer.post_attention_layernorm(h_s[k]))
            else:  # one-shot: every layer is fitted on the teacher's inputs
                h_s[k] = h_t[k]


def _moments(x_s: list[torch.Tensor], x_t: list[torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """{"cov": E[x_s x_s^T], "mean": E[x_s]} over all tokens, float64, and with x_t (sequential calibration)
    "cov_ts": E[x_t x_s^T]."""
    D = x_s[0].shape[-1]
    c_ss, c_ts = torch.zeros(D, D, dtype=torch.float64), torch.zeros(D, D, dtype=torch.float64)
    mu = torch.zeros(D, dtype=torch.float64)
    n = 0
    for k, xs in enumerate(x_s):
        xs = xs.reshape(-1, D).double()
        c_ss += xs.T @ xs
        if x_t is not None:
            c_ts += x_t[k].reshape(-1, D).double().T @ xs
        mu += xs.sum(0)
        n += xs.shape[0]
    return {"cov": c_ss / n, "mean": mu / n} | ({"cov_ts": c_ts / n} if x_t is not None else {})


def attention_moments(attn: GQAAttention, x_t: list[torch.Tensor], x_s: list[torch.Tensor], ropes,
                      mask) -> dict[str, torch.Tensor]:
    """What the teacher's attention does with a layer's inputs, per KV group g (averaged over its query heads h,
    p^h_ij the teacher's attention of query i to key j, computed on x_t; x the student's inputs x_s):
      "att_v" [G, D, D] = E_i[xbar_i xbar_i^T], xbar_i = sum_j p_ij x_j: a value error E moves head h's output by
                          E xbar_i, so values are judged on the mixtures attention forms, not on single tokens;
      "att_k" [G, D, D] = E_i[sum_j p_ij (x_j - xbar_i)(x_j - xbar_i)^T]: a key error e_j moves query i's
                          output by about sum_j p_ij (e_j - sum_j' p_ij' e_j') v_j, so keys are judged by the
                          attention they receive, less the part shared by all keys of a query (softmax drops it).
    """
    H, G = attn.num_heads, attn.num_kv_heads
    D = x_s[0].shape[-1]
    recv = torch.zeros(G, D, D, dtype=torch.float64)
    mix = torch.zeros(G, D, D, dtype=torch.float64)
    n = 0
    for xt, xs, rope in zip(x_t, x_s, ropes):
        B, T, _ = xt.shape
        p = attn.probabilities(xt, rope, mask).view(B, G, H // G, T, T)  # products in the model's dtype, sums in fp64
        x = xs.to(p.dtype)
        ptp = (p.transpose(-1, -2) @ p).mean(2)  # [B, G, T, T]: sum_i xbar_i xbar_i^T = X^T (P^T P) X, per head
        got = p.sum(-2).mean(2)  # [B, G, T]: attention each key receives
        flat = x.reshape(-1, D)
        for g in range(G):
            recv[g] += ((flat * got[:, g].reshape(-1, 1)).T @ flat).double()
            mix[g] += (flat.T @ (ptp[:, g] @ x).reshape(-1, D)).double()
        n += B * T
    mix = (mix + mix.transpose(1, 2)) / 2
    return {"att_k": (recv - mix) / n, "att_v": mix / n}


def refit_o(o_proj: torch.nn.Linear, z: list[torch.Tensor], targets: list[torch.Tensor], choice: FitChoice):
    """o_proj by ridge least squares (pulled towards the current o_proj): z_s [N, H*d_v] -> target [N, D] (module
    docstring); returns the weight, the bias (or None) and the relative errors before and after (equal
    with o_target 'none')."""
    D = o_proj.weight.shape[0]
    has_bias = o_proj.bias is not None
    width = z[0].shape[-1] + has_bias
    gram = torch.zeros(width, width, dtype=torch.float64)
    cross = torch.zeros(width, D, dtype=torch.float64)
    norm, n = 0.0, 0
    for zk, tgt in zip(z, targets):
        tgt = tgt.reshape(-1, D).double()
        zk = zk.double()
        if has_bias:
            zk = torch.cat([zk, torch.ones(zk.shape[0], 1, dtype=zk.dtype)], dim=1)
        gram += zk.T @ zk
        cross += zk.T @ tgt
        norm += float((tgt**2).sum())
        n += zk.shape[0]
    w_old = o_proj.weight.double().T
    if has_bias:
        w_old = torch.cat([w_old, o_proj.bias.double()[None]])
    target = choice.o_target
    if target != "none" and n < MIN_TOKENS_PER_INPUT * width:  # too few tokens: the refit would fit noise
        target = f"none ({n} calibration tokens < {MIN_TOKENS_PER_INPUT} x {width} inputs; raise --calib-seqs)"
    sol = ridge_solve(gram, cross, choice.ridge, prior=w_old) if target == choice.o_target != "none" else w_old
    # sum ||z w - t||^2 from the moments: tr(w^T G w) - 2 tr(w^T C) + sum ||t||^2
    err = lambda w: max(float((w * (gram @ w)).sum() - 2 * (w * cross).sum()) + norm, 0.0)  # noqa: E731
    row = {"o_target": target, "o_error_before": (err(w_old) / norm) ** 0.5, "o_error_after": (err(sol) / norm) ** 0.5}
    bias = sol[-1] if has_bias else None
    return sol[: width - has_bias].T.contiguous(), bias, row
