"""Configuration of an MLA model: the source model's shape plus one MLA spec per converted layer.

A checkpoint folder written by `ecomla convert` has an ordinary `config.json` with `model_type: "ecomla"`.
After `import ecomla`, `AutoConfig.from_pretrained(dir)` returns an `EcoMLAConfig`.

Notation (docs/DESIGN-NOTES.md): D hidden size, H query heads, G source KV heads, d_h source head dim,
r_q query rank (None = full-rank query), r_kv latent rank, d_nope / d_rope / d_v per-head dims.
Field names inside a layer spec follow transformers' DeepseekV3 (q_lora_rank, kv_lora_rank, ...).

Every shape is derived here, once: `SourceShape.of(config)` reads a source's attention shape (head-dim and
KV-head fallbacks, 2*G*d_h cached elements per layer), `MLASpec.for_source` derives an MLA layer from it
(d_nope = d_h - d_rope, d_v = d_h, r_q by parameter parity), `parse_q_rank` reads `--q-rank`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import ALLOWED_ATTN_LAYER_TYPES, PreTrainedConfig

from ..common import UserError
from .quant import LatentFormat, check_cache_bits

# Cache-layer type of an MLA layer; `ecomla.mla.cache.LatentCacheLayer` registers itself under this name.
LATENT_LAYER_TYPE = "latent_attention"

QRank = int | Literal["auto"] | None  # r_q: a rank, parameter parity with the source, or a full-rank q_proj


def parse_q_rank(text: str | int | None) -> QRank:
    """`--q-rank`: an integer, 'auto' (parameter parity with the source, paper 4.1) or 'none' (full-rank q_proj)."""
    if text is None or text == "none":
        return None
    if text == "auto":
        return "auto"
    if isinstance(text, int) or str(text).isdigit():
        return int(text)
    raise UserError(f"--q-rank must be an integer, 'auto' or 'none', got {text!r}")


@dataclass(frozen=True)
class SourceShape:
    """The attention shape of a GQA source (any Llama-family HF config, or an EcoMLAConfig's source)."""

    hidden_size: int  # D
    num_heads: int  # H
    num_kv_heads: int  # G
    head_dim: int  # d_h
    num_layers: int

    @classmethod
    def of(cls, config) -> "SourceShape":
        H = config.num_attention_heads
        return cls(hidden_size=config.hidden_size, num_heads=H,
                   num_kv_heads=getattr(config, "num_key_value_heads", None) or H,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // H,
                   num_layers=config.num_hidden_layers)

    @property
    def kv_elements_per_layer(self) -> int:
        """Elements a GQA layer caches per token: K and V of every KV head, 2 * G * d_h."""
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def kv_elements(self) -> int:
        return self.kv_elements_per_layer * self.num_layers

    def max_kv_rank(self, rope_dim: int, rope_aware: bool) -> int:
        """The widest latent the K/V rows fill: the rank of what the joint SVD factors, [W_K; W_V] (2*G*d_h rows), or
        with a rope-aware init, whose rotary K dims leave the latent, [W_K nope; W_V] (G*(2*d_h - d_rope) rows); at
        most D. `ecomla convert` refuses a wider --kv-rank, and the export's serving report suggests none."""
        rows = self.num_kv_heads * (2 * self.head_dim - rope_dim) if rope_aware else self.kv_elements_per_layer
        return min(self.hidden_size, rows)

    def kv_rank_for_ratio(self, ratio: float, rope_dim: int) -> int:
        """r_kv that makes an MLA layer cache `ratio` times fewer elements than the source: 2*G*d_h/ratio - d_rope."""
        r_kv = int(self.kv_elements_per_layer / ratio) - rope_dim
        if r_kv < 1:
            raise UserError(f"a {ratio:g}x smaller cache leaves no room for a latent beside d_rope={rope_dim} "
                            f"({self.kv_elements_per_layer} elements per token per layer in the source)")
        return r_kv

    def parity_q_rank(self, r_kv: int, d_nope: int, d_rope: int, d_v: int) -> int:
        """r_q giving the MLA attention about the source's Q/K/V parameter count (paper section 4.1).

        Source: D*H*d_h + 2*D*G*d_h.  MLA: r_q*(D + H*(d_nope + d_rope)) + D*(r_kv + d_rope) + r_kv*H*(d_nope + d_v).
        """
        D, H = self.hidden_size, self.num_heads
        source = D * H * self.head_dim + D * self.kv_elements_per_layer
        kv = D * (r_kv + d_rope) + r_kv * H * (d_nope + d_v)
        r_q = (source - kv) // (D + H * (d_nope + d_rope))
        return int(max(1, min(r_q, D, H * (d_nope + d_rope))))


class SpecError(ValueError):
    """An MLA layer shape that cannot exist (a rank below 1, odd rotary dims...): `MLASpec.for_source` turns it into
    a UserError naming the flag; from a config.json it stays a ValueError (transformers reports the file)."""


@dataclass
class MLASpec:
    """Shape of one MLA layer. Stored in `config.json` under `mla_layers[i]`."""

    kv_lora_rank: int  # r_kv: width of the cached latent c_kv
    qk_rope_head_dim: int  # d_rope: rotary dims, one rotary key shared by all heads
    qk_nope_head_dim: int  # d_nope: non-rotary q/k dims per head
    v_head_dim: int  # d_v: value dims per head (the source head dim, so o_proj is reused)
    q_lora_rank: int | None = None  # r_q; None = full-rank q_proj
    latent_norm: bool = False  # RMSNorm on the q and kv latents (DeepSeek has it; X-EcoMLA drops it)
    # Which frequency pairs of the source RoPE the d_rope dims use (indices into the source's d_h/2
    # frequencies). None = a fresh d_rope-dim RoPE with the source's theta and scaling (the paper).
    rope_pairs: list[int] | None = None
    softmax_scale: float | None = None  # None = (d_nope + d_rope) ** -0.5, as in DeepSeek/X-EcoMLA

    def __post_init__(self):
        if self.kv_lora_rank < 1:
            raise SpecError(f"kv_lora_rank must be >= 1, got {self.kv_lora_rank} (--kv-rank)")
        if self.qk_rope_head_dim < 2 or self.qk_rope_head_dim % 2:
            raise SpecError(
                f"qk_rope_head_dim must be a positive even number (rotary dims come in pairs), got "
                f"{self.qk_rope_head_dim} (--rope-dim)"
            )
        if self.qk_nope_head_dim < 0:
            raise SpecError(f"qk_nope_head_dim must be >= 0, got {self.qk_nope_head_dim} (--nope-dim)")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise SpecError(f"q_lora_rank must be >= 1 or None, got {self.q_lora_rank} (--q-rank)")
        if self.rope_pairs is not None and len(self.rope_pairs) != self.qk_rope_head_dim // 2:
            raise SpecError(
                f"rope_pairs lists {len(self.rope_pairs)} frequency pairs but qk_rope_head_dim="
                f"{self.qk_rope_head_dim} needs {self.qk_rope_head_dim // 2}"
            )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def scale(self) -> float:
        return self.softmax_scale if self.softmax_scale is not None else self.qk_head_dim**-0.5

    @property
    def cache_elements(self) -> int:
        """Elements cached per token: [c_kv | roped k_rope]."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @classmethod
    def for_source(cls, src: SourceShape, kv_rank: int, rope_dim: int, q_rank: QRank = "auto",
                   nope_dim: int | None = None, **fields) -> "MLASpec":
        """The MLA layer for a source: d_nope = d_h - d_rope unless given, d_v = d_h (o_proj is reused), r_q from
        `q_rank` (parameter parity for 'auto'). `fields`: latent_norm, rope_pairs, softmax_scale."""
        d_h = src.head_dim
        if rope_dim > d_h:
            raise UserError(f"--rope-dim {rope_dim} is larger than the source head dim {d_h}")
        d_nope = d_h - rope_dim if nope_dim is None else nope_dim
        if not 0 <= d_nope <= d_h:
            raise UserError(f"--nope-dim must be in [0, {d_h}] (the source head dim), got {d_nope}")
        if q_rank == "auto":
            q_rank = src.parity_q_rank(kv_rank, d_nope, rope_dim, d_h)
        try:
            return cls(kv_lora_rank=kv_rank, qk_rope_head_dim=rope_dim, qk_nope_head_dim=d_nope, v_head_dim=d_h,
                       q_lora_rank=q_rank, **fields)
        except SpecError as err:  # only the shape checks of __post_init__: anything else is a bug
            raise UserError(str(err)) from err

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MLASpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise SpecError(f"unknown MLA spec fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


@strict
class EcoMLAConfig(PreTrainedConfig):
    """A Llama-family decoder whose attention layers are MLA (`mla_layers[i]` a spec) or kept GQA (None)."""

    model_type = "ecomla"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_dropout: int | float | None = 0.0
    mlp_bias: bool = False
    qkv_bias: bool = False  # Qwen2 (and Llama with attention_bias) carry q/k/v biases
    o_bias: bool = False  # Llama with attention_bias also biases o_proj; Qwen2 does not
    sliding_window: int | None = None  # source sliding window, applied to layers marked sliding
    source_model_type: str = "llama"
    source_layer_types: list[str] | None = None  # "full_attention" / "sliding_attention" per layer
    mla_layers: list | None = None  # per layer: MLASpec dict, or None for a kept GQA layer
    # RoPE parameters for fresh decoupled rotary dims; None = the source's `rope_parameters`.
    # The authors' code silently used YaRN here; `ecomla convert --mla-rope yarn` reproduces that.
    mla_rope_parameters: dict | None = None
    # Query lengths up to this use the absorbed path at inference; longer ones decompress (prefill).
    absorb_max_query_len: int = 1
    # Bits per cached latent value: 16 = the model's dtype; 8 or 4 = quantized rows (`ecomla.mla.quant`), which the
    # uncached forward (training, eval, prefill) reads through the same fake quantization. `--cache-bits` overrides.
    cache_bits: int = 16
    layer_types: list[str] | None = None  # cache-layer type per layer, derived from mla_layers

    def __post_init__(self, **kwargs):
        shape = SourceShape.of(self)  # head_dim and num_key_value_heads default as in the source families
        self.head_dim, self.num_key_value_heads = shape.head_dim, shape.num_kv_heads
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        if self.mla_layers is None:
            self.mla_layers = [None] * self.num_hidden_layers
        if self.source_layer_types is None:
            self.source_layer_types = ["full_attention"] * self.num_hidden_layers
        self.layer_types = [LATENT_LAYER_TYPE if s is not None else "full_attention" for s in self.mla_layers]
        super().__post_init__(**kwargs)

    def validate_layer_type(self):
        """Part of `@strict` validation: our layer types add the latent cache type to transformers' list."""
        if len(self.mla_layers) != self.num_hidden_layers:
            raise ValueError(
                f"mla_layers has {len(self.mla_layers)} entries but the model has {self.num_hidden_layers} layers"
            )
        for t in self.layer_types:
            if t != LATENT_LAYER_TYPE and t not in ALLOWED_ATTN_LAYER_TYPES:
                raise ValueError(f"unknown layer type {t!r}")
        for spec in self.mla_layers:
            if spec is not None:
                MLASpec.from_dict(spec)

    def validate_cache_bits(self):
        """Part of `@strict` validation: the one check of a cache width (`ecomla.mla.quant.check_cache_bits`), as a
        ValueError so that the loader names the config.json it came from."""
        try:
            check_cache_bits(self.cache_bits, "cache_bits (--cache-bits)")
        except UserError as err:
            raise ValueError(str(err)) from None

    def validate_architecture(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    def to_dict(self):
        """Serialised without `layer_types`: it is derived from `mla_layers`, and transformers' base config class
        (e.g. the Trainer re-reading a checkpoint's config.json) rejects the "latent_attention" type."""
        d = super().to_dict()
        d.pop("layer_types", None)
        return d

    # ---- convenience accessors -------------------------------------------------------------
    def mla_spec(self, layer_idx: int) -> MLASpec | None:
        spec = self.mla_layers[layer_idx]
        return None if spec is None else MLASpec.from_dict(spec)

    @property
    def mla_layer_indices(self) -> list[int]:
        return [i for i, s in enumerate(self.mla_layers) if s is not None]

    def layer_window(self, layer_idx: int) -> int | None:
        return self.sliding_window if self.source_layer_types[layer_idx] == "sliding_attention" else None

    def latent_format(self, layer_idx: int) -> LatentFormat | None:
        """The byte-row format of layer `layer_idx`'s quantized latent cache; None for a kept layer or 16 bits."""
        spec = self.mla_spec(layer_idx)
        return None if spec is None else LatentFormat.of(spec.kv_lora_rank, spec.qk_rope_head_dim, self.cache_bits)

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Cache bytes per token summed over layers: quantized rows (scales included) for MLA layers when cache_bits
        < 16, else elements x `bytes_per_value` (2: a 16-bit cache)."""
        gqa, total = SourceShape.of(self).kv_elements_per_layer * bytes_per_value, 0
        for i, spec in enumerate(self.mla_layers):
            fmt = self.latent_format(i)
            total += gqa if spec is None else fmt.row_bytes if fmt else self.mla_spec(i).cache_elements * bytes_per_value
        return total

    def kv_elements_per_token(self) -> int:
        """Cached elements per token summed over layers (MLA: r_kv + d_rope; kept GQA: 2*G*d_h)."""
        gqa = SourceShape.of(self).kv_elements_per_layer
        return sum(gqa if s is None else MLASpec.from_dict(s).cache_elements for s in self.mla_layers)

    def source_kv_elements_per_token(self) -> int:
        return SourceShape.of(self).kv_elements


def check_latent_cache(config, label: str) -> None:
    """Refuse `--cache-bits` for a model without a latent cache (a GQA checkpoint: its K/V cache is not ours)."""
    if not isinstance(config, EcoMLAConfig) or not config.mla_layer_indices:
        raise UserError(f"--cache-bits quantizes the latent cache of an MLA checkpoint; {label} has no MLA layer")


__all__ = ["EcoMLAConfig", "MLASpec", "SourceShape", "SpecError", "QRank", "parse_q_rank", "LATENT_LAYER_TYPE"]
