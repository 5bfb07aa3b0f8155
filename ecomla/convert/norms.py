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
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..io import load_tokenizer
from ..mla.config import EcoMLAConfig
from .args import ConvertArgs
from .calibrate import calibration_batches
from .layers import materialise, norm_free


def mean_rms(c: torch.Tensor) -> float:
    """Mean over tokens of rms(c_t), c [N, r]."""
    return float(c.double().pow(2).mean(-1).sqrt().mean())


def steadiness(c: torch.Tensor) -> float:
    """Coefficient of variation of rms(c_t) over tokens (0 = a latent norm is a fixed rescaling)."""
    rms = c.double().pow(2).mean(-1).sqrt()
    return float(rms.std() / rms.mean())


def steady_basis(c: torch.Tensor, steps: int = 300, lr: float = 3e-3, max_condition: float = 30.0) -> torch.Tensor:
    """B [r, r] (float64) minimising Var(||B c_t||^2) / E[||B c_t||^2]^2 over the tokens c [N, r], from B = I, with
    singular values of geometric mean 1 and condition number <= max_condition. Deterministic for given inputs;
    returns I when it does not make the rms steadier."""
    x = c.float()
    x = x / x.pow(2).sum(-1).mean().sqrt()  # scale-free: the objective is, the step size is not
    B = torch.eye(x.shape[1], requires_grad=True)
    opt = torch.optim.Adam([B], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            q = (x @ B.T).pow(2).sum(-1)  # [N]
            loss = (q / q.mean() - 1).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    u, sv, vh = torch.linalg.svd(B.detach().double())
    sv = sv / sv.log().mean().exp()
    sv = sv.clamp(max_condition**-0.5, max_condition**0.5)
    B = (u * sv) @ vh
    if steadiness(c.double() @ B.T) >= steadiness(c):
        return torch.eye(c.shape[1], dtype=torch.float64)
    return B


@torch.no_grad()
def fit_latent_norms(args: ConvertArgs, config: EcoMLAConfig, new_sd: dict, src_path, log,
                     max_seqs: int = 16) -> None:
    """Latent norms that keep the model close to the norm-free one: per MLA layer and latent, a change
    of latent basis B that steadies the latent's rms over calibration tokens (folded into the down-projection's
    rows and the up-projection's columns: the norm-free layer is unchanged), then the gain g = mean rms(B c).
    Measured on the norm-free model; updates `new_sd` in place."""
    model = materialise(norm_free(config), new_sd, torch.float32, args.seed)
    n_seqs = min(args.calib_seqs, max_seqs)
    latents: dict[tuple[int, str], list] = {}  # (layer, "kv" | "q") -> [c [B*T, r], ...]

    def record(key, width: int):
        def hook(_m, _args, out):
            latents.setdefault(key, []).append(out[..., :width].reshape(-1, width).float())
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
    finally:
        for h in handles:
            h.remove()
    names = {"kv": ("kv_a_proj_with_mqa", "kv_b_proj", "kv_a_layernorm"), "q": ("q_a_proj", "q_b_proj", "q_a_layernorm")}
    before, after = [], []
    for (i, kind), chunks in tqdm(latents.items(), desc="latent norms", leave=False):
        c = torch.cat(chunks)
        B = steady_basis(c)
        down, up, norm = (f"model.layers.{i}.self_attn.{n}" for n in names[kind])
        r = c.shape[1]
        w = new_sd[down + ".weight"].double()
        new_sd[down + ".weight"] = torch.cat([B @ w[:r], w[r:]])  # kv_a also holds the rotary key rows
        if down + ".bias" in new_sd:
            b = new_sd[down + ".bias"].double()
            new_sd[down + ".bias"] = torch.cat([B @ b[:r], b[r:]])
        new_sd[up + ".weight"] = torch.linalg.solve(B.T, new_sd[up + ".weight"].double().T).T  # W_up B^-1
        c_new = c.double() @ B.T
        new_sd[norm + ".weight"] = torch.full((r,), mean_rms(c_new), dtype=torch.float64)
        if kind == "kv":
            before.append(steadiness(c))
            after.append(steadiness(c_new))
    log(f"latent norms: on {n_seqs} x {args.calib_len} calibration tokens, the KV latent's rms varies by "
        f"{sum(before) / len(before):.3f} (mean coefficient of variation over layers), {sum(after) / len(after):.3f} "
        "after the change of basis; gains = mean rms")
