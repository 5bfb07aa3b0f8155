"""Latent norms that start close to the norm-free layer: a latent basis with a steadier rms, and the gain.

Tensor math only. A latent norm maps c -> g * c / rms(c) (per token), which equals c only when rms(c) = g for
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
