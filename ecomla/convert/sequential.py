"""Sequential calibration: convert layer by layer, each fitted on the inputs the converted layers below produce.

    tensors, reports = fit_sequentially(teacher, student, batches, fit_qkv, choice)

`teacher` is the source as an all-GQA EcoMLAForCausalLM, `student` the converted model (both float32, same
config but for `mla_layers`). Both run side by side over the calibration batches, one decoder layer at a time,
keeping every sequence's residual stream (h_t, h_s [B, T, D]); with `FitChoice.sequential` off (one-shot, the
default) the student's stream is the teacher's at every layer. At each MLA layer:
1. moments of the normed attention inputs: {"cov": C_ss = E[x_s x_s^T], "cov_ts": C_ts = E[x_t x_s^T],
   "mean": E[x_s]} (and the teacher's attention output y_t); with `FitChoice.attention_metric`, also what the
   teacher's attention does with the inputs ("att_k", "att_v", `attention_moments`);
2. `fit_qkv(layer, moments, alpha)` returns the layer's new Q/K/V tensors (factor.py with fit.input_map), loaded
   into the student; with several key weights alpha, the one with the smallest error after step 3 is kept;
3. o_proj is refitted by ridge least squares on the student's per-head attention outputs z_s: towards y_t
   ('output') or towards y_t + h_t - h_s ('residual': the stream after attention, so the layer also cancels
   the error that arrived from below);
4. both streams advance through the layer's MLP.
Kept GQA layers are copied from the source and just advance.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..mla import EcoMLAForCausalLM
from ..mla.attention import GQAAttention, MLAAttention, build_mask
from .fit import ridge_solve
from .inits import FitChoice

# o_proj is refitted only with at least this many calibration tokens per input (H*d_v); with fewer the least-squares
# problem is close to underdetermined and the refit fits noise.
MIN_TOKENS_PER_INPUT = 8


def _load(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    for name, t in tensors.items():
        params[name].data.copy_(t.to(params[name].dtype))


@torch.no_grad()
def fit_sequentially(teacher: EcoMLAForCausalLM, student: EcoMLAForCausalLM, batches: list[torch.Tensor],
                     fit_qkv: Callable[[int, dict[str, torch.Tensor], float], dict[str, torch.Tensor]],
                     choice: FitChoice) -> tuple[dict[int, dict[str, torch.Tensor]], list[dict]]:
    """New attention tensors {layer: {name relative to self_attn: float64 tensor}} and a report per MLA layer."""
    B, T = batches[0].shape
    pos = [torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1) for ids in batches]
    ropes_t = [teacher.model.rotary(p, torch.float32) for p in pos]
    ropes_s = [student.model.rotary(p, torch.float32) for p in pos]
    h_t = [teacher.model.embed_tokens(ids) for ids in batches]  # [B, T, D] each
    h_s = [h.clone() for h in h_t]
    out, reports = {}, []
    layers = list(zip(teacher.model.layers, student.model.layers))
    for i, (t_layer, s_layer) in enumerate(tqdm(layers, desc="fitting layers", leave=False)):
        mask = build_mask(None, T, 0, student.config.layer_window(i), h_t[0].device)
        t_attn = lambda k: t_layer.self_attn(t_layer.input_layernorm(h_t[k]), rope=ropes_t[k][i],  # noqa: E731
                                              attention_mask=mask)
        y_t = [t_attn(k) for k in range(len(batches))]  # teacher attention outputs [B, T, D]
        attn = s_layer.self_attn
        if isinstance(attn, MLAAttention):
            x_s = [s_layer.input_layernorm(h) for h in h_s]
            x_t = [t_layer.input_layernorm(h) for h in h_t]
            moments = _moments(x_s, x_t)
            if choice.attention_metric != "none":
                moments |= attention_moments(t_layer.self_attn, x_t, x_s, [r[i] for r in ropes_t], mask)
            targets = [y + (ht - hs) if choice.o_target == "residual" else y for y, ht, hs in zip(y_t, h_t, h_s)]
            best = None
            for alpha in choice.key_weights:  # the key weight whose attention output is closest to the target
                tensors = fit_qkv(i, moments, alpha)
                _load(attn, tensors)
                z = _o_proj_inputs(attn, x_s, [r[i] for r in ropes_s], mask)
                o_w, o_b, err = refit_o(attn.o_proj, z, targets, choice)
                if best is None or err["o_error_after"] < best[0]["o_error_after"]:
                    o = {"o_proj.weight": o_w} | ({"o_proj.bias": o_b} if o_b is not None else {})
                    best = err, alpha, {**tensors, **o}, z
            err, alpha, tensors, z = best
            _load(attn, tensors)
            out[i] = tensors
            reports.append({"layer": i, "key_weight": alpha, **err})
            y_s = [attn.o_proj(zk).reshape(h_s[k].shape) for k, zk in enumerate(z)] if choice.sequential else None
        elif choice.sequential:
            y_s = [attn(s_layer.input_layernorm(h_s[k]), rope=ropes_s[k][i], attention_mask=mask)
                   for k in range(len(batches))]
        for k in range(len(batches)):
            h_t[k] = h_t[k] + y_t[k]
            h_t[k] = h_t[k] + t_layer.mlp(t_layer.post_attention_layernorm(h_t[k]))
            if choice.sequential:
                h_s[k] = h_s[k] + y_s[k]
                h_s[k] = h_s[k] + s_layer.mlp(s_layer.post_attention_layernorm(h_s[k]))
            else:  # one-shot: every layer is fitted on the teacher's inputs
                h_s[k] = h_t[k]
    return out, reports


def _moments(x_s: list[torch.Tensor], x_t: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """{"cov": E[x_s x_s^T], "cov_ts": E[x_t x_s^T], "mean": E[x_s]} over all tokens, float64."""
    D = x_s[0].shape[-1]
    c_ss = torch.zeros(D, D, dtype=torch.float64)
    c_ts = torch.zeros(D, D, dtype=torch.float64)
    mu = torch.zeros(D, dtype=torch.float64)
    n = 0
    for xs, xt in zip(x_s, x_t):
        xs, xt = xs.reshape(-1, D).double(), xt.reshape(-1, D).double()
        c_ss += xs.T @ xs
        c_ts += xt.T @ xs
        mu += xs.sum(0)
        n += xs.shape[0]
    return {"cov": c_ss / n, "cov_ts": c_ts / n, "mean": mu / n}


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


def _o_proj_inputs(attn: MLAAttention, x_s: list[torch.Tensor], ropes, mask) -> list[torch.Tensor]:
    """The per-head attention outputs z_s [B*T, H*d_v] that o_proj reads, one per batch."""
    z = []
    hook = attn.o_proj.register_forward_pre_hook(lambda _m, args: z.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        for x, rope in zip(x_s, ropes):
            attn(x, rope=rope, attention_mask=mask, mla_path="decompressed")
    finally:
        hook.remove()
    return z


def refit_o(o_proj: torch.nn.Linear, z: list[torch.Tensor], targets: list[torch.Tensor], choice: FitChoice):
    """o_proj by ridge least squares (pulled towards the current o_proj): z_s [N, H*d_v] -> target [N, D] (module
    docstring, step 3); returns the weight, the bias (or None) and the relative errors before and after (equal
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
