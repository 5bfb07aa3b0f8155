"""`ecomla export MODEL OUT --format deepseek-v3 | gguf`: an ecomla checkpoint as a stock DeepseekV3ForCausalLM
folder, or as a llama.cpp deepseek2 GGUF file written from the same weights (llama_cpp.py).

    ecomla convert default out/smollm2-4x --kv-rank 64 --rope-dim 32 --init rope-whitened --target deepseek-v3
    ecomla export out/smollm2-4x out/smollm2-4x-dsv3
    python -c "from transformers import AutoModelForCausalLM as A; A.from_pretrained('out/smollm2-4x-dsv3')"

Exact or it refuses: a model the format cannot express (mla/deepseek.py lists the rules and the flag that fixes
each) is rejected before anything is written. What the export changes, each an exact identity:
- rotary dims: ecomla's rotate-half layout (dim j pairs with j + d_rope/2) -> DeepSeek's interleaved pairs
  (2j, 2j+1), for the query's rotary rows and the shared rotary key's rows;
- softmax scale: the format's is (d_nope + d_rope)^-0.5; ecomla's own (e.g. the source's d_h^-0.5) is folded into
  the query rows as their ratio;
- norm epsilon: transformers builds the latent norms with eps 1e-6 and vLLM/SGLang with the config's
  rms_norm_eps, so the export writes rms_norm_eps = 1e-6 and folds the source's eps into the weights: every
  RMSNorm input x is scaled by s = sqrt(1e-6 / eps), since g x / sqrt(ms(x) + eps) = g (s x) / sqrt(ms(s x) + 1e-6).
  The residual stream is scaled (embeddings, o_proj, down_proj), and the latents are scaled (q_a_proj, the latent
  rows of kv_a_proj_with_mqa); the final norm's output, hence lm_head, is unchanged.
- a dense model: every layer's MLP is dense (first_k_dense_replace = num_hidden_layers, integer expert counts).
- an untied head: `lm_head.weight` is always written and `tie_word_embeddings` is false, also for a tied source
  (the embeddings' copy). vLLM's DeepSeek model never ties; without the tensor it loads with no warning and every
  logit equal (issue 29).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from ..args import arg
from ..common import DTYPES, UserError
from ..outputs import atomic_dir, check_out
from ..io import load_config, load_model, load_tokenizer
from ..mla import deepseek
from ..mla.config import EcoMLAConfig
from ..mla.rope import layer_frequencies
from . import llama_cpp

GGUF = "gguf"
FORMATS = (deepseek.FORMAT, GGUF)
DEEPSEEK_EPS = 1e-6  # the eps transformers' DeepSeek-V3 latent norms are built with (and DeepSeek-V3's own)


@dataclass
class ExportArgs:
    model: str = arg("ecomla checkpoint to export (from convert, distill or dpo)", positional=True)
    out: str = arg("output folder (written atomically)", positional=True)
    format: str = arg("checkpoint format: 'deepseek-v3' (DeepseekV3ForCausalLM; transformers, vLLM, SGLang) or "
                      "'gguf' (llama.cpp's deepseek2, OUT/model.gguf; byte-level BPE tokenizers that split text as "
                      "SmolLM2's, Llama-3's or Qwen2's)",
                      default=deepseek.FORMAT, choices=FORMATS)
    dtype: str = arg("dtype of the written weights ('auto' = the model's); 'q8_0' (--format gguf only): matrices in "
                     "llama.cpp's Q8_0 blocks (32 int8 and an fp16 scale: 8.5 bits per weight), those whose rows are "
                     "not whole blocks in F16", default="auto", choices=("auto", *DTYPES, llama_cpp.Q8_0))
    overwrite: bool = arg("replace OUT if it holds an earlier output of this command (never other files)",
                          default=False)

    def __post_init__(self):
        if self.dtype == llama_cpp.Q8_0 and self.format != GGUF:
            raise UserError(f"--dtype q8_0 is a GGUF block type; use it with --format gguf, or give --format "
                            f"{self.format} a float dtype ({', '.join(DTYPES)})")


def interleave(m: int) -> torch.Tensor:
    """Row order [0, m, 1, m+1, ...]: rotate-half rows (x_0..x_{m-1}, y_0..y_{m-1}) -> interleaved (x_j, y_j) pairs."""
    return torch.stack([torch.arange(m), torch.arange(m) + m], dim=1).reshape(-1)


def deepseek_config(config: EcoMLAConfig) -> DeepseekV3Config:
    """The DeepSeek-V3 config of an expressible EcoMLAConfig (a dense model, one MLA shape, plain RoPE)."""
    spec, L = config.mla_spec(0), config.num_hidden_layers
    theta = deepseek.plain_rope_theta(layer_frequencies(config, 0)[0])
    return DeepseekV3Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        moe_intermediate_size=config.intermediate_size, num_hidden_layers=L,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_attention_heads,
        n_shared_experts=1, n_routed_experts=1, num_experts_per_tok=1, n_group=1, topk_group=1,
        first_k_dense_replace=L,  # every layer dense
        kv_lora_rank=spec.kv_lora_rank, q_lora_rank=spec.q_lora_rank, qk_rope_head_dim=spec.qk_rope_head_dim,
        qk_nope_head_dim=spec.qk_nope_head_dim, v_head_dim=spec.v_head_dim, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=DEEPSEEK_EPS,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": theta},
        rope_interleave=True, attention_bias=False, attention_dropout=0.0, architectures=["DeepseekV3ForCausalLM"],
    )


@torch.no_grad()
def deepseek_state_dict(model) -> tuple[dict[str, torch.Tensor], dict]:
    """The DeepSeek-V3 weights of an expressible EcoMLAForCausalLM (float32), and the folds applied."""
    config = model.config
    spec, H = config.mla_spec(0), config.num_attention_heads
    d_nope, d_rope, r_kv = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.kv_lora_rank
    s = math.sqrt(DEEPSEEK_EPS / config.rms_norm_eps)  # scale of every RMSNorm input (module docstring)
    q_fold = spec.scale / spec.qk_head_dim**-0.5  # ecomla's softmax scale over the format's
    rot = d_nope + interleave(d_rope // 2)  # per-head row order of the query: NoPE rows, then interleaved rotary rows
    q_order = torch.cat([torch.arange(d_nope), rot])
    sd = {k: v.float() for k, v in model.state_dict().items()}
    out = {}
    for name, w in sd.items():
        layer_part = name.split(".self_attn.")[-1] if ".self_attn." in name else None
        if name == "model.embed_tokens.weight" or name.endswith(("o_proj.weight", "mlp.down_proj.weight")):
            w = w * s
        elif layer_part in ("q_b_proj.weight", "q_proj.weight"):
            w = w.view(H, d_nope + d_rope, -1)[:, q_order].reshape(H * (d_nope + d_rope), -1) * q_fold
        elif layer_part == "q_a_proj.weight":
            w = w * s
        elif layer_part == "kv_a_proj_with_mqa.weight":
            w = torch.cat([w[:r_kv] * s, w[r_kv:][interleave(d_rope // 2)]])
        out[name] = w.contiguous()
    theta = deepseek.plain_rope_theta(layer_frequencies(config, 0)[0])
    folds = {"norm_eps": {"source": config.rms_norm_eps, "written": DEEPSEEK_EPS, "input_scale": s},
             "softmax_scale": {"ecomla": spec.scale, "format": spec.qk_head_dim**-0.5, "query_factor": q_fold},
             "rope": {"layout": "interleaved", "rope_theta": theta}}
    return out, folds


def check_exportable(config, model: str, fmt: str = deepseek.FORMAT) -> EcoMLAConfig:
    if not isinstance(config, EcoMLAConfig):
        raise UserError(f"{model} is not an ecomla checkpoint (model_type {getattr(config, 'model_type', None)!r}); "
                        "convert it first: ecomla convert SRC OUT --target deepseek-v3 ...")
    broken = deepseek.problems(config)
    if fmt == GGUF and not broken:
        broken = deepseek.llama_cpp_problems(config)
    if len(broken) == 1:  # one line, as every refusal
        raise UserError(f"{model} cannot be written exactly in the {fmt} format: {broken[0]}")
    if broken:
        raise UserError(f"{model} cannot be written exactly in the {fmt} format:\n  - " + "\n  - ".join(broken))
    return config


def model_card(model: str, config: EcoMLAConfig, folds: dict) -> str:
    spec = config.mla_spec(0)
    return f"""---
library_name: transformers
tags: [mla, deepseek_v3, ecomla]
---
# {Path(model).name} (DeepSeek-V3 format)

A Multi-head Latent Attention model written by `ecomla export --format {deepseek.FORMAT}` from the ecomla
checkpoint `{model}`. It loads in stock transformers (`AutoModelForCausalLM.from_pretrained(this_folder)`), and in
engines that serve DeepSeek-V3 checkpoints. Its license is the license of the model it was converted from.

- every layer is MLA: q_lora_rank {spec.q_lora_rank}, kv_lora_rank {spec.kv_lora_rank}, qk_nope_head_dim
  {spec.qk_nope_head_dim}, qk_rope_head_dim {spec.qk_rope_head_dim}, v_head_dim {spec.v_head_dim}; dense MLPs
- rotary: plain RoPE, theta {folds['rope']['rope_theta']:.6g}, interleaved layout
- the ecomla model's softmax scale and norm epsilon are folded into the weights (exact identities)

## Serving

```
{deepseek.serving_report(config)}
```

transformers caches decompressed per-head keys and values for this architecture, so it saves no memory there;
the latent cache (r_kv + d_rope values per token and layer) is what vLLM and SGLang keep.
"""


def export(args: ExportArgs, log=print) -> dict:
    config, model_dir = load_config(args.model)
    config = check_exportable(config, args.model, args.format)
    check_out(args.out, "export", [model_dir], overwrite=args.overwrite)
    vocab = llama_cpp.gguf_vocab(load_tokenizer(args.model), config.vocab_size, args.model) if args.format == GGUF \
        else None  # checked before the weights are read
    model, path = load_model(args.model, dtype="auto")
    dtype = model.dtype if args.dtype == "auto" else DTYPES.get(args.dtype, torch.float32)  # q8_0 from float32
    sd, folds = deepseek_state_dict(model)
    meta = {"source": str(path), "format": args.format, "folds": folds,
            "dtype": args.dtype if args.dtype == llama_cpp.Q8_0 else str(dtype)}
    with atomic_dir(args.out, "export", [model_dir], overwrite=args.overwrite) as tmp:
        if vocab is not None:
            llama_cpp.write_gguf(tmp / llama_cpp.FILE, Path(args.model).name, config,
                                 llama_cpp.gguf_tensors(sd, config), vocab, llama_cpp.qtype(args.dtype, dtype),
                                 folds["rope"]["rope_theta"], DEEPSEEK_EPS)
            report = llama_cpp.report(config)
        else:
            report = write_deepseek(tmp, args.model, config, model, sd, dtype, folds, log)
        (tmp / "ecomla_export.json").write_text(json.dumps(meta, indent=2))
    log(f"wrote {args.out} ({args.format}, {meta['dtype']})\n{report}")
    return meta


def write_deepseek(tmp: Path, name: str, config: EcoMLAConfig, model, sd: dict, dtype, folds: dict, log) -> str:
    """The DeepSeek-V3 folder (weights, tokenizer, generation config, model card); returns the serving report."""
    ds_config = deepseek_config(config)  # reads the rotary table: not on the meta device
    with torch.device("meta"):
        ds_model = DeepseekV3ForCausalLM(ds_config)
    ds_model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    ds_model.save_pretrained(tmp)
    try:
        load_tokenizer(name).save_pretrained(tmp)
    except UserError as err:
        log(f"warning: {err}; the output has no tokenizer")
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    (tmp / "README.md").write_text(model_card(name, config, folds))
    return deepseek.serving_report(config)
