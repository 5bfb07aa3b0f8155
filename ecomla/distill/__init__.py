"""Stage 1: layer-wise alignment (ILD) and end-to-end knowledge distillation, on accelerate."""

from .args import DistillArgs
from .trainer import Trainer


def distill(args: DistillArgs) -> dict:
    """`ecomla distill`: run stage 1 as `args` says; the run's summary (also in OUT/ecomla_train.json)."""
    return Trainer(args).run()
