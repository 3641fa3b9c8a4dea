"""PyTorch implementations for the projection loss (feature distillation).

* The ``torch`` backend of ``fused_projection_loss``: the per-chunk contract of
  ``ops/projection_loss.py`` written with plain torch ops, so memory stays bounded by one fp32
  [chunk, d_t] buffer (plus, for low-precision teachers, its fp32 copy).
* ``dense_projection_loss``: the float64 dense oracle used by the tests. It builds the full [N, d_t]
  projection and lets autograd differentiate the definitions, so it shares no gradient algebra with
  the fused paths.

Per row (y = P h + b, t the teacher state, both [d_t]):

* ``mse``:    L = ||y − t||² / d_t
* ``cosine``: L = 1 − ⟨y, t⟩ / (||y|| ||t||); when ||y||² or ||t||² is at most ``ZERO_NORM_SQ`` the row
  counts as cosine 0, i.e. L = 1 with a zero gradient.
"""
from __future__ import annotations

from typing import Optional

import torch

KINDS = ("mse", "cosine")
REDUCTIONS = ("mean", "sum", "none")
# A vector whose squared norm is at or below this counts as the zero vector for the cosine loss. It is
# tiny (norm ≈ 8.9e-16) but far above float32's smallest normal, so 1/||y||² (≤ 2^100) stays finite and
# the cosine gradient of every other row is finite too.
ZERO_NORM_SQ = 2.0**-100


# ----------------------------------------------------------------------------------------------
# torch backend: the chunk-level contract
# ----------------------------------------------------------------------------------------------
def prepare(weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """Weights as the chunk function wants them: float32 (the torch backend computes in float32)."""
    return weight.float(), (None if bias is None else bias.float())


def projection_chunk(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], t: torch.Tensor, kind: str,
                     zero_norm_sq: float, row_scale: Optional[torch.Tensor], dW_acc: Optional[torch.Tensor],
                     db_acc: Optional[torch.Tensor], dh_out: Optional[torch.Tensor]):
    """Loss of one row chunk and, when ``row_scale`` is given, its gradient products.

    h [c, d_s], weight [d_t, d_s] fp32, bias [d_t] fp32 | None, t [c, d_t].
    row_scale [c] fp32: the gradient of row n is row_scale[n] · dL_n/dy (None: forward only).
    Accumulates dW_acc += gᵀ h and db_acc += Σ_rows g (fp32), writes dh_out = g P.
    Returns (loss [c] fp32, nonfinite_teacher [c] bool).
    """
    d_t = weight.shape[0]
    h32 = h.float()
    y = torch.addmm(bias, h32, weight.t()) if bias is not None else h32 @ weight.t()  # [c, d_t]: the chunk buffer
    t32 = t.float()
    bad_t = ~torch.isfinite(t32).all(dim=1)  # [c]
    if kind == "mse":
        y.sub_(t32)  # r = y − t
        loss = torch.linalg.vecdot(y, y) / d_t  # [c]
        if row_scale is not None:
            y.mul_((row_scale * (2.0 / d_t))[:, None])  # g = 2 r / d_t, scaled per row
    else:
        dot = torch.linalg.vecdot(y, t32)  # [c]
        yy = torch.linalg.vecdot(y, y)
        tt = torch.linalg.vecdot(t32, t32)
        zero = (yy <= zero_norm_sq) | (tt <= zero_norm_sq)
        inv_y = torch.where(zero, torch.zeros_like(yy), torch.rsqrt(yy.clamp_min(zero_norm_sq)))
        inv_t = torch.where(zero, torch.zeros_like(tt), torch.rsqrt(tt.clamp_min(zero_norm_sq)))
        cos = dot * inv_y * inv_t  # 0 on zero-norm rows
        loss = 1.0 - cos
        if row_scale is not None:
            # dL/dy = cos·y/||y||² − t/(||y|| ||t||)
            alpha = row_scale * cos * inv_y * inv_y
            beta = -row_scale * inv_y * inv_t
            y.mul_(alpha[:, None]).add_(t32 * beta[:, None])
    del t32
    if row_scale is not None:
        g = y
        if dh_out is not None:
            dh_out.copy_(g @ weight)  # [c, d_s]
        if dW_acc is not None:
            dW_acc.addmm_(g.t(), h32)
        if db_acc is not None:
            db_acc.add_(g.sum(0))
    return loss, bad_t


# ----------------------------------------------------------------------------------------------
# float64 dense oracle (tests only: materialises [N, d_t])
# ----------------------------------------------------------------------------------------------
def dense_projection_loss(student_hidden, proj_weight, teacher_hidden, *, proj_bias=None, kind="mse", mask=None,
                          reduction="mean", zero_norm_sq: float = ZERO_NORM_SQ) -> torch.Tensor:
    """The definitions of issue 4 on the full float64 projection; differentiate with autograd.

    Inputs keep their autograd graph (they are cast with ``.double()``), so gradients flow back to the
    caller's tensors. Returns a float64 scalar (mean/sum) or [*lead] per-row losses (none, 0 where masked).
    """
    lead = student_hidden.shape[:-1]
    h = student_hidden.double().reshape(-1, student_hidden.shape[-1])
    t = teacher_hidden.double().reshape(-1, teacher_hidden.shape[-1]).detach()
    y = h @ proj_weight.double().t()
    if proj_bias is not None:
        y = y + proj_bias.double()
    d_t = y.shape[1]
    if kind == "mse":
        per_row = ((y - t) ** 2).sum(1) / d_t
    elif kind == "cosine":
        yy = (y * y).sum(1)
        tt = (t * t).sum(1)
        zero = (yy <= zero_norm_sq) | (tt <= zero_norm_sq)
        # Safe denominators keep the unselected branch finite, so torch.where passes a zero gradient.
        den = torch.sqrt(torch.where(zero, torch.ones_like(yy), yy) * torch.where(zero, torch.ones_like(tt), tt))
        cos = torch.where(zero, torch.zeros_like(yy), (y * t).sum(1) / den)
        per_row = 1.0 - cos
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    keep = torch.ones(per_row.shape[0], dtype=torch.bool) if mask is None else mask.reshape(-1).cpu()
    keep = keep.to(per_row.device)
    per_row = torch.where(keep, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row.reshape(lead)
    total = per_row.sum()
    if reduction == "sum":
        return total
    count = int(keep.sum())
    return total / count if count > 0 else total * 0.0
