"""Chat-template rendering with an assistant-token mask, and packing into fixed-length blocks.

    blocks = PackedChat(split["train"], tok, seq_len=256, seed=0)
    batch = blocks.batch(start=0, size=4)   # {"input_ids": [4, 256], "loss_mask": [4, 256]}

A block is `seq_len` consecutive tokens of concatenated conversations (visited in a seeded order, then
again in a new order for the next epoch). `loss_mask[t]` marks tokens that are targets: assistant
turns (content and end-of-turn) when `mask_prompt`, every token otherwise. Block k is a pure
function of (dataset, tokenizer, seq_len, seed, k), which is what makes training runs resumable.
"""

from __future__ import annotations

import random
import warnings

import torch

from ..common import UserError


def render(tok, messages: list[dict], mask_prompt: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of the chat rendering and a 0/1 target mask (assistant tokens, or all when not mask_prompt)."""
    text = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if not mask_prompt:
        return ids, [1] * len(ids)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through)):
            warnings.warn("chat template is not prefix-stable; training on all tokens of this conversation")
            return ids, [1] * len(ids)
        spans.append((len(before), len(through)))
    mask = [int(any(s <= a < e for s, e in spans)) for a, _b in enc["offset_mapping"]]
    return ids, mask


class PackedChat:
    """Deterministic fixed-length blocks from a chat dataset (see module docstring)."""

    def __init__(self, ds, tok, seq_len: int, seed: int = 0, mask_prompt: bool = True):
        if len(ds) == 0:
            raise UserError("cannot pack an empty dataset: the data has no usable conversation")
        self.ds, self.tok, self.seq_len, self.seed, self.mask_prompt = ds, tok, seq_len, seed, mask_prompt
        self._blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._ids: list[int] = []
        self._mask: list[int] = []
        self._epoch, self._order, self._pos = 0, self._shuffled(0), 0

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.ds)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _next_conversation(self) -> None:
        if self._pos == len(self._order):
            self._epoch += 1
            self._order, self._pos = self._shuffled(self._epoch), 0
        ids, mask = render(self.tok, self.ds[self._order[self._pos]]["messages"], self.mask_prompt)
        self._pos += 1
        self._ids += ids
        self._mask += mask

    def block(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self._blocks) <= k:
            while len(self._ids) < self.seq_len:
                self._next_conversation()
            n = self.seq_len
            self._blocks.append((torch.tensor(self._ids[:n], dtype=torch.int32),
                                 torch.tensor(self._mask[:n], dtype=torch.bool)))
            self._ids, self._mask = self._ids[n:], self._mask[n:]
        return self._blocks[k]

    def batch(self, start: int, size: int) -> dict[str, torch.Tensor]:
        blocks = [self.block(k) for k in range(start, start + size)]
        return {"input_ids": torch.stack([b[0] for b in blocks]).long(), "loss_mask": torch.stack([b[1] for b in blocks])}

    def take_tokens(self, max_target_tokens: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """Batches from block 0 until at least `max_target_tokens` target tokens (evaluation sets)."""
        out, k, n = [], 0, 0
        while n < max_target_tokens:
            b = self.batch(k, batch_size)
            out.append(b)
            n += int(b["loss_mask"][:, 1:].sum())
            k += batch_size
        return out


def text_batches(texts: list[str], tok, seq_len: int, max_tokens: int, batch_size: int) -> list[dict]:
    """Non-overlapping `seq_len` windows over the concatenated texts (EOS-separated), every token a target."""
    eos = tok.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        if len(ids) >= max_tokens + seq_len:
            break
    n_blocks = max(1, min(len(ids) // seq_len, -(-max_tokens // (seq_len - 1))))
    if len(ids) < seq_len:
        raise UserError(f"only {len(ids)} tokens of text; need at least --seq-len {seq_len}")
    blocks = torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)
    return [{"input_ids": blocks[i : i + batch_size], "loss_mask": torch.ones_like(blocks[i : i + batch_size], dtype=torch.bool)}
            for i in range(0, n_blocks, batch_size)]
