"""Which source architectures convert, and how their configs map onto EcoMLAConfig.

Supported: Llama (Llama 2/3.x, SmolLM/SmolLM2), Mistral, Qwen2/2.5. They share embeddings, RMSNorm,
SwiGLU MLP and rotate-half RoPE; they differ only in attention biases and sliding windows.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..common import UserError
from ..mla.config import SourceShape
from ..mla.rope import SUPPORTED_ROPE_TYPES


@dataclass(frozen=True)
class Family:
    qkv_bias: str  # "config" (read config.attention_bias), "always" or "never"
    o_bias: str


FAMILIES = {
    "llama": Family(qkv_bias="config", o_bias="config"),
    "mistral": Family(qkv_bias="never", o_bias="never"),
    "qwen2": Family(qkv_bias="always", o_bias="never"),
}

# Why a popular neighbour is refused, so the error says what is different.
UNSUPPORTED_WHY = {
    "qwen3": "it normalises q and k per head (q_norm/k_norm), which has no MLA counterpart here",
    "qwen3_moe": "it normalises q and k per head and uses MoE blocks",
    "gemma": "it scales embeddings and uses a different MLP/norm layout",
    "gemma2": "it uses logit soft-capping, sandwich norms and alternating sliding windows",
    "gemma3": "it uses q/k norms, sandwich norms and local/global attention layers",
    "gpt2": "it has learned absolute positions, not RoPE",
    "phi3": "it fuses qkv and gate/up projections",
    "mixtral": "its MLP is a mixture of experts",
    "deepseek_v3": "it already uses MLA",
}

# Source weights copied unchanged (per decoder layer and model-level).
LAYER_COPY = ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
              "mlp.up_proj.weight", "mlp.down_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.bias",
              "mlp.down_proj.bias", "self_attn.o_proj.weight", "self_attn.o_proj.bias")
MODEL_COPY = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
ATTN_COPY_IF_KEPT = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                     "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")


def check_supported(config) -> Family:
    """The Family of a source config, or one UserError naming the architecture and what is different."""
    mt = getattr(config, "model_type", None)
    if mt not in FAMILIES:
        why = UNSUPPORTED_WHY.get(mt, "it is not a Llama-family decoder with rotary attention")
        raise UserError(
            f"cannot convert architecture {mt!r}: {why}. Supported source families: {', '.join(FAMILIES)}"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UserError(f"cannot convert a {mt} model with RoPE type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    if getattr(config, "partial_rotary_factor", 1.0) not in (None, 1.0) or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"cannot convert a {mt} model with partial rotary embeddings")
    return FAMILIES[mt]


def _bias(rule: str, config) -> bool:
    return {"always": True, "never": False}.get(rule, bool(getattr(config, "attention_bias", False)))


def source_fields(config) -> dict:
    """EcoMLAConfig fields copied or derived from a supported source config."""
    fam = check_supported(config)
    shape, n = SourceShape.of(config), config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        layer_types = ["sliding_attention" if window else "full_attention"] * n
    eos = config.eos_token_id
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=n, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=shape.num_kv_heads, head_dim=shape.head_dim,
        hidden_act=config.hidden_act, max_position_embeddings=config.max_position_embeddings,
        initializer_range=getattr(config, "initializer_range", 0.02), rms_norm_eps=config.rms_norm_eps,
        pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
        eos_token_id=list(eos) if isinstance(eos, (list, tuple)) else eos,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        rope_parameters=dict(config.rope_parameters), mlp_bias=bool(getattr(config, "mlp_bias", False)),
        qkv_bias=_bias(fam.qkv_bias, config), o_bias=_bias(fam.o_bias, config),
        sliding_window=window, source_model_type=config.model_type, source_layer_types=list(layer_types),
    )
