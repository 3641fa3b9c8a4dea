"""Float64 dense oracle for ``logprobs_at`` (tests only: materialises [N, V])."""
from __future__ import annotations

from typing import Optional

import torch


def dense_logprobs_at(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, *,
                      bias: Optional[torch.Tensor] = None, temperature: float = 1.0, logit_scale=None,
                      softcap=None) -> torch.Tensor:
    """log_softmax((h Wᵀ + b) / T)[ids] in float64, differentiable by autograd. Returns [N, m] float64.
    With a logit transform: z = s·l, soft-capped to c·tanh(z/c), before T (the teacher_targets oracle)."""
    if logit_scale is not None or softcap is not None:
        from .teacher_targets import dense_teacher_logprobs

        return dense_teacher_logprobs(hidden, weight, bias, temperature, logit_scale, softcap).gather(1, ids.long())
    logits = hidden.double() @ weight.double().t()  # [N, V]
    if bias is not None:
        logits = logits + bias.double()
    return torch.log_softmax(logits / temperature, dim=1).gather(1, ids.long())  # [N, m]
