"""Tiny models and tokenizers for tests (seconds on CPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast
from transformers import Qwen2Config, Qwen2ForCausalLM

WORDS = ("the a an is are was of to and in on for with you I it that this what how why who capital city "
         "France Paris Rome Italy hello world cat dog sat mat red blue green one two three four five six seven "
         "eight nine ten user assistant system question answer yes no good bad big small tell me about please "
         "thanks ocean poem write short long story time day night sun moon star sky water fire earth air").split()
SPECIAL = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB = 128
BPE_VOCAB = 320  # 4 special tokens, 256 bytes, 60 merges


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIAL + sorted(set(WORDS) | {"\n", ".", ",", "?", "!"}))}
    for i in range(len(vocab), VOCAB):
        vocab[f"<extra_{i}>"] = i
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_bpe_tokenizer(vocab_size: int = BPE_VOCAB, style: str = "smollm") -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on WORDS (and a few numbers), split as SmolLM2's tokenizer splits text (GPT-2's
    pattern inside ByteLevel), or with `style` "llama3" / "qwen2" as theirs do (tokenizer.json's Split pattern, then
    ByteLevel without its own; Llama-3's BPE ignores merges for whole words in the vocab, Qwen2's normalizes to
    NFC): the pre-tokenizers the GGUF export can write."""
    from ecomla.export.llama_cpp import SPLIT_PRE

    tk = Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    if style == "smollm":
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        pattern = next(p for p, (name, _) in SPLIT_PRE.items() if name == {"llama3": "llama-bpe"}.get(style, style))
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        if style == "qwen2":
            tk.normalizer = normalizers.NFC()
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    numbers = "" if style == "smollm" else " 2024 365 1234567 42"  # SmolLM2's vocab merges no digits
    tk.train_from_iterator([" ".join(WORDS[i:] + WORDS[:i]) + numbers for i in range(len(WORDS))], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(family: str, **kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)
    base.update(kw)
    if family == "llama":
        return LlamaConfig(**{"head_dim": 16, **base})
    if family == "mistral":
        return MistralConfig(**{"head_dim": 16, "sliding_window": None, **base})
    if family == "qwen2":
        return Qwen2Config(**base)
    raise ValueError(family)


MODEL_CLASSES = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM}


def make_source(family: str, out: Path, seed: int = 0, tokenizer=make_tokenizer, **kw) -> Path:
    """A tiny random source checkpoint + tokenizer in `out`. Biases (Qwen2) are made non-trivial. With
    `tokenizer=make_bpe_tokenizer` the vocab is that tokenizer's."""
    torch.manual_seed(seed)
    if tokenizer is make_bpe_tokenizer:
        kw.setdefault("vocab_size", BPE_VOCAB)
    model = MODEL_CLASSES[family](tiny_config(family, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    model.save_pretrained(out)
    tokenizer().save_pretrained(out)
    return Path(out)


def snapshot(*roots: Path) -> dict[str, str | tuple]:
    """{path: '<dir>' or (sha256 of its bytes, mtime in ns)} of everything under `roots`, hidden files (the run
    lock) included: pre-existing files must come out of a refused command byte-identical and unwritten (a rewrite
    with the same bytes moves the mtime), and nothing may appear or vanish."""
    import hashlib

    out = {}
    for root in roots:
        root = Path(root)
        for p in [root, *sorted(root.rglob("*"))] if root.exists() else []:
            out[str(p)] = "<dir>" if p.is_dir() else (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def assert_refused(argv: list[str], capsys, monkeypatch, says: str, roots: tuple = ()) -> str:
    """`ecomla ARGV` is a user error: exit 2, one line `ecomla STAGE: error: ...` matching the regex `says` on
    stderr, no traceback, no model forward pass before the refusal (heavy compute), every file and folder under
    `roots` unchanged in bytes and mtime (`snapshot`), the run lock included. Returns the message."""
    import re

    from ecomla.cli import main

    def no_forward(self, *a, **k):
        raise AssertionError(f"{type(self).__name__} ran a forward pass before the input was refused")

    before = snapshot(*roots)
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(torch.nn.Module, "__call__", no_forward)
        rc = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(f"ecomla {argv[0]}: error:")]
    assert rc == 2, f"exit {rc}, stderr:\n{err}"
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.search(says, errors[0]), errors[0]
    after = snapshot(*roots)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a refused command changed {changed}"
    if os.environ.get("ECOMLA_REFUSALS"):  # tools/refusal_table.py collects the messages for the docs
        import json

        with open(os.environ["ECOMLA_REFUSALS"], "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", ""), "message": errors[0]}) + "\n")
    return errors[0]


def untimed(out: Path) -> list[dict]:
    """A distill run's metrics rows without what the clock decides (tokens/s, elapsed seconds, minutes): what a
    resumed run must reproduce bit for bit."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    drop = ("tokens_per_s", "elapsed_s", "minutes")
    return [{k: v for k, v in r.items() if k not in drop} if "final" not in r
            else {"final": {k: v for k, v in r["final"].items() if k not in drop}} for r in rows]
