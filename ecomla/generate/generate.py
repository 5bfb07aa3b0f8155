"""`ecomla generate DIR --prompt TEXT`: greedy generation through HF `generate()` with the latent cache.

    ecomla generate out/smollm2-4x --chat --prompt "What is the capital of France?" --json

Reports the cache bytes per token read from the live cache object that generate() filled. An MLA model is
prepared for decoding first (`model.prepare_for_decode()`: folded weights, the decode kernel); `--cache-bits 4`
quantizes its latent cache (`ecomla.mla.quant`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from ..args import arg
from ..common import DTYPES, UserError
from ..io import load_model, load_tokenizer
from ..mla import EcoMLAForCausalLM
from ..mla.cache import cache_stats
from ..mla.model import with_cache_bits
from ..mla.quant import CACHE_BITS_HELP, check_cache_bits


@dataclass
class GenerateArgs:
    model: str = arg("checkpoint folder (MLA or source), hub id, or 'default'", positional=True)
    prompt: list[str] = arg("prompt text; several (--prompt A B, or --prompt A --prompt B) make a left-padded batch "
                            "with one answer each", nargs="+", default=[])
    chat: bool = arg("wrap the prompt in the tokenizer's chat template", default=False)
    max_new_tokens: int = arg("tokens to generate", default=64)
    json: bool = arg("print one JSON object instead of text", default=False)
    dtype: str = arg("float32 | bfloat16 | auto", default="float32")
    cache_bits: int | None = arg(CACHE_BITS_HELP, default=None)

    def __post_init__(self):
        if isinstance(self.prompt, str):
            self.prompt = [self.prompt]
        if not self.prompt:
            raise UserError("give at least one --prompt")
        empty = [i + 1 for i, p in enumerate(self.prompt) if not p.strip()]
        if empty:
            raise UserError(f"--prompt number {empty[0]} of {len(self.prompt)} is empty; give it some text")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.dtype not in ("auto", *DTYPES):
            raise UserError(f"--dtype {self.dtype!r}: choose from auto, {', '.join(DTYPES)}")
        check_cache_bits(self.cache_bits)


def encode(tok, prompts: list[str], chat: bool) -> dict:
    if chat:
        if not getattr(tok, "chat_template", None):
            raise UserError("--chat needs a tokenizer with a chat template")
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                   for p in prompts]
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat)


def check_lengths(enc: dict, config, max_new_tokens: int) -> None:
    """Refuse a prompt that, with the new tokens, runs past the model's positions (transformers would only warn,
    then generate from positions the model never saw)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return
    for i, n in enumerate(enc["attention_mask"].sum(1).tolist()):
        if n > limit:
            raise UserError(f"--prompt number {i + 1} is {n} tokens, longer than the model's {limit} positions; "
                            "shorten it")
        if n + max_new_tokens > limit:
            raise UserError(f"--max-new-tokens {max_new_tokens}: prompt number {i + 1} ({n} tokens) leaves room for "
                            f"{limit - n} new tokens in the model's {limit} positions")


@torch.inference_mode()
def generate(model, tok, prompts: list[str], chat: bool = False, max_new_tokens: int = 64) -> dict:
    """Greedy generation; returns texts, token counts, tokens/s and cache bytes measured on the live cache."""
    enc = encode(tok, prompts, chat).to(model.device)
    check_lengths(enc, model.config, max_new_tokens)
    t0 = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                         pad_token_id=tok.pad_token_id)
    dt = time.perf_counter() - t0
    new = out.sequences[:, enc["input_ids"].shape[1]:]
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    stats = cache_stats(cache) if cache is not None else {}
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    lengths = [next((i + 1 for i, t in enumerate(row.tolist()) if t in eos), row.numel()) for row in new]
    return {
        "text": [tok.decode(row, skip_special_tokens=True) for row in new],
        "new_tokens": lengths,
        "tokens_per_s": float(new.numel() / dt),
        "seconds": dt,
        "cache_bytes_per_token": stats.get("bytes_per_token"),
        "cache_live_bytes": stats.get("live_bytes"),
        "cache_seq_len": stats.get("seq_len"),
    }


def prepared(model):
    """`model` ready to decode: an MLA model gets its one-time decode preparation, any other model is unchanged."""
    return model.prepare_for_decode() if isinstance(model, EcoMLAForCausalLM) else model


def generate_text(args: GenerateArgs) -> dict:
    model, path = load_model(args.model, dtype=args.dtype)
    model = prepared(with_cache_bits(model, args.cache_bits, args.model))
    tok = load_tokenizer(path)
    res = generate(model, tok, args.prompt, args.chat, args.max_new_tokens)
    if len(args.prompt) == 1:
        res["text"], res["new_tokens"] = res["text"][0], res["new_tokens"][0]
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for t in ([res["text"]] if isinstance(res["text"], str) else res["text"]):
            print(t)
        print(f"[{res['tokens_per_s']:.1f} tokens/s, cache {res['cache_bytes_per_token']} B/token]")
    return res
