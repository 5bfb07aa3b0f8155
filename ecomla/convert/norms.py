"""Latent norms that start close to the norm-free layer: a latent basis with a steadier rms, and the gain.

    fit_latent_norms(args, config, new_sd, src_path, log)  # after any init, on the norm-free converted model

The tensor math (`steady_basis`, `mean_rms`) and the pass that records the latents on calibration tokens
(`fit_latent_norms`). A latent norm maps c -> g * c / rms(c) (per token), which equals c only when rms(c) = g for
every token. A fitted latent's rms varies from token to token (and the attention sink's latent is much smaller
than the rest), so a norm added after fitting rescales each token's keys and values differently.

The latent is defined only up to an invertible change of basis B: with c' = B c, W_down' = B W_down and
W_up' = W_up B^-1, the norm-free layer is unchanged. The norm is not: rms(B c)^2 = c^T B^T B c / r. So B is chosen
to make ||B c||^2 as steady as possible over calibration tokens (`steady_basis`: the variance of ||B c||^2 over its
mean, minimised by Adam from B = I), and then g = the mean of rms(B c), the scalar that minimises
E||B c - g B c / rms(B c)||^2 (`mean_rms`).

B's singular values are then normalised to a geometric mean of 1 and clipped to a condition number of at most
`max_condition`. Unclipped, the fit can shrink some directions a hundredfold or more; the down-projection rows it
scales that way are then so small that training's first Adam steps (which move every weight by about the learning
rate) overwhelm them. What the clip costs in steadiness, and what the unclipped basis did to training:
`benchmarks/latent_norm_basis.py`, docs/RESULTS.md section 9.

A basis cannot make the attention sink's latent (up to 10x smaller than the others') as large as the rest without
stretching the other tokens' share of its direction. So each latent gets the better of two fits (`fit_latent`),
judged by how close the normed up-projection's output stays to the norm-free one's on the calibration tokens: the
basis above, or a pad (`pad_latent`): the latent in a basis ordered by what the up-projection makes of each
direction, its least useful coordinate given up to a pad channel a^T x computed from the layer's input and fitted
by least squares so that ||c||^2 is about the same for every token, the sink included; the up-projection ignores
the pad. What it costs and gains: docs/notebook/LOG.md, 2026-12-07.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..io import load_tokenizer
from ..mla.config import EcoMLAConfig
from .args import ConvertArgs
from .calibrate import calibration_batches
from .layers import materialise, norm_free


# the share of the steadiness objective given to the first token of each calibration sequence: the attention sink,
# whose latent is up to 10x smaller than the others' in the default model's upper layers; a norm that scales it up
# to the others' rms breaks the sink (held-out chat KL 10.8 at 0 tokens against 1.24 norm-free, 4x; with this
# share: docs/notebook/LOG.md, 2026-12-07)
SINK_SHARE = 0.25


def sink_weights(sink: torch.Tensor) -> torch.Tensor:
    """Per-token weights [N] summing to 1, the tokens where `sink` [N] is True carrying SINK_SHARE of it."""
    n = int(sink.sum())
    if n in (0, len(sink)):
        return torch.full((len(sink),), 1.0 / len(sink), dtype=torch.float64)
    return torch.where(sink, SINK_SHARE / n, (1 - SINK_SHARE) / (len(sink) - n)).double()


def mean_rms(c: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    """Mean over tokens of rms(c_t), c [N, r], weighted by `weight` [N] if given."""
    rms = c.double().pow(2).mean(-1).sqrt()
    return float(rms.mean() if weight is None else (weight.double() * rms).sum() / weight.double().sum())


def steadiness(c: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    """Coefficient of variation of rms(c_t) over tokens, weighted by `weight` [N] if given (0 = a latent norm is a
    fixed rescaling)."""
    rms = c.double().pow(2).mean(-1).sqrt()
    if weight is None:
        return float(rms.std() / rms.mean())
    w = weight.double() / weight.double().sum()
    mean = (w * rms).sum()
    return float(((w * (rms - mean).pow(2)).sum()).sqrt() / mean)


def sink_start(c: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """B0 = I + (k - 1) u u^T [r, r]: the sinks' mean direction u stretched by k, the median rms of the other tokens
    over the sinks' mean rms (at least 1, at most the clip's 30), so the sinks start at the others' rms; Adam's small
    steps from I cannot stretch a direction tenfold."""
    s = c[sink].double()
    u = s.mean(0)
    u = u / u.norm()
    rms = c.double().pow(2).mean(-1).sqrt()
    k = float((rms[~sink].median() / rms[sink].mean()).clamp(1.0, 30.0))
    return torch.eye(c.shape[1], dtype=torch.float64) + (k - 1) * torch.outer(u, u)


def steady_basis(c: torch.Tensor, steps: int = 300, lr: float = 3e-3, max_condition: float = 30.0,
                 sink: torch.Tensor | None = None) -> torch.Tensor:
    """B [r, r] (float64) minimising Var(||B c_t||^2) / E[||B c_t||^2]^2 over the tokens c [N, r], with singular values
    of geometric mean 1 and condition number <= max_condition. With `sink` [N] (bool: the sequences' first tokens),
    the moments give the sinks SINK_SHARE of the weight and Adam starts from `sink_start`, else from I.
    Deterministic for given inputs; returns I when it does not make the (weighted) rms steadier."""
    weight = None if sink is None else sink_weights(sink)
    x = c.float()
    x = x / x.pow(2).sum(-1).mean().sqrt()  # scale-free: the objective is, the step size is not
    w = torch.ones(len(x)) if weight is None else weight.float()
    w = w / w.sum()
    start = torch.eye(x.shape[1]) if sink is None else sink_start(c, sink).float()
    B = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([B], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            q = (x @ B.T).pow(2).sum(-1)  # [N]
            loss = (w * (q / (w * q).sum() - 1).pow(2)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    u, sv, vh = torch.linalg.svd(B.detach().double())
    sv = sv / sv.log().mean().exp()
    sv = sv.clamp(max_condition**-0.5, max_condition**0.5)
    B = (u * sv) @ vh
    if steadiness(c.double() @ B.T, weight) >= steadiness(c, weight):
        return torch.eye(c.shape[1], dtype=torch.float64)
    return B


def pad_latent(c: torch.Tensor, x: torch.Tensor, w_up: torch.Tensor, weight: torch.Tensor,
               quantile: float = 0.99) -> tuple[torch.Tensor, torch.Tensor]:
    """(T [r, r], a [D]) (float64): the latent c [N, r] in the basis T c, whose coordinates are whitened and ordered by
    what the up-projection w_up [out, r] makes of them (the least last), with that last coordinate replaced by the
    pad a^T x (x [N, D], the down-projection's input), fitted by ridge least squares to sqrt(K - ||(T c)_<r||^2),
    K the `quantile` of ||(T c)_<r||^2 over the tokens, each token weighted by `weight` [N]."""
    c, x, w = c.double(), x.double(), weight.double() / weight.double().sum()
    ev, q = torch.linalg.eigh(c.T @ c / len(c))
    ev = ev.clamp(min=float(ev.max()) * 1e-10)
    half, inv_half = (q * ev.sqrt()) @ q.T, (q / ev.sqrt()) @ q.T  # C^(1/2), C^(-1/2)
    vh = torch.linalg.svd(w_up.double() @ half, full_matrices=False)[2]  # singular values descending
    T = vh @ inv_half
    kept = (c @ T.T)[:, :-1].pow(2).sum(-1)  # [N]
    target = (torch.quantile(kept, quantile) - kept).clamp(min=0).sqrt()  # [N]
    xw = x * w[:, None]
    gram = x.T @ xw
    ridge = 1e-4 * gram.diagonal().mean() * torch.eye(x.shape[1], dtype=torch.float64)
    a = torch.linalg.solve(gram + ridge, xw.T @ target)
    return T, a


def fit_latent(c: torch.Tensor, x: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, sink: torch.Tensor):
    """(w_down' [r, D], w_up' [out, r], gain, (cv before, cv after), padded): the latent c [N, r] = w_down x refitted for a
    norm by `steady_basis` or `pad_latent`, whichever brings the normed up-projection's output closer to the
    norm-free one's, c w_up^T (relative squared error over the tokens, the sinks weighted as in `sink_weights`)."""
    weight = sink_weights(sink)
    w_down, w_up = w_down.double(), w_up.double()
    want = c.double() @ w_up.T  # [N, out]

    def fit(down, up):
        latent = x.double() @ down.T
        gain = mean_rms(latent, weight)
        got = gain * latent / latent.pow(2).mean(-1, keepdim=True).sqrt() @ up.T
        err = float((weight * (got - want).pow(2).sum(-1)).sum() / (weight * want.pow(2).sum(-1)).sum())
        return err, down, up, gain, steadiness(latent, weight)

    B = steady_basis(c, sink=sink)
    T, a = pad_latent(c, x, w_up, weight)
    up = torch.linalg.solve(T.T, w_up.T).T  # W_up T^-1, its last column (the pad's) zeroed
    up[:, -1] = 0
    best = min((*fit(B @ w_down, torch.linalg.solve(B.T, w_up.T).T), False),  # W_up B^-1
               (*fit(torch.cat([(T @ w_down)[:-1], a[None].to(w_down)]), up), True), key=lambda f: f[0])
    return best[1], best[2], best[3], (steadiness(c, weight), best[4]), best[5]


@torch.no_grad()
def fit_latent_norms(args: ConvertArgs, config: EcoMLAConfig, new_sd: dict, src_path, log,
                     max_seqs: int = 16) -> None:
    """Latent norms that keep the model close to the norm-free one: per MLA layer and latent, a change
    of latent basis B that steadies the latent's rms over calibration tokens (folded into the down-projection's
    rows and the up-projection's columns: the norm-free layer is unchanged), then the gain g = mean rms(B c); each
    sequence's first token (the attention sink) carries SINK_SHARE of both.
    Measured on the norm-free model; updates `new_sd` in place."""
    model = materialise(norm_free(config), new_sd, torch.float32, args.seed)
    n_seqs = min(args.calib_seqs, max_seqs)
    latents: dict[tuple[int, str], list] = {}  # (layer, "kv" | "q") -> [c [B*T, r], ...]
    inputs: dict[int, list] = {}  # layer -> [x [B*T, D], ...], the input of both down-projections
    sinks: list[torch.Tensor] = []  # per batch [B*T]: True at each sequence's first token

    def record(key, width: int):
        def hook(_m, args, out):
            latents.setdefault(key, []).append(out[..., :width].reshape(-1, width).float())
            if key[1] == "kv":
                inputs.setdefault(key[0], []).append(args[0].reshape(-1, args[0].shape[-1]).float())
        return hook

    handles = []
    for i in config.mla_layer_indices:
        attn, spec = model.model.layers[i].self_attn, config.mla_spec(i)
        handles.append(attn.kv_a_proj_with_mqa.register_forward_hook(record((i, "kv"), spec.kv_lora_rank)))
        if spec.q_lora_rank is not None:
            handles.append(attn.q_a_proj.register_forward_hook(record((i, "q"), spec.q_lora_rank)))
    try:
        for ids in calibration_batches(load_tokenizer(src_path), args.calib_data, n_seqs, args.calib_len,
                                       args.calib_seed):
            model(input_ids=ids, use_cache=False)
            first = torch.zeros(ids.shape, dtype=torch.bool)
            first[:, 0] = True
            sinks.append(first.flatten())
    finally:
        for h in handles:
            h.remove()
    names = {"kv": ("kv_a_proj_with_mqa", "kv_b_proj", "kv_a_layernorm"), "q": ("q_a_proj", "q_b_proj", "q_a_layernorm")}
    before, after, pads = [], [], 0
    sink = torch.cat(sinks)
    for (i, kind), chunks in tqdm(latents.items(), desc="latent norms", leave=False):
        c, x = torch.cat(chunks), torch.cat(inputs[i])
        down, up, norm = (f"model.layers.{i}.self_attn.{n}" for n in names[kind])
        r = c.shape[1]
        w = new_sd[down + ".weight"].double()
        if down + ".bias" in new_sd:  # a bias rides along as one more input column, constant 1
            w = torch.cat([w, new_sd[down + ".bias"].double()[:, None]], 1)
            x = torch.cat([x, torch.ones(len(x), 1)], 1)
        w_down, w_up, gain, (cv0, cv1), padded = fit_latent(c, x, w[:r], new_sd[up + ".weight"], sink)
        w = torch.cat([w_down, w[r:]])  # kv_a also holds the rotary key rows
        if down + ".bias" in new_sd:
            w, new_sd[down + ".bias"] = w[:, :-1], w[:, -1]
        new_sd[down + ".weight"], new_sd[up + ".weight"] = w, w_up
        new_sd[norm + ".weight"] = torch.full((r,), gain, dtype=torch.float64)
        pads += padded
        if kind == "kv":
            before.append(cv0)
            after.append(cv1)
    log(f"latent norms: on {n_seqs} x {args.calib_len} calibration tokens, the KV latent's rms varies by "
        f"{sum(before) / len(before):.3f} (mean coefficient of variation over layers, the sequences' first tokens "
        f"weighted {SINK_SHARE:.0%}), {sum(after) / len(after):.3f} after refitting; {pads} of {len(latents)} "
        f"latents padded; gains = mean rms")
