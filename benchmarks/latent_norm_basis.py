"""How steady is a latent's rms per token, before and after the change of latent basis of ecomla/convert/norms.py,
with and without its condition-number clip?

    ecomla convert default runs/smollm2-4x-fitted --kv-rank 64 --rope-dim 32 --init fitted
    python benchmarks/latent_norm_basis.py runs/smollm2-4x-fitted --layers 3,12,24

Reads a norm-free ecomla checkpoint, records each chosen layer's KV latent on calibration tokens (the train split,
as `ecomla convert` does), and prints the coefficient of variation of rms(c) per token: raw, after
`steady_basis(max_condition=inf)`, and after the clip that `ecomla convert` uses, with each basis's condition number.
"""

from __future__ import annotations

import argparse
import inspect

import torch

from ecomla.convert import norms
from ecomla.convert.calibrate import calibration_batches
from ecomla.io import load_model, load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--layers", default="3,12,24")
    p.add_argument("--seqs", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    a = p.parse_args()
    model, path = load_model(a.model, dtype=torch.float32)
    layers = [int(x) for x in a.layers.split(",")]
    rec: dict[int, list] = {}

    def hook(i, width):
        def f(_m, _a, out):
            rec.setdefault(i, []).append(out[..., :width].reshape(-1, width).float())
        return f

    for i in layers:
        attn = model.model.layers[i].self_attn
        attn.kv_a_proj_with_mqa.register_forward_hook(hook(i, attn.spec.kv_lora_rank))
    with torch.no_grad():
        for ids in calibration_batches(load_tokenizer(path), "default", a.seqs, a.seq_len, 0):
            model(input_ids=ids, use_cache=False)
    default_clip = inspect.signature(norms.steady_basis).parameters["max_condition"].default
    print(f"| layer | raw | basis, no clip | condition | basis, clip {default_clip:g} | condition |")
    print("|---|---|---|---|---|---|")
    for i in layers:
        c = torch.cat(rec[i]).double()
        free, clipped = norms.steady_basis(c, max_condition=float("inf")), norms.steady_basis(c)
        cond = lambda b: float(torch.linalg.cond(b))  # noqa: E731
        print(f"| {i} | {norms.steadiness(c):.3f} | {norms.steadiness(c @ free.T):.3f} | {cond(free):.0f} | "
              f"{norms.steadiness(c @ clipped.T):.3f} | {cond(clipped):.0f} |")


if __name__ == "__main__":
    main()
