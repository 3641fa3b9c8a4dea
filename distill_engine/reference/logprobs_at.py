"""Float64 dense oracle for ``logprobs_at`` (tests only: materialises [N, V])."""
from __future__ import annotations

from typing import Optional

import torch


def dense_logprobs_at(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, *,
                      bias: Optional[torch.Tensor] = None, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax((h Wᵀ + b) / T)[ids] in float64, differentiable by autograd. Returns [N, m] float64."""
    logits = hidden.double() @ weight.double().t()  # [N, V]
    if bias is not None:
        logits = logits + bias.double()
    return torch.log_softmax(logits / temperature, dim=1).gather(1, ids.long())  # [N, m]
