"""Chat-template rendering with an assistant-token mask, and packing into fixed-length blocks.

    blocks = PackedChat(split["train"], tok, seq_len=256, seed=0)
    batch = blocks.batch(start=0, size=4)   # {"input_ids": [4, 256], "loss_mask": [4, 256]}
    mixed = MixedBlocks(blocks, PackedText(texts, tok, 256), share=0.25)   # every 4th block plain text

A block is `seq_len` consecutive tokens of concatenated conversations (visited in a seeded order, then
again in a new order for the next epoch). `loss_mask[t]` marks tokens that are targets: assistant
turns (content and end-of-turn) when `mask_prompt`, every token otherwise. A training stream
(`skip_untargeted`) leaves out the blocks with no target token (the middle of a long prompt): each would cost a
whole step and teach nothing. Block k is a pure function of (dataset, tokenizer, seq_len, seed, k), which is what
makes training runs resumable. Plain texts pack
the same way (`PackedText`: EOS after each, every token a target), and `MixedBlocks` interleaves two streams.
"""

from __future__ import annotations

import math
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


class Blocks:
    """A stream of fixed-length blocks, block k a pure function of k; batches are consecutive blocks."""

    def block(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:  # ([T] token ids, [T] target mask)
        raise NotImplementedError

    def batch(self, start: int, size: int) -> dict[str, torch.Tensor]:
        blocks = [self.block(k) for k in range(start, start + size)]
        return {"input_ids": torch.stack([b[0] for b in blocks]).long(),
                "loss_mask": torch.stack([b[1] for b in blocks])}

    def take_tokens(self, max_target_tokens: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """Batches from block 0 until at least `max_target_tokens` target tokens (evaluation sets)."""
        out, k, n = [], 0, 0
        while n < max_target_tokens:
            b = self.batch(k, batch_size)
            out.append(b)
            n += int(b["loss_mask"][:, 1:].sum())
            k += batch_size
        return out


class PackedDocuments(Blocks):
    """Documents concatenated in a seeded order (a new order each epoch) and cut into `seq_len` blocks; subclasses
    say how a document renders into (token ids, target mask)."""

    def __init__(self, docs, tok, seq_len: int, seed: int = 0, skip_untargeted: bool = False):
        if len(docs) == 0:
            raise UserError("cannot pack an empty dataset: the data has no usable conversation or text")
        self.docs, self.tok, self.seq_len, self.seed = docs, tok, seq_len, seed
        self.skip_untargeted, self._kept_epoch = skip_untargeted, 0
        self._blocks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._ids: list[int] = []
        self._mask: list[int] = []
        self._epoch, self._order, self._pos = 0, self._shuffled(0), 0

    def render(self, doc) -> tuple[list[int], list[int]]:
        raise NotImplementedError

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.docs)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _next_document(self) -> None:
        if self._pos == len(self._order):
            self._epoch += 1
            self._order, self._pos = self._shuffled(self._epoch), 0
        ids, mask = self.render(self.docs[self._order[self._pos]])
        self._pos += 1
        self._ids += ids
        self._mask += mask

    def block(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self._blocks) <= k:
            while len(self._ids) < self.seq_len:
                self._next_document()
            n = self.seq_len
            ids, mask = torch.tensor(self._ids[:n], dtype=torch.int32), torch.tensor(self._mask[:n], dtype=torch.bool)
            self._ids, self._mask = self._ids[n:], self._mask[n:]
            if self.skip_untargeted and not mask[1:].any():  # token 0 of a block is no target: nothing predicts it
                if self._epoch > self._kept_epoch + 1:
                    raise UserError(f"no block of {n} tokens of the data has a target token; use longer --seq-len")
                continue
            self._kept_epoch = self._epoch
            self._blocks.append((ids, mask))
        return self._blocks[k]


class PackedChat(PackedDocuments):
    """Conversations (rows with `messages`) rendered with the chat template (see module docstring)."""

    def __init__(self, ds, tok, seq_len: int, seed: int = 0, mask_prompt: bool = True, skip_untargeted: bool = False):
        super().__init__(ds, tok, seq_len, seed, skip_untargeted)
        self.mask_prompt = mask_prompt

    def render(self, doc) -> tuple[list[int], list[int]]:
        return render(self.tok, doc["messages"], self.mask_prompt)


class PackedText(PackedDocuments):
    """Plain texts, each followed by EOS, every token a target."""

    def render(self, doc: str) -> tuple[list[int], list[int]]:
        ids = text_ids(self.tok, doc)
        return ids, [1] * len(ids)


class MixedBlocks(Blocks):
    """`main`'s blocks with a `share` of the stream taken from `extra`, spread evenly: block k comes from extra
    when floor((k+1) share) > floor(k share). Still a pure function of k, so a resumed run sees the same stream."""

    def __init__(self, main: Blocks, extra: Blocks, share: float):
        if not 0 < share < 1:
            raise ValueError(f"share must be in (0, 1), got {share}")
        self.main, self.extra, self.share = main, extra, share

    def block(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        before, through = math.floor(k * self.share), math.floor((k + 1) * self.share)
        return self.extra.block(before) if through > before else self.main.block(k - before)


def text_ids(tok, text: str) -> list[int]:
    """A plain text's token ids followed by EOS (when the tokenizer has one): how texts are joined everywhere."""
    eos = tok.eos_token_id
    return tok(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])


def text_batches(texts: list[str], tok, seq_len: int, max_tokens: int, batch_size: int) -> list[dict]:
    """Non-overlapping `seq_len` windows over the concatenated texts (EOS-separated), every token a target."""
    ids: list[int] = []
    for t in texts:
        ids += text_ids(tok, t)
        if len(ids) >= max_tokens + seq_len:
            break
    n_blocks = max(1, min(len(ids) // seq_len, -(-max_tokens // (seq_len - 1))))
    if len(ids) < seq_len:
        raise UserError(f"only {len(ids)} tokens of text; need at least --seq-len {seq_len}")
    blocks = torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)
    return [{"input_ids": blocks[i : i + batch_size], "loss_mask": torch.ones_like(blocks[i : i + batch_size], dtype=torch.bool)}
            for i in range(0, n_blocks, batch_size)]
