"""`ecomla info DIR [--json]`: KV-cache accounting of a checkpoint, read from its config.json.

    ecomla info out/smollm2-4x --json
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from transformers import DeepseekV3Config

from .args import arg
from .io import load_config
from .mla import EcoMLAConfig, SourceShape


@dataclass
class InfoArgs:
    model: str = arg("checkpoint folder, hub id or 'default'", positional=True)
    json: bool = arg("print JSON", default=False)


def kv_info(config) -> dict:
    """Cached elements per token (summed over layers) for an EcoMLA config, a DeepSeek-V3 export, or a GQA config."""
    if isinstance(config, EcoMLAConfig):
        elems, src = config.kv_elements_per_token(), config.source_kv_elements_per_token()
        mla = config.mla_layer_indices
        specs = {}  # distinct specs -> the layers that use them
        for i in mla:
            specs.setdefault(json.dumps(config.mla_layers[i], sort_keys=True), []).append(i)
        specs = [{"layers": v, **json.loads(k)} for k, v in specs.items()]
    elif isinstance(config, DeepseekV3Config):  # an export: the latent row vLLM / SGLang cache (the source is unknown)
        elems = src = config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim)
        mla, specs = list(range(config.num_hidden_layers)), []
    else:
        elems = src = SourceShape.of(config).kv_elements
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


def info(args: InfoArgs) -> dict:
    config, path = load_config(args.model)
    out = {"path": path, **kv_info(config)}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{path}: {out['model_type']}, {out['num_layers']} layers, {len(out['mla_layers'])} MLA")
        print(f"KV cache: {out['kv_elements_per_token']} elements/token (source {out['source_kv_elements_per_token']}),"
              f" {out['compression']:.2f}x smaller")
    return out
