"""token_relation_loss: MiniLM v2 self-attention-relation distillation without the [heads, L, L] matrices.

Both inputs are split into ``relation_heads`` equal column slices; per slice the loss is
KL(teacher ‖ student) between the rows of softmax(X_h X_hᵀ/√d_h) (causal and padding masks respected),
averaged over valid rows and heads. The math, its gradients and the backend contract are in
``reference/token_relation.py``.

Memory: the Triton and C++ backends stream key tiles through an online softmax (flash-attention
style): the forward pass keeps per-row (max, sum, Σ p·(a^T − a^S)) for both score matrices and saves
only the row log-sum-exps; the backward pass recomputes each tile from them, once over query tiles
(row-side gradient) and once over key tiles (column-side gradient). Extra memory is O(B·H·L) plus a
few tiles, never O(L²).

Layers: the backends (registered in ``_backend`` under "token_relation_loss") → :class:`TokenRelationOptions` and
the autograd Function → ``token_relation_loss`` → ``modules.TokenRelationLoss``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from .. import _backend
from .._validate import FLOAT_DTYPES, check_bool, check_choice, check_mask, check_positive_int, check_tensor
from ..reference import token_relation as _torch_impl

OP = "token_relation_loss"
REDUCTIONS = ("mean", "sum", "none")

__all__ = ["token_relation_loss", "TokenRelationOptions", "REDUCTIONS"]


@dataclasses.dataclass(frozen=True)
class TokenRelationOptions:
    """Non-tensor options of the op; validated on construction."""

    heads: int
    causal: bool = True
    reduction: str = "mean"
    backend: str = "auto"

    def __post_init__(self):
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_choice("backend", self.backend, _backend.BACKENDS)
        check_bool("causal", self.causal)
        check_positive_int("relation_heads", self.heads)


def _cpu_tiles():
    """(query tile, key tile) rows of the C++ kernel; DISTILL_ENGINE_RELATION_TILE sets both (tests)."""
    t = os.environ.get("DISTILL_ENGINE_RELATION_TILE")
    return (int(t), int(t)) if t else (128, 256)


class TokenRelationCpuImpl:
    """The backend contract on ``_C.token_relation_forward/backward`` (csrc/cpu/token_relation.cpp): fp32,
    contiguous."""

    @staticmethod
    def forward(S, T, heads, mask, causal):
        ext = _backend.cpu_extension()
        kl, lse_s, lse_t = ext.token_relation_forward(S.float().contiguous(), T.float().contiguous(), heads,
                                                      mask.contiguous(), causal, *_cpu_tiles())
        return kl, lse_s, lse_t

    @staticmethod
    def backward(S, T, heads, mask, causal, lse_s, lse_t, c, g, need_s, need_t):
        ext = _backend.cpu_extension()
        dS, dT = ext.token_relation_backward(S.float().contiguous(), T.float().contiguous(), heads,
                                             mask.contiguous(), causal, lse_s, lse_t, c, g.contiguous(),
                                             need_s, need_t, *_cpu_tiles())
        return (dS if need_s else None), (dT if need_t else None)


_backend.register_impl(OP, "torch", _torch_impl)
_backend.register_impl(OP, "cpu", TokenRelationCpuImpl, cpu_symbol="token_relation_forward")
_backend.register_impl(OP, "triton", "distill_engine.kernels.token_relation")


def _validate(S, T, heads, mask) -> None:
    check_tensor("student_states", S, ndim=3, dtypes=FLOAT_DTYPES)
    dev = S.device
    check_tensor("teacher_states", T, ndim=3, dtypes=FLOAT_DTYPES, device=dev)
    B, L, d_s = S.shape
    if tuple(T.shape[:2]) != (B, L):
        raise ValueError(f"teacher_states has shape {tuple(T.shape)} but student_states has {tuple(S.shape)}; "
                         f"both must be [B, L, d] with the same B and L (the widths may differ)")
    for name, d in (("student_states", d_s), ("teacher_states", T.shape[2])):
        if d % heads != 0 or d == 0:
            raise ValueError(f"relation_heads={heads} does not divide {name}'s width {d}; pick a relation_heads "
                             f"that divides both widths (d_s = {d_s}, d_t = {T.shape[2]})")
    if mask is not None:
        check_mask(mask, (B, L), dev, " (attention_mask.bool())")


def _check_inputs_finite(S, T) -> None:
    """O(B·L·d) against the O(B·H·L²·d_h) loss: the kernels' max/exp are not NaN-propagating everywhere."""
    for name, x in (("teacher_states", T), ("student_states", S)):
        if not bool(torch.isfinite(x).all()):
            pos = (~torch.isfinite(x)).nonzero()[0].tolist()
            raise ValueError(f"{OP}: {name} contains non-finite values (first at [b, l, d] = {pos}); "
                             f"check the hidden states fed to the relation loss")


def _check_finite(kl: torch.Tensor) -> None:
    if not bool(torch.isfinite(kl).all()):
        raise ValueError(f"{OP}: the loss is not finite (the relation scores overflow float32); scale the states down")


class _TokenRelationFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, S, T, mask, opts: TokenRelationOptions, backend: str):
        impl = _backend.impl_for(OP, backend)
        kl, lse_s, lse_t = impl.forward(S, T, opts.heads, mask, opts.causal)  # [B, H, L] fp32 each
        _check_finite(kl)
        ctx.opts, ctx.backend = opts, backend
        ctx.save_for_backward(S, T, mask, lse_s, lse_t, kl)
        return _reduce(kl, mask, opts)

    @staticmethod
    def backward(ctx, grad_out):
        S, T, mask, lse_s, lse_t, kl = ctx.saved_tensors
        opts = ctx.opts
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        H = opts.heads
        if opts.reduction == "none":  # [B, L] head-mean per row
            g = (grad_out.float() / H)[:, None, :].expand(-1, H, -1)
        else:
            n = int(mask.sum()) * H
            scale = 1.0 / n if (opts.reduction == "mean" and n > 0) else 1.0
            g = (grad_out.float() * scale).expand(kl.shape)
        g = (g * mask[:, None, :]).contiguous()  # [B, H, L], zero on padded rows
        c = kl - lse_s + lse_t  # c_i = Σ_j P_ij (a^T_ij − a^S_ij)
        dS, dT = _backend.impl_for(OP, ctx.backend).backward(S, T, H, mask, opts.causal, lse_s, lse_t, c, g, need_s, need_t)
        return (dS.to(S.dtype) if dS is not None else None,
                dT.to(T.dtype) if dT is not None else None, None, None, None)


def _reduce(kl, mask, opts: TokenRelationOptions):
    if opts.reduction == "none":
        return kl.mean(1)  # [B, L]
    total = kl.sum()
    if opts.reduction == "mean":
        n = int(mask.sum()) * opts.heads
        total = total / n if n > 0 else total
    return total


def token_relation_loss(student_states: torch.Tensor, teacher_states: torch.Tensor, *, relation_heads: int,
                        mask: Optional[torch.Tensor] = None, causal: bool = True, reduction: str = "mean",
                        backend: str = "auto") -> torch.Tensor:
    """MiniLM v2 self-attention-relation KL between student and teacher states, fused over key tiles.

    Args:
        student_states: [B, L, d_s] (e.g. a layer's Q, K or V projection); gradients flow to it.
        teacher_states: [B, L, d_t]; d_t may differ from d_s. Gradients flow to it too when it requires them.
        relation_heads: H, dividing d_s and d_t: each input is split into H column slices of width d/H.
        mask: optional [B, L] bool, False on padding: padded positions are neither queries nor keys.
        causal: keys j ≤ i only (decoder models).
        reduction: "mean" over valid (row, head) pairs (0.0 with none valid) | "sum" | "none" ([B, L]
            head-mean per row, 0 on padding).
        backend: "auto" | "triton" | "cpu" | "torch" (see distill_engine._backend).

    Returns a float32 scalar, or [B, L] float32 for reduction="none".
    Raises ValueError on bad shapes/dtypes/devices, a relation_heads that does not divide both widths,
    an unknown option, and a non-finite loss.
    """
    opts = TokenRelationOptions(heads=relation_heads, causal=causal, reduction=reduction, backend=backend)
    _validate(student_states, teacher_states, relation_heads, mask)
    B, L, _ = student_states.shape
    dev = student_states.device
    resolved = _backend.resolve_backend(backend, dev, OP)
    _check_inputs_finite(student_states.detach(), teacher_states.detach())
    m = mask if mask is not None else torch.ones(B, L, dtype=torch.bool, device=dev)
    if torch.is_grad_enabled() and (student_states.requires_grad or teacher_states.requires_grad):
        return _TokenRelationFn.apply(student_states, teacher_states, m, opts, resolved)
    kl, _, _ = _backend.impl_for(OP, resolved).forward(student_states, teacher_states, relation_heads, m, causal)
    _check_finite(kl)
    return _reduce(kl, m, opts)
