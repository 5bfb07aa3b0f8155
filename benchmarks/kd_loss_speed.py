"""Time of the KD loss alone (forward + backward) for N x V logits: the formula under plain autograd,
ecomla's forward KL (one fused autograd function) eager and under torch.compile, and cross-entropy for scale.

    python benchmarks/kd_loss_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ecomla.losses import token_ce, token_kl


def plain_forward_kl(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    log_q, log_p = F.log_softmax(z.float(), -1), F.log_softmax(t.float(), -1)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    z = torch.randn(a.tokens, a.vocab, requires_grad=True)
    t = torch.randn(a.tokens, a.vocab)
    labels = torch.randint(0, a.vocab, (a.tokens,))
    runs = {
        "forward KL, plain autograd": lambda: plain_forward_kl(z, t),
        "forward KL, fused, eager": lambda: token_kl(z, t),
        "forward KL, fused, torch.compile": lambda: token_kl(z, t, compiled=True),
        "cross-entropy": lambda: token_ce(z, labels),
    }
    print(f"{'loss (forward + backward)':<38} {'seconds':>8}   ({a.tokens} x {a.vocab}, {a.threads} threads)")
    for name, fn in runs.items():
        fn().sum().backward()  # warm-up (and the one-off compile)
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            fn().sum().backward()
            times.append(time.perf_counter() - t0)
        print(f"{name:<38} {min(times):8.3f}")


if __name__ == "__main__":
    main()
