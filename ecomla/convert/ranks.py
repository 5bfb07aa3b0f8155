"""KV-budget rank allocation: spend a total KV-cache budget where it removes the most reconstruction error.

Each MLA layer l caches r_l + d_rope elements per token; a kept GQA layer caches 2*G*d_h and loses nothing.
With s_l the singular values of layer l's (whitened) K/V matrix, the error at rank r is sum_{i >= r} s_l[i]^2,
and raising r by one removes s_l[r]^2 for one more element per token. Those gains shrink as r grows, so
handing out elements one at a time to the largest gain is optimal for the pure-MLA case. With hybrid layers
allowed, a Lagrangian search (price per element) picks which layers stay attention, then the leftover
budget is handed out greedily. `norm="relative"` divides each layer's spectrum by its total energy.
"""

from __future__ import annotations

import heapq
import re

import torch

from ..common import UserError


def _gains(spectra: list[torch.Tensor], norm: str) -> list[torch.Tensor]:
    out = []
    for s in spectra:
        g = s.double() ** 2
        out.append(g / g.sum() if norm == "relative" else g)
    return out


def _fill(gains, ranks, limits, spare: int, active) -> int:
    """Raise ranks of `active` layers one element at a time by largest gain; returns elements left unspent."""
    heap = [(-float(gains[l][ranks[l]]), l) for l in active if ranks[l] < limits[l]]
    heapq.heapify(heap)
    while spare > 0 and heap:
        _, l = heapq.heappop(heap)
        ranks[l] += 1
        spare -= 1
        if ranks[l] < limits[l]:
            heapq.heappush(heap, (-float(gains[l][ranks[l]]), l))
    return spare


def allocate(spectra: list[torch.Tensor], budget: int, d_rope: int, limits: list[int], gqa_cost: int | None = None,
             min_rank: int = 1, norm: str = "absolute") -> tuple[list[int | None], int]:
    """Ranks per layer (None = keep the layer as GQA; only when gqa_cost is given) and the elements left unspent.

    budget: total cached elements per token over these layers; limits: max rank per layer.
    """
    n = len(spectra)
    gains = _gains(spectra, norm)
    limits = [min(int(lim), len(g)) for lim, g in zip(limits, gains)]
    floor = n * (min_rank + d_rope)
    if budget < floor:
        raise UserError(f"a KV budget of {budget} elements/token is below the minimum {floor} "
                        f"({n} layers x (rank {min_rank} + d_rope {d_rope})); raise --kv-budget")
    ranks: list[int | None] = [min_rank] * n
    if gqa_cost is None:
        spare = _fill(gains, ranks, limits, budget - floor, range(n))
        return ranks, spare
    # Lagrangian: price lam per element; each layer takes the cheaper of GQA and its best MLA rank.
    cum = [torch.cat([torch.zeros(1, dtype=torch.float64), g.cumsum(0)]) for g in gains]  # removed error at rank r

    def choose(lam: float):
        picks, cost = [], 0
        for l in range(n):
            total = cum[l][-1]
            r = int(((gains[l] >= lam).sum()).clamp(min_rank, limits[l]))
            mla = (total - cum[l][r]) + lam * (r + d_rope)
            if lam * gqa_cost < mla:
                picks.append(None)
                cost += gqa_cost
            else:
                picks.append(r)
                cost += r + d_rope
        return picks, cost

    lo, hi = 0.0, max(float(g.max()) for g in gains) * 2 + 1.0
    for _ in range(60):  # smallest price whose choice fits the budget
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if choose(mid)[1] <= budget else (mid, hi)
    ranks, cost = choose(hi)
    spare = _fill(gains, ranks, limits, budget - cost, [l for l in range(n) if ranks[l] is not None])
    return ranks, spare


def total_error(spectra: list[torch.Tensor], ranks: list[int | None], norm: str = "absolute") -> float:
    gains = _gains(spectra, norm)
    return float(sum(g[r:].sum() for g, r in zip(gains, ranks) if r is not None))


def parse_budget(text: str, source_elements: int) -> int:
    """'4x' -> source/4 elements per token; an integer -> that many elements (summed over layers)."""
    text = str(text).strip().lower()
    m = re.fullmatch(r"(\d+(?:\.\d*)?)x|\d+", text)
    ratio = float(m.group(1)) if m and m.group(1) else None
    if m is None or (ratio if ratio is not None else int(text)) < 1:
        raise UserError(f"--kv-budget {text!r}: use a compression ratio like 4x (>= 1) or a number of elements (>= 1)")
    return int(source_elements // ratio) if ratio is not None else int(text)
