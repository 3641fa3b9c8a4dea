"""nn.Module faces of the fused losses."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .ops.distill_loss import DistillOptions, fused_distill_loss


class FusedDistillLoss(nn.Module):
    """Module form of :func:`distill_engine.fused_distill_loss`; options go to the constructor.

    forward(hidden [N, d], weight [V, d], teacher_ids [N, k], teacher_logprobs [N, k], labels=None, bias=None,
            teacher_rest_logprob=None)
    """

    def __init__(self, *, divergence: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                 ce_weight: float = 0.0, tail: str = "bucket", ignore_index: int = -100, reduction: str = "mean",
                 backend: str = "auto", validate: bool = True, chunk_rows: Optional[int] = None,
                 logit_scale: Optional[float] = None, softcap: Optional[float] = None):
        super().__init__()
        self.options = DistillOptions(divergence=divergence, beta=beta, temperature=temperature, ce_weight=ce_weight,
                                      tail=tail, ignore_index=ignore_index, reduction=reduction, backend=backend,
                                      validate=validate, chunk_rows=chunk_rows, logit_scale=logit_scale,
                                      softcap=softcap)
        from .ops.logit_transform import check_transform

        check_transform(logit_scale, softcap)
        self.options.check()  # fail at construction, not at the first batch

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, teacher_ids: torch.Tensor,
                teacher_logprobs: torch.Tensor, labels: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None,
                teacher_rest_logprob: Optional[torch.Tensor] = None) -> torch.Tensor:
        o = self.options
        return fused_distill_loss(hidden, weight, teacher_ids, teacher_logprobs, labels=labels, bias=bias,
                                  teacher_rest_logprob=teacher_rest_logprob,
                                  divergence=o.divergence, beta=o.beta, temperature=o.temperature,
                                  ce_weight=o.ce_weight, tail=o.tail, ignore_index=o.ignore_index,
                                  reduction=o.reduction, backend=o.backend, validate=o.validate,
                                  chunk_rows=o.chunk_rows, logit_scale=o.logit_scale, softcap=o.softcap)

    def extra_repr(self) -> str:
        o = self.options
        return f"divergence={o.divergence!r}, tail={o.tail!r}, temperature={o.temperature}, ce_weight={o.ce_weight}"
