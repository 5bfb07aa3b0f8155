"""`ecomla info DIR [--json]`: KV-cache accounting of a checkpoint, read from its config.json.

    ecomla info out/smollm2-4x --json
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .args import arg
from .io import load_config


@dataclass
class InfoArgs:
    model: str = arg("checkpoint folder, hub id or 'default'", positional=True)
    json: bool = arg("print JSON", default=False)


def kv_info(config) -> dict:
    """Cached elements per token (summed over layers) for an EcoMLA config or a plain GQA config."""
    if getattr(config, "model_type", None) == "ecomla":
        elems, src = config.kv_elements_per_token(), config.source_kv_elements_per_token()
        mla = config.mla_layer_indices
        specs = {}  # distinct specs -> the layers that use them
        for i in mla:
            key = json.dumps(config.mla_layers[i], sort_keys=True)
            specs.setdefault(key, []).append(i)
        specs = [{"layers": v, **json.loads(k)} for k, v in specs.items()]
    else:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        elems = src = 2 * kv_heads * head_dim * config.num_hidden_layers
        mla, specs = [], []
    return {
        "model_type": config.model_type,
        "num_layers": config.num_hidden_layers,
        "kv_elements_per_token": elems,
        "source_kv_elements_per_token": src,
        "compression": src / elems,
        "mla_layers": mla,
        "mla_specs": specs,
    }


def main(args: InfoArgs) -> dict:
    config, path = load_config(args.model)
    info = {"path": path, **kv_info(config)}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"{path}: {info['model_type']}, {info['num_layers']} layers, {len(info['mla_layers'])} MLA")
        print(f"KV cache: {info['kv_elements_per_token']} elements/token (source {info['source_kv_elements_per_token']}),"
              f" {info['compression']:.2f}x smaller")
    return info
