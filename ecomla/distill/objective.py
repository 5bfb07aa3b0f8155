"""The two stage-1 objectives as one nn.Module, so accelerate/DDP/FSDP wrap a single thing; its forward
dispatches on the type of the batch.

Notation: B batch, T block length, N target tokens, D hidden, V vocabulary, L MLA layers.

- ILD (layer-wise alignment, `ILDBatch`): every MLA layer gets the *source* model's normed input to that layer
  and regresses the source attention output (o_proj included):  sum_l ||attn_l(x_l) - y_l||^2 / ||y_l||^2,
  a relative error per layer, averaged over layers. Only attention runs: no MLP, no lm_head.
- KD (end to end, `KDBatch`): the student's final hidden states at target positions go through lm_head in chunks
  against the teacher's logits (ecomla.losses.chunked_loss); forward KL by default.

Both return (loss to backpropagate, local loss sum). The loss is already normalised by the *global* count over
ranks and micro-batches (folded into `scale` by the trainer), times the world size: after DDP averages
gradients over ranks, the update equals that of one process seeing the whole global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..losses import chunked_loss
from ..mla.attention import build_mask


@dataclass
class ILDBatch:
    inputs: dict[int, torch.Tensor]  # MLA layer -> source normed attention input [B, T, D]
    targets: dict[int, torch.Tensor]  # layer -> source attention output [B, T, D]
    denoms: dict[int, torch.Tensor]  # layer -> global sum ||y_l||^2 over ranks and micro-batches
    scale: float


@dataclass
class KDBatch:
    input_ids: torch.Tensor  # [B, T]
    loss_mask: torch.Tensor  # [B, T], True at target tokens
    teacher_logits: Callable[[int, int], torch.Tensor] | None  # (lo, hi) -> [hi-lo, V] for target rows; None: CE only
    scale: float


class Objective(nn.Module):
    def __init__(self, student: nn.Module, **loss):
        """loss: options of chunked_loss (kind, temperature, kl_weight, ce_weight, chunk, compiled)."""
        super().__init__()
        self.student, self.loss = student, loss

    def forward(self, batch: ILDBatch | KDBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ild(batch) if isinstance(batch, ILDBatch) else self.kd(batch)

    def ild(self, b: ILDBatch) -> tuple[torch.Tensor, torch.Tensor]:
        x = next(iter(b.inputs.values()))
        B, T = x.shape[:2]
        pos = torch.arange(T, device=x.device)[None].expand(B, T)
        ropes = self.student.model.rotary(pos, x.dtype)  # per layer (cos, sin)
        mask = build_mask(None, T, 0, None, x.device)
        total = pos.new_zeros((), dtype=torch.float32)
        for i, x_i in b.inputs.items():
            attn = self.student.model.layers[i].self_attn
            out = attn(x_i, rope=ropes[i], attention_mask=mask, mla_path="decompressed")
            total = total + ((out.float() - b.targets[i].float()) ** 2).sum() / b.denoms[i]
        return total * b.scale / len(b.inputs), total.detach() / len(b.inputs)

    def kd(self, b: KDBatch) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.student.model(input_ids=b.input_ids, use_cache=False).last_hidden_state  # [B, T, D]
        sel = b.loss_mask[:, 1:]
        labels = b.input_ids[:, 1:][sel]  # [N]
        total, _ = chunked_loss(h[:, :-1][sel], self.student.get_output_embeddings(), b.teacher_logits, labels,
                                **self.loss)
        return total * b.scale, total.detach()
