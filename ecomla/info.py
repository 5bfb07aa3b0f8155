"""`ecomla info DIR [--json]`: KV-cache accounting of a checkpoint, read from its config.json.

    ecomla info out/smollm2-4x --json
    ecomla info out/smollm2-4x --cache-bits 4     # bytes with a 4-bit latent cache, scales included

Bytes are per token over all layers, against the source's K/V cache in 16 bits (bf16): a 16-bit latent costs two
bytes per element, a quantized one its byte row (`ecomla.mla.quant`); `ecomla.cache_stats` measures the same bytes
from a live cache (tests/test_quant.py pins them equal).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from transformers import DeepseekV3Config

from .args import arg
from .io import load_config
from .mla import EcoMLAConfig, SourceShape
from .mla.config import check_latent_cache
from .mla.quant import CACHE_BITS_HELP, check_cache_bits


@dataclass
class InfoArgs:
    model: str = arg("checkpoint folder, hub id or 'default'", positional=True)
    json: bool = arg("print JSON", default=False)
    cache_bits: int | None = arg(CACHE_BITS_HELP, default=None)

    def __post_init__(self):
        check_cache_bits(self.cache_bits)


def kv_info(config, cache_bits: int | None = None) -> dict:
    """Cached elements and bytes per token (summed over layers) for an EcoMLA config (its latent cache at `cache_bits`,
    default its own), a DeepSeek-V3 export, or a GQA config."""
    if cache_bits is not None and isinstance(config, EcoMLAConfig):
        config = EcoMLAConfig.from_dict({**config.to_dict(), "cache_bits": cache_bits})
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
    nbytes = config.kv_bytes_per_token() if isinstance(config, EcoMLAConfig) else 2 * elems
    return {
        "model_type": config.model_type,
        "num_layers": config.num_hidden_layers,
        "kv_elements_per_token": elems,
        "source_kv_elements_per_token": src,
        "compression": src / elems,
        "cache_bits": getattr(config, "cache_bits", 16),
        "kv_bytes_per_token": nbytes,
        "source_kv_bytes_per_token": 2 * src,
        "bytes_compression": 2 * src / nbytes,
        "mla_layers": mla,
        "mla_specs": specs,
    }


def info(args: InfoArgs) -> dict:
    config, path = load_config(args.model)
    if args.cache_bits is not None:
        check_latent_cache(config, args.model)
    out = {"path": path, **kv_info(config, args.cache_bits)}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{path}: {out['model_type']}, {out['num_layers']} layers, {len(out['mla_layers'])} MLA")
        print(f"KV cache: {out['kv_elements_per_token']} elements/token (source {out['source_kv_elements_per_token']}),"
              f" {out['compression']:.2f}x smaller")
        print(f"{out['kv_bytes_per_token']} bytes/token with a {out['cache_bits']}-bit cache (source "
              f"{out['source_kv_bytes_per_token']} in bf16): {out['bytes_compression']:.2f}x smaller")
    return out
