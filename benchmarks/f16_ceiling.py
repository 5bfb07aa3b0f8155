"""How often rounding the cache to fp16 flips a model's own argmax: the ceiling on any engine's f16-cache top-1.

    python benchmarks/f16_ceiling.py out/smollm2-4x            # an MLA student: its cached latent rounded to fp16
    python benchmarks/f16_ceiling.py default                   # a GQA model: its K and V rounded to fp16

On the held-out chat positions tests/test_engines.py compares llama.cpp on (conversations rendered in full, each
cut at 512 tokens, until at least 4,096 positions), the model in float32 against the same model whose cache
holds fp16 values (an MLA student's [c_kv | k_rope] row, a GQA model's keys and values), both full forwards.
Prints top-1 agreement, mean KL and the share of positions whose two best logits are closer than 0.01 and 0.05
(near-ties, which any rounding can flip). An engine with an f16 cache cannot agree with the float32 model more
often than this, whatever its kernels.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from ecomla.data.chat import load_chat, split_chat
from ecomla.data.packing import render
from ecomla.io import load_model, load_tokenizer

N_CTX, POSITIONS = 512, 4096  # tests/test_engines.py's context and positions


class Fp16Row:
    """A latent format whose cache holds fp16 values (MLAAttention reads `fake` in an uncached forward)."""

    def fake(self, latent: torch.Tensor) -> torch.Tensor:
        return latent.to(torch.float16).to(latent.dtype)


def positions(tok) -> list[list[int]]:
    seqs, n = [], 0
    for row in split_chat(load_chat("default"))["heldout"]:
        seqs.append(render(tok, row["messages"], mask_prompt=False)[0][:N_CTX])
        n += len(seqs[-1])
        if n >= POSITIONS:
            return seqs
    return seqs


@torch.no_grad()
def logits(model, seqs) -> list[torch.Tensor]:
    return [model(torch.tensor([ids]), use_cache=False).logits[0].float() for ids in seqs]


def fp16_cache(model) -> list:
    """Round what `model` caches to fp16; returns the hooks to remove (none for an MLA student)."""
    if hasattr(model, "mla_attention") and list(model.mla_attention()):
        for attn in model.mla_attention():
            attn.latent_format = Fp16Row()
        return []
    round16 = lambda mod, inp, out: out.to(torch.float16).to(out.dtype)  # noqa: E731
    return [proj.register_forward_hook(round16) for layer in model.model.layers
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a folder or 'default'")
    a = p.parse_args()
    model, path = load_model(a.model, dtype="float32")
    seqs = positions(load_tokenizer(path))
    ref = logits(model, seqs)
    fp16_cache(model)
    rounded = logits(model, seqs)
    agree = torch.cat([r.argmax(-1) == q.argmax(-1) for r, q in zip(ref, rounded)])
    kl = torch.cat([F.kl_div(F.log_softmax(q, -1), F.log_softmax(r, -1), log_target=True, reduction="none").sum(-1)
                    for r, q in zip(ref, rounded)])
    top2 = torch.cat([r.topk(2, -1).values for r in ref])
    margin = top2[:, 0] - top2[:, 1]
    print(f"{a.model}: fp16 cache against float32, {agree.numel()} held-out chat positions: top-1 "
          f"{agree.float().mean():.4%}, KL {kl.mean():.2e}; top-2 margin < 0.01 at {(margin < 0.01).float().mean():.2%}"
          f", < 0.05 at {(margin < 0.05).float().mean():.2%} of positions")


if __name__ == "__main__":
    main()
