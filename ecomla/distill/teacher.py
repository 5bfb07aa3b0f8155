"""What the frozen teacher / source model provides to the student during stage 1.

- `attention_io`: for ILD, each layer's normed attention input and attention output of the *source* model.
- `TeacherLogits`: for KD, the teacher's logits at the student's target rows, either from a live teacher
  (final hidden states once per batch, lm_head applied per chunk) or from a top-k cache on disk.
- `TopKCache`: the teacher's top-k log-probabilities per target token, computed once per (teacher, data,
  block) and reused by later runs (e.g. students of several ratios distilled from one teacher share one cache).

Notation: B batch, T block length, N target tokens, V vocabulary, K top-k.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..outputs import clean_stale, temp_path


@torch.no_grad()
def attention_io(source, input_ids: torch.Tensor, layers: list[int]) -> tuple[dict, dict]:
    """{layer: normed input [B, T, D]}, {layer: attention output [B, T, D]} of an HF causal LM."""
    inputs, outputs, handles = {}, {}, []
    blocks = getattr(source, source.base_model_prefix).layers
    for i in layers:
        attn = blocks[i].self_attn

        def pre(_m, args, kwargs, i=i):
            inputs[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        def post(_m, _args, out, i=i):
            outputs[i] = out[0] if isinstance(out, tuple) else out

        handles += [attn.register_forward_pre_hook(pre, with_kwargs=True), attn.register_forward_hook(post)]
    try:
        getattr(source, source.base_model_prefix)(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return inputs, outputs


class TeacherLogits:
    """Teacher logits for the target rows of one batch, produced chunk by chunk."""

    def __init__(self, teacher, input_ids: torch.Tensor, loss_mask: torch.Tensor):
        with torch.no_grad():
            h = getattr(teacher, teacher.base_model_prefix)(input_ids=input_ids, use_cache=False).last_hidden_state
            self.hidden = h[:, :-1][loss_mask[:, 1:]]  # [N, D]
        self.head = teacher.get_output_embeddings()

    @torch.no_grad()
    def __call__(self, lo: int, hi: int) -> torch.Tensor:
        return self.head(self.hidden[lo:hi]).float()


class SparseTeacher:
    """Teacher "logits" rebuilt from cached top-k log-probs: -inf outside the top k, so softmax renormalises
    over the top k (the usual top-k KD approximation)."""

    def __init__(self, values: torch.Tensor, indices: torch.Tensor, vocab: int):
        self.values, self.indices, self.vocab = values, indices, vocab  # [N, K]

    def __call__(self, lo: int, hi: int) -> torch.Tensor:
        out = torch.full((hi - lo, self.vocab), float("-inf"), device=self.values.device)
        return out.scatter_(1, self.indices[lo:hi].long(), self.values[lo:hi].float())


class TopKCache:
    """Per-block teacher top-k log-probs on disk: <root>/<key>/block-<k>.pt with values/indices [n_k, K]."""

    def __init__(self, root: Path, teacher_id: str, data_id: str, seq_len: int, seed: int, k: int,
                 mask_prompt: bool):
        # "targeted": blocks without a target token are left out of the stream (a cache of the earlier stream,
        # with them, has other blocks under the same numbers)
        key = json.dumps([teacher_id, data_id, seq_len, seed, k, mask_prompt, "targeted"])
        self.dir = Path(root) / hashlib.sha1(key.encode()).hexdigest()[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "key.json").write_text(key)
        self.k, self.cleaned = k, False

    def path(self, block: int) -> Path:
        return self.dir / f"block-{block:07d}.pt"

    @torch.no_grad()
    def fill(self, teacher, packed, blocks: range, batch_size: int, device) -> None:
        missing = [b for b in blocks if not self.path(b).is_file()]
        if missing and not self.cleaned:  # once for the folder, not once a block or a step
            clean_stale(self.dir, every=True)
            self.cleaned = True
        for lo in range(0, len(missing), batch_size):
            chunk = missing[lo : lo + batch_size]
            ids = torch.stack([packed.block(b)[0] for b in chunk]).long().to(device)
            mask = torch.stack([packed.block(b)[1] for b in chunk]).to(device)
            h = getattr(teacher, teacher.base_model_prefix)(input_ids=ids, use_cache=False).last_hidden_state
            for j, b in enumerate(chunk):
                logp = torch.log_softmax(teacher.get_output_embeddings()(h[j, :-1][mask[j, 1:]]).float(), -1)
                v, i = logp.topk(self.k, dim=-1)
                tmp = temp_path(self.path(b), clean=False)  # several runs may fill one cache at once
                torch.save({"values": v.to(torch.bfloat16).cpu(), "indices": i.to(torch.int32).cpu()}, tmp)
                tmp.replace(self.path(b))

    def load(self, blocks: list[int], vocab: int, device) -> SparseTeacher:
        parts = [torch.load(self.path(b), weights_only=True) for b in blocks]
        return SparseTeacher(torch.cat([p["values"] for p in parts]).to(device),
                             torch.cat([p["indices"] for p in parts]).to(device), vocab)
