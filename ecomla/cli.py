"""`ecomla <stage> ...`: one entry point, one subcommand per pipeline stage.

    ecomla convert default out/smollm2-4x --kv-rank 64 --rope-dim 32
    ecomla info out/smollm2-4x --json
    ecomla generate out/smollm2-4x --chat --prompt "Hi!"

Each subcommand is (arguments dataclass, function). Errors a user can fix print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .args import add_dataclass_args, from_namespace, load_yaml_defaults

# name -> (module, args class, function, one-line help)
COMMANDS = {
    "convert": ("ecomla.convert.convert", "ConvertArgs", "convert", "GQA checkpoint -> MLA checkpoint (SVD init)"),
    "info": ("ecomla.info", "InfoArgs", "main", "KV-cache accounting of a checkpoint"),
    "generate": ("ecomla.generate.generate", "GenerateArgs", "main", "generate text with the latent cache"),
    "assets": ("ecomla.assets.cli", "AssetsArgs", "main", "fetch / verify the offline default model and data"),
    "eval": ("ecomla.eval.run", "EvalArgs", "main", "perplexity, teacher-KL, lm-eval tasks; a report"),
    "distill": ("ecomla.distill.run", "DistillArgs", "main", "stage 1: layer-wise alignment + end-to-end KD"),
    "dpo": ("ecomla.dpo.run", "DPOArgs", "main", "stage 2: DPO with TRL"),
    "bench": ("ecomla.bench.run", "BenchArgs", "main", "decode speed and memory vs the GQA source"),
    "demo": ("ecomla.demo", "DemoArgs", "main", "the whole pipeline on the embedded default, with a report"),
}


def _available() -> dict:
    out = {}
    for name, (mod, *_rest) in COMMANDS.items():
        try:
            if importlib.util.find_spec(mod) is not None:
                out[name] = COMMANDS[name]
        except ModuleNotFoundError:
            pass
    return out


def build_parser(commands: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecomla", description="Upcycle GQA LLMs into Multi-head Latent Attention.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (mod, cls_name, _fn, help_) in commands.items():
        p = sub.add_parser(name, help=help_, description=help_)
        cls = getattr(importlib.import_module(mod), cls_name)
        add_dataclass_args(p, cls)
        p.add_argument("--config", help="YAML recipe whose keys are these options; flags override it")
    return parser


def main(argv: list[str] | None = None) -> int:
    from .io import UserError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    commands = _available()
    # Build only the requested subcommand's parser when possible (imports stay light).
    wanted = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser({wanted: commands[wanted]} if wanted in commands else commands)
    ns = parser.parse_args(argv)
    mod, cls_name, fn_name, _ = commands[ns.command]
    module = importlib.import_module(mod)
    try:
        args = from_namespace(getattr(module, cls_name), ns, load_yaml_defaults(ns.config))
        getattr(module, fn_name)(args)
    except (UserError, FileNotFoundError, ValueError) as err:
        print(f"ecomla {ns.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ecomla {ns.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
