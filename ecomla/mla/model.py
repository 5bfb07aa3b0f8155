"""EcoMLAForCausalLM: a Llama-family decoder whose attention layers are MLA or kept GQA.

Embeddings, RMSNorms and the SwiGLU MLP are transformers' Llama modules; the attention is
`ecomla.mla.attention`. Works with `generate()`, lm-eval's HFLM and TRL like any causal LM.

    import ecomla  # registers the "ecomla" model type with the Auto classes
    model = AutoModelForCausalLM.from_pretrained("out/smollm2-4x")
    model.prepare_for_decode()  # optional, for inference: folded weights and the decode kernel (decode.py)
    model.set_cache_bits(4)     # optional: a 4-bit latent cache (quant.py); saved with the checkpoint
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from . import cache as _cache  # noqa: F401  (registers the latent cache layer type)
from .attention import GQAAttention, MLAAttention, build_mask
from .config import EcoMLAConfig, check_latent_cache
from .decode import AbsorbedWeights, folded, pick_kernel
from .quant import check_cache_bits
from .rope import RotaryTables


class EcoMLADecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: EcoMLAConfig, layer_idx: int):
        super().__init__()
        spec = config.mla_spec(layer_idx)
        self.self_attn = MLAAttention(config, layer_idx, spec) if spec is not None else GQAAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, rope, attention_mask=None, cache=None, mla_path=None, **kwargs):
        h = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), rope=rope, attention_mask=attention_mask, cache=cache,
            mla_path=mla_path,
        )
        return h + self.mlp(self.post_attention_layernorm(h))


class EcoMLAPreTrainedModel(PreTrainedModel):
    config_class = EcoMLAConfig
    config: EcoMLAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EcoMLADecoderLayer"]
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' loader, made strict: a missing, unexpected or mis-shaped tensor is an error."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        bad = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        bad = {k: v for k, v in bad.items() if v}
        if bad:
            raise ValueError(f"checkpoint {args[0] if args else ''} does not match its config: {bad}")
        return (model, info) if want_info else model

    def mla_attention(self) -> list[MLAAttention]:
        return [m for m in self.modules() if isinstance(m, MLAAttention)]

    def prepare_for_decode(self, kernel: str = "auto", fold: bool = True):
        """Fold every MLA layer's weights for the absorbed path and pick the decode kernel for their device and
        dtype (`ecomla.mla.decode`); returns the model in eval mode. `fold=False` keeps the plain weights (only the
        kernel is chosen). Prepare once the weights are final: later in-place changes are not seen. `train()`
        drops the preparation; after `.to(...)` prepare again."""
        self.eval()
        for attn in self.mla_attention():
            weight = attn.kv_b_proj.weight
            chosen = pick_kernel(weight.device, weight.dtype, kernel)
            attn.prepared = folded(attn, chosen) if fold else replace(AbsorbedWeights.plain(attn), kernel=chosen)
        return self

    def set_cache_bits(self, bits: int):
        """Quantize the latent cache to `bits` (16: the model's dtype; 8 or 4: byte rows, `ecomla.mla.quant`) from now
        on, in the cache and, as fake quantization, in every uncached forward. Recorded in the config, so a saved
        checkpoint decodes with the same cache. Returns the model."""
        if bits is None:
            raise ValueError("set_cache_bits needs 16, 8 or 4")
        self.config.cache_bits = check_cache_bits(bits)
        for attn in self.mla_attention():
            attn.latent_format = self.config.latent_format(attn.layer_idx)
        return self

    def decode_kernel(self) -> str | None:
        """The prepared decode kernel ('sdpa' = none), or None when the model is not prepared."""
        prepared = [a.prepared for a in self.mla_attention() if a.prepared is not None]
        if not prepared:
            return None
        return prepared[0].kernel.name if prepared[0].kernel is not None else "sdpa"

    def drop_decode_preparation(self):
        """Back to the plain absorbed path (views of the projections, autograd intact)."""
        for attn in self.mla_attention():
            attn.prepared = None
        return self

    def train(self, mode: bool = True):
        """Training drops a decode preparation: its folded weights carry no gradient."""
        if mode:
            self.drop_decode_preparation()
        return super().train(mode)

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, LlamaRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, RotaryTables):  # non-persistent: recomputed after every load
            module.reset()


class EcoMLAModel(EcoMLAPreTrainedModel):
    def __init__(self, config: EcoMLAConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(EcoMLADecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary = RotaryTables(config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache: Cache | None = None,
        inputs_embeds=None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        mla_path: str | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = DynamicCache(config=self.config)  # latent layers for MLA, K/V layers for kept attention
        if not use_cache:
            cache = None
        B, T = h.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=h.device)[None].expand(B, T)
        ropes = self.rotary(position_ids, h.dtype)  # per layer (cos, sin)
        masks = {}
        hidden = [h] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            window = self.config.layer_window(i)
            if window not in masks:
                masks[window] = build_mask(attention_mask, T, past, window, h.device)
            h = layer(h, rope=ropes[i], attention_mask=masks[window], cache=cache, mla_path=mla_path)
            if hidden is not None:
                hidden.append(h)
        h = self.norm(h)
        if hidden is not None:
            hidden[-1] = h  # as in transformers: the last entry is after the final norm
        return BaseModelOutputWithPast(last_hidden_state=h, cache=cache, hidden_states=tuple(hidden) if hidden else None)


class EcoMLAForCausalLM(EcoMLAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: EcoMLAConfig):
        super().__init__(config)
        self.model = EcoMLAModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache: Cache | None = None,
        inputs_embeds=None,
        labels=None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mla_path: str | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
            use_cache=use_cache, output_hidden_states=output_hidden_states, mla_path=mla_path,
        )
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep else h
        else:
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)


def with_cache_bits(model, bits: int | None, label: str):
    """`model` with its latent cache at `bits` (`--cache-bits`; None: as its checkpoint says). A model without a
    latent cache (a GQA checkpoint) is refused: its K/V cache is not this flag's to quantize."""
    if bits is None:
        return model
    check_latent_cache(model.config, label)
    return model.set_cache_bits(bits)
