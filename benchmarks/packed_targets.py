"""How many packed training blocks have no target token, and what leaving them out changes in the stream.

    python benchmarks/packed_targets.py                       # the default chat data, 256-token blocks, seed 0
    python benchmarks/packed_targets.py --blocks 4000 --seq-len 512 --no-mask-prompt

With `ecomla distill --mask-prompt` only assistant tokens are targets, so a block inside a long prompt has
none: it costs a teacher forward and a student forward and backward, and teaches nothing. `ecomla distill` packs
with `skip_untargeted` (ecomla/data/packing.py). Prints, for the first --blocks blocks of the train split, the
blocks without a target, the quartiles of the target share, and the sha256 of the first 200 blocks (ids and mask)
without and with the skip, which says whether the stream of earlier runs is kept.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics

from ecomla.data.chat import load_chat, split_chat
from ecomla.data.packing import PackedChat
from ecomla.io import load_tokenizer


def stream_hash(packed: PackedChat, n: int) -> str:
    h = hashlib.sha256()
    for k in range(n):
        ids, mask = packed.block(k)
        h.update(ids.numpy().tobytes())
        h.update(mask.numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="default")
    p.add_argument("--model", default="default", help="whose tokenizer packs the data")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blocks", type=int, default=2000)
    p.add_argument("--mask-prompt", action=argparse.BooleanOptionalAction, default=True)
    a = p.parse_args()
    train = split_chat(load_chat(a.data))["train"]
    tok = load_tokenizer(a.model)
    make = lambda skip: PackedChat(train, tok, a.seq_len, seed=a.seed, mask_prompt=a.mask_prompt,  # noqa: E731
                                   skip_untargeted=skip)
    plain, skipped = make(False), make(True)
    shares = [float(plain.block(k)[1][1:].float().mean()) for k in range(a.blocks)]
    empty = [k for k, s in enumerate(shares) if s == 0]
    q = statistics.quantiles(shares, n=4)
    print(f"{a.data}, {a.seq_len}-token blocks, seed {a.seed}, mask_prompt={a.mask_prompt}: first {a.blocks} blocks")
    print(f"  without a target token: {len(empty)} ({100 * len(empty) / a.blocks:.2f}%); first ones: {empty[:10]}")
    print(f"  target share per block: quartiles {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}")
    print(f"  untargeted among the first 200: {sum(k < 200 for k in empty)}")
    print(f"  sha256 of the first 200 blocks: all blocks {stream_hash(plain, 200)}, "
          f"untargeted left out {stream_hash(skipped, 200)}")


if __name__ == "__main__":
    main()
