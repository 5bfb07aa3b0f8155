"""`ecomla export MODEL OUT --format gguf`: an ecomla checkpoint as a llama.cpp `deepseek2` GGUF file (OUT/model.gguf).

    ecomla convert default out/smollm2-4x --kv-rank 64 --rope-dim 32 --target deepseek-v3
    ecomla export out/smollm2-4x out/smollm2-4x-gguf --format gguf --dtype float16
    llama-cli -m out/smollm2-4x-gguf/model.gguf    # or llama_cpp.Llama(model_path=...)

The weights are the DeepSeek-V3 export's (`export.deepseek_state_dict`: softmax scale and norm eps folded, rotary
rows interleaved, lm_head untied), so the GGUF follows the same exactness rules and refusals (mla/deepseek.py), plus
the llama.cpp loader's own (`deepseek.llama_cpp_problems`). What is particular to llama.cpp's deepseek2 (read from
llama-cpp-python 0.3.36's vendored src/models/deepseek2.cpp and llama-model.cpp):
- the attention runs absorbed, as MQA over one latent head: head_count_kv 1, key_length r_kv + d_rope, value_length
  r_kv; key_length_mla / value_length_mla are the per-head d_nope + d_rope and d_v it decompresses to;
- kv_b_proj is written as attn_k_b (per head W_UK transposed: H x r_kv x d_nope) and attn_v_b (W_UV: H x d_v x r_kv);
- q_lora_rank is always written (0: a full-rank attn_q), the loader requires it;
- a dense model is leading_dense_block_count = every layer, with no expert-count keys (an expert count of 1 aborts
  the loader); expert_feed_forward_length and expert_shared_count are required, so they are written (unused);
- every RMSNorm uses the one layer_norm_rms_epsilon: the export's 1e-6, with the source's eps folded in;
- rotary: llama.cpp's normal (adjacent-pair) RoPE, the layout the DeepSeek-V3 export writes; no YaRN keys;
- the tokenizer (byte-level BPE split as SmolLM2's, Llama-3's or Qwen2's) and chat template are embedded; norms are
  F32 as llama.cpp's converter writes them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import torch

from ..common import UserError
from ..mla import deepseek
from ..mla.config import EcoMLAConfig

FILE = "model.gguf"
QTYPES = {torch.float32: gguf.GGMLQuantizationType.F32, torch.float16: gguf.GGMLQuantizationType.F16,
          torch.bfloat16: gguf.GGMLQuantizationType.BF16}  # the export's --dtype -> the GGUF's matrix type
FILE_TYPES = {gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
              gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
              gguf.GGMLQuantizationType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
              gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}
Q8_0 = "q8_0"  # export --dtype: matrices in Q8_0 blocks, written by the gguf package's own quantizer


def qtype(name: str, dtype: torch.dtype) -> gguf.GGMLQuantizationType:
    """The GGUF matrix type of an export --dtype (`name`; the float `dtype` it resolved to otherwise)."""
    return gguf.GGMLQuantizationType.Q8_0 if name == Q8_0 else QTYPES[dtype]
# a ByteLevel BPE vocab where no two digits and no space and digit ever merge: llama.cpp's "smollm" pre-tokenizer
# (digits split singly, then GPT-2's pattern, no space clean-up when decoding) splits text exactly as ByteLevel does
DIGIT_MERGE = re.compile(r"\d\d|Ġ\d")
# the Split patterns of tokenizer.json files that llama.cpp's pre-tokenizers reproduce (it writes the case-insensitive
# contractions out; llama-vocab.cpp): Llama-3's (numbers in runs of up to 3; whole words found in the vocab are not
# merged: BPE ignore_merges) and Qwen2's (single digits)
SPLIT_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        ("llama-bpe", True),
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        ("qwen2", False),
}


@dataclass
class Vocab:
    """What llama.cpp's BPE tokenizer reads from a GGUF (tokenizer.ggml.*), built from a transformers tokenizer."""
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def pre_tokenizer(spec: dict) -> str | None:
    """llama.cpp's name for the pre-tokenizer of a tokenizer.json `spec` (byte-level BPE), or None if it has none
    that splits text the same way: SmolLM2's ("smollm"), Llama-3's ("llama-bpe") or Qwen2's ("qwen2")."""
    bpe, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if (bpe.get("type") != "BPE" or bpe.get("byte_fallback") or (spec.get("decoder") or {}).get("type") != "ByteLevel"
            or (spec.get("normalizer") or {}).get("type", "NFC") != "NFC"):  # NFC: Qwen2's; llama.cpp skips it
        return None
    if pre.get("type") == "ByteLevel":  # GPT-2's pattern inside ByteLevel
        plain = (pre.get("use_regex", True) and not pre.get("add_prefix_space") and not bpe.get("ignore_merges")
                 and spec.get("normalizer") is None)
        return "smollm" if plain and not any(DIGIT_MERGE.search(t) for t in bpe["vocab"]) else None
    steps = pre.get("pretokenizers") or []
    if pre.get("type") != "Sequence" or len(steps) != 2:
        return None
    split, byte_level = steps
    if (split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert")
            or byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True)
            or byte_level.get("add_prefix_space")):
        return None
    name, ignore_merges = SPLIT_PRE.get((split.get("pattern") or {}).get("Regex"), (None, None))
    return name if name is not None and bool(bpe.get("ignore_merges")) == ignore_merges else None


def gguf_vocab(tok, vocab_size: int, model: str) -> Vocab:
    """The GGUF vocabulary of a transformers fast tokenizer, or a UserError if llama.cpp would tokenize differently."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    bpe, pre = spec.get("model") or {}, pre_tokenizer(spec)
    if pre is None:
        raise UserError(f"{model}'s tokenizer is not one the GGUF export writes (a byte-level BPE that splits text as "
                        "SmolLM2's, Llama-3's or Qwen2's); export with --format deepseek-v3 and convert that folder "
                        "with llama.cpp's convert_hf_to_gguf.py")
    ids = {**bpe["vocab"], **{a["content"]: a["id"] for a in spec.get("added_tokens", [])}}
    if max(ids.values()) >= vocab_size:
        raise UserError(f"{model}'s tokenizer has ids up to {max(ids.values())}, beyond the model's vocab of "
                        f"{vocab_size}; the GGUF export cannot write it")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # ids no token uses, as llama.cpp's converter pads them
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for text, i in bpe["vocab"].items():
        tokens[i], types[i] = text, int(gguf.TokenType.NORMAL)
    for a in spec.get("added_tokens", []):  # special ones are parsed whole only when asked (llama.cpp's CONTROL)
        tokens[a["id"]] = a["content"]
        types[a["id"]] = int(gguf.TokenType.CONTROL if a["special"] else gguf.TokenType.USER_DEFINED)
    merges = [" ".join(m) if isinstance(m, list) else m for m in bpe.get("merges", [])]
    plain, full = tok.encode("a", add_special_tokens=False), tok.encode("a")
    special = {k: getattr(tok, f"{k}_token_id") for k in ("bos", "eos", "unk", "pad")}
    return Vocab(pre=pre, tokens=tokens, types=types, merges=merges,
                 special={k: v for k, v in special.items() if v is not None},
                 add_bos=full[:1] != plain[:1] and full[0] == tok.bos_token_id,
                 add_eos=full[-1:] != plain[-1:] and full[-1] == tok.eos_token_id,
                 chat_template=tok.chat_template if isinstance(tok.chat_template, str) else None)


def split_kv_b(kv_b: torch.Tensor, H: int, d_nope: int, d_v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj (H*(d_nope+d_v), r_kv) -> attn_k_b (H, r_kv, d_nope), attn_v_b (H, d_v, r_kv): llama.cpp multiplies
    each head's query by W_UK^T (absorbed) and the attended latent by W_UV."""
    per_head = kv_b.view(H, d_nope + d_v, -1)  # [H, d_nope+d_v, r_kv]
    return per_head[:, :d_nope].transpose(1, 2).contiguous(), per_head[:, d_nope:].contiguous()


def gguf_tensors(sd: dict[str, torch.Tensor], config: EcoMLAConfig) -> dict[str, torch.Tensor]:
    """The DeepSeek-V3 state dict (export.deepseek_state_dict) under llama.cpp's deepseek2 tensor names."""
    spec, H = config.mla_spec(0), config.num_attention_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, config.num_hidden_layers)
    out = {}
    for name, w in sd.items():
        if name.endswith("kv_b_proj.weight"):
            k_b, v_b = split_kv_b(w, H, spec.qk_nope_head_dim, spec.v_head_dim)
            parts = {name.replace("kv_b_proj", "k_b_proj"): k_b, name.replace("kv_b_proj", "v_b_proj"): v_b}
        else:
            parts = {name: w}
        for hf_name, t in parts.items():
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
            if gguf_name is None:
                raise AssertionError(f"no deepseek2 GGUF name for {hf_name}")
            out[gguf_name] = t
    return out


def write_hparams(w: gguf.GGUFWriter, config: EcoMLAConfig, theta: float, eps: float) -> None:
    spec, L = config.mla_spec(0), config.num_hidden_layers
    r_kv, d_rope = spec.kv_lora_rank, spec.qk_rope_head_dim
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(L)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(1)  # absorbed MLA: one shared latent "head"
    w.add_key_length(r_kv + d_rope)
    w.add_value_length(r_kv)
    w.add_key_length_mla(spec.qk_nope_head_dim + d_rope)
    w.add_value_length_mla(spec.v_head_dim)
    w.add_q_lora_rank(spec.q_lora_rank or 0)
    w.add_kv_lora_rank(r_kv)
    w.add_rope_dimension_count(d_rope)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(eps)
    w.add_vocab_size(config.vocab_size)
    w.add_leading_dense_block_count(L)  # every layer dense
    w.add_expert_feed_forward_length(config.intermediate_size)  # required by the loader, unused when all are dense
    w.add_expert_shared_count(0)


def write_vocab(w: gguf.GGUFWriter, v: Vocab) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    w.add_token_merges(v.merges)
    for kind, i in v.special.items():
        getattr(w, {"unk": "add_unk_token_id", "pad": "add_pad_token_id"}.get(kind, f"add_{kind}_token_id"))(i)
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(v.add_eos)
    if v.chat_template:
        w.add_chat_template(v.chat_template)


def write_gguf(path: Path, name: str, config: EcoMLAConfig, tensors: dict[str, torch.Tensor], vocab: Vocab,
               qtype: gguf.GGMLQuantizationType, theta: float, eps: float) -> None:
    """Write the file: 1-D tensors (norms) in F32, the others in `qtype` (tensors are float32 here); with Q8_0, a
    matrix whose rows are not whole blocks of 32 in F16 (as llama.cpp's own converter does)."""
    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    write_hparams(w, config, theta, eps)
    w.add_file_type(FILE_TYPES[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_vocab(w, vocab)
    for tname, t in tensors.items():
        q = qtype if t.dim() > 1 else gguf.GGMLQuantizationType.F32
        if q == gguf.GGMLQuantizationType.Q8_0 and t.shape[-1] % 32:
            q = gguf.GGMLQuantizationType.F16
        w.add_tensor(tname, gguf.quants.quantize(t.float().numpy(), q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def report(config: EcoMLAConfig) -> str:
    return (f"{deepseek.latent_line(config)}\n  llama.cpp (deepseek2, any width) caches these values per token and "
            "layer at its cache type's size (f16: 2 bytes each; q8_0: 34 bytes per 32; q4_1: 20 bytes per 32)"
            + cache_tip(config))


def cache_tip(config: EcoMLAConfig) -> str:
    """What llama.cpp offers a checkpoint trained with a quantized latent (`distill --cache-bits`), as measured."""
    if config.cache_bits == 16:
        return ""
    if config.cache_bits == 8:
        return ("\n  trained for an 8-bit latent cache: llama.cpp's nearest is --cache-type-k q8_0 with flash attention "
                "(symmetric, 34 bytes per 32 values)")
    return ("\n  trained for a 4-bit latent cache: llama.cpp's q4_1 has its size (20 bytes per 32 values) but does not "
            "reproduce it (a 4x student trained for it agreed on 65% of top-1 tokens; docs/SERVING.md): serve it "
            "with the f16 or q8_0 cache there, or with ecomla's own")
