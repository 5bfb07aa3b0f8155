"""The two stage-1 objectives as one nn.Module, so accelerate/DDP/FSDP wrap a single thing.

Notation: B batch, T block length, N target tokens, D hidden, L MLA layers.

- ILD (layer-wise alignment): every MLA layer gets the *source* model's normed input to that layer and
  regresses the source attention output (o_proj included):  sum_l ||attn_l(x_l) - y_l||^2 / ||y_l||^2,
  a relative error per layer, averaged over layers. Only attention runs: no MLP, no lm_head.
- KD (end to end): the student's final hidden states at target positions go through lm_head in chunks
  against the teacher's logits (ecomla.losses.chunked_loss); forward KL by default.

Both return (loss to backpropagate, local loss sum, local count). The loss is already normalised by the
*global* count over ranks and micro-batches (passed in), times the world size: after DDP averages
gradients over ranks, the update equals that of one process seeing the whole global batch.
"""

from __future__ import annotations

import torch
from torch import nn

from ..losses import chunked_loss
from ..mla.attention import MLAAttention, build_mask


class Objective(nn.Module):
    def __init__(self, student: nn.Module, loss_kind: str = "forward", temperature: float = 1.0,
                 kl_weight: float = 1.0, ce_weight: float = 0.0, chunk: int = 1024,
                 compile_loss: bool = False):
        super().__init__()
        self.student = student
        self.loss_kind, self.temperature = loss_kind, temperature
        self.kl_weight, self.ce_weight, self.chunk = kl_weight, ce_weight, chunk
        self.compile_loss = compile_loss

    def mla_layers(self) -> list[tuple[int, MLAAttention]]:
        return [(i, layer.self_attn) for i, layer in enumerate(self.student.model.layers)
                if isinstance(layer.self_attn, MLAAttention)]

    def forward(self, mode: str, **kw):
        return self.ild(**kw) if mode == "ild" else self.kd(**kw)

    def ild(self, inputs: dict[int, torch.Tensor], targets: dict[int, torch.Tensor], denoms: dict[int, torch.Tensor],
            scale: float):
        """inputs/targets: layer -> [B, T, D] from the source model; denoms: layer -> global sum ||y_l||^2."""
        B, T = next(iter(inputs.values())).shape[:2]
        pos = torch.arange(T, device=next(iter(inputs.values())).device)[None].expand(B, T)
        mask = build_mask(None, T, 0, None, pos.device)
        total = pos.new_zeros((), dtype=torch.float32)
        for i, attn in self.mla_layers():
            out = attn(inputs[i], position_ids=pos, attention_mask=mask, mla_path="decompressed")
            total = total + ((out.float() - targets[i].float()) ** 2).sum() / denoms[i]
        n_layers = len(self.mla_layers())
        return total * scale / n_layers, total.detach() / n_layers, 1

    def kd(self, input_ids: torch.Tensor, loss_mask: torch.Tensor, teacher_logits_fn, scale: float):
        """input_ids [B, T]; loss_mask [B, T] (targets); teacher_logits_fn(lo, hi) -> [hi-lo, V] for target rows."""
        h = self.student.model(input_ids=input_ids, use_cache=False).last_hidden_state  # [B, T, D]
        sel = loss_mask[:, 1:]
        labels = input_ids[:, 1:][sel]  # [N]
        total, n = chunked_loss(h[:, :-1][sel], self.student.get_output_embeddings(), teacher_logits_fn, labels,
                                self.loss_kind, self.temperature, self.kl_weight, self.ce_weight, self.chunk,
                                compiled=self.compile_loss)
        return total * scale, total.detach(), n
