"""`ecomla <stage> ...`: one entry point, one subcommand per pipeline stage.

    ecomla convert default out/smollm2-4x --kv-rank 64 --rope-dim 32
    ecomla info out/smollm2-4x --json
    ecomla generate out/smollm2-4x --chat --prompt "Hi!"
    ecomla export out/smollm2-4x out/smollm2-4x-dsv3 --format deepseek-v3
    ecomla export out/smollm2-4x out/smollm2-4x-gguf --format gguf
    ecomla plan recipes/distill-gpu-llama-3.2-1b-kv64-teacher-8b.yaml --strategy fsdp --world-size 8

Each subcommand is (arguments dataclass, stage function): the dataclass's fields are the flags (ecomla/args.py),
a `--config` YAML recipe supplies defaults. A `UserError` (a mistake the user can fix) prints one line and exits 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable

from .args import add_dataclass_args, from_namespace, load_yaml_defaults
from .assets.cli import AssetsArgs, fetch_assets
from .bench.run import BenchArgs, bench
from .common import UserError
from .convert.convert import ConvertArgs, convert
from .demo import DemoArgs, demo
from .distill import DistillArgs, distill
from .distill.quiet import library_bars_off
from .dpo.run import DPOArgs, run_dpo
from .eval.run import EvalArgs, evaluate
from .export.export import ExportArgs, export
from .generate.generate import GenerateArgs, generate_text
from .info import InfoArgs, info
from .plan import PlanArgs, run_plan


@dataclass(frozen=True)
class Command:
    args: type  # the arguments dataclass
    run: Callable  # the stage function, called with an instance of `args`
    help: str


COMMANDS = {
    "assets": Command(AssetsArgs, fetch_assets, "fetch / verify the offline default model and data"),
    "convert": Command(ConvertArgs, convert, "GQA checkpoint -> MLA checkpoint (initialised as --init says)"),
    "info": Command(InfoArgs, info, "KV-cache accounting of a checkpoint"),
    "plan": Command(PlanArgs, run_plan, "memory per device of a distill run, before any weights load"),
    "distill": Command(DistillArgs, distill, "stage 1: layer-wise alignment + end-to-end KD"),
    "dpo": Command(DPOArgs, run_dpo, "stage 2: DPO with TRL"),
    "eval": Command(EvalArgs, evaluate, "perplexity, teacher-KL, lm-eval tasks; a report"),
    "generate": Command(GenerateArgs, generate_text, "generate text with the latent cache"),
    "export": Command(ExportArgs, export,
                      "write an MLA checkpoint as DeepSeek-V3 (transformers, vLLM, SGLang) or GGUF (llama.cpp)"),
    "bench": Command(BenchArgs, bench, "decode speed and memory vs the GQA source"),
    "demo": Command(DemoArgs, demo, "the whole pipeline on the embedded default, with a report"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecomla", description="Upcycle GQA LLMs into Multi-head Latent Attention.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        add_dataclass_args(p, cmd.args)
        p.add_argument("--config", help="YAML recipe whose keys are these options; flags override it")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ns = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    cmd = COMMANDS[ns.command]
    try:
        with library_bars_off():  # the stage's own bar is the one shown, not transformers' "Loading weights"
            cmd.run(from_namespace(cmd.args, ns, load_yaml_defaults(ns.config)))
    except UserError as err:
        print(f"ecomla {ns.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ecomla {ns.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
