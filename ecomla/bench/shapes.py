"""Model shapes for `ecomla bench --shape NAME` (synthetic weights) and the MLA config the bench compares.

Presets are the real models' shapes (config.json values), so a GPU run needs no checkpoint:
    ecomla bench --shape llama-3.2-1b --kv-rank 64 --rope-dim 32 --contexts 8k --batches 128

Weights are random: speed and memory do not depend on their values.
"""

from __future__ import annotations

import re

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ..common import UserError
from ..convert.args import ConvertArgs
from ..convert.layers import planned_config
from ..mla.config import EcoMLAConfig
from ..mla.model import EcoMLAForCausalLM

_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

PRESETS = {
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=False,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                         tie_word_embeddings=True, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_parameters={**_LLAMA3_ROPE, "factor": 32.0}),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                         tie_word_embeddings=False, rms_norm_eps=1e-5, rope_parameters={**_LLAMA3_ROPE, "factor": 8.0}),
}


def parse_sizes(text: str, flag: str) -> list[int]:
    """'1k,4k,512' -> [1024, 4096, 512] (k = 1024)."""
    out = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", part)
        if not m or int(m.group(1)) < 1:
            raise UserError(f"{flag} {text!r}: use positive integers, optionally with k (=1024), e.g. 1k,4k,8k")
        out.append(int(m.group(1)) * (1024 if m.group(2) else 1))
    return out


def shape_config(name: str) -> LlamaConfig:
    if name not in PRESETS:
        raise UserError(f"unknown --shape {name!r}; presets: {', '.join(PRESETS)}")
    return LlamaConfig(**PRESETS[name], bos_token_id=1, eos_token_id=2)


def mla_config(src_config, kv_rank: int, rope_dim: int, q_rank: str = "auto") -> EcoMLAConfig:
    """The config `ecomla convert --kv-rank R --rope-dim D --q-rank Q` would write for this source (every layer MLA,
    the default init's layout): `planned_config`, the one place a conversion's shapes come from."""
    return planned_config(ConvertArgs(src="(synthetic)", out="-", kv_rank=kv_rank, rope_dim=rope_dim, q_rank=q_rank),
                          src_config)


def synthetic_model(config, dtype: torch.dtype, device: str, seed: int):
    """A randomly initialised EcoMLAForCausalLM (EcoMLAConfig) or LlamaForCausalLM, built on `device`."""
    torch.manual_seed(seed)
    cls = EcoMLAForCausalLM if isinstance(config, EcoMLAConfig) else LlamaForCausalLM
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    return model.to(device).eval()  # moves what was built off `device` (the rotary table is built on CPU)
