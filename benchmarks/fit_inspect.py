"""Two facts behind the fitted init's choices, per layer of the default model:

    ecomla convert default runs/smollm2-4x-fitted --kv-rank 64 --rope-dim 32 --init fitted
    python benchmarks/fit_inspect.py --models runs/smollm2-4x-fitted

1. the share of each layer's key energy (E||W_K x||^2 over the calibration tokens) that is the mean key W_K E[x],
   a component shared by every token that softmax ignores (why `fit.split_mean` exists);
2. for each converted model given, the norm of every layer's o_proj against the source's (why the o_proj refit
   has a ridge towards the source).
Reads the cached calibration statistics (128 x 256 train-split tokens, as `ecomla convert` uses).
"""

from __future__ import annotations

import argparse

import torch
from safetensors.torch import load_file

from ecomla.convert.calibrate import layer_input_stats
from ecomla.io import load_model, load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="", help="comma list of converted model folders")
    a = p.parse_args()
    src, path = load_model("default", dtype="float32")
    stats = layer_input_stats(src, load_tokenizer(path), str(path), "default", 128, 256, 0)
    sd = src.state_dict()
    n = src.config.num_hidden_layers
    shares = []
    for i in range(n):
        w = sd[f"model.layers.{i}.self_attn.k_proj.weight"].double()
        total = torch.einsum("id,de,ie->", w, stats[i]["cov"], w)
        shares.append(float(((w @ stats[i]["mean"]) ** 2).sum() / total))
    print(f"key energy that is the mean key: min {min(shares):.3f}, max {max(shares):.3f} over {n} layers")
    print("per layer:", " ".join(f"{s:.2f}" for s in shares))
    for folder in filter(None, a.models.split(",")):
        conv = load_file(f"{folder}/model.safetensors")
        ratios = [float(conv[f"model.layers.{i}.self_attn.o_proj.weight"].double().norm()
                        / sd[f"model.layers.{i}.self_attn.o_proj.weight"].double().norm()) for i in range(n)]
        print(f"{folder}: o_proj norm / source's: min {min(ratios):.2f}, median {sorted(ratios)[n // 2]:.2f}, "
              f"max {max(ratios):.2f}")


if __name__ == "__main__":
    main()
