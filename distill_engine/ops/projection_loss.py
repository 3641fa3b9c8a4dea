"""fused_projection_loss: learned projection + hidden-state matching loss without the [N, d_t] projection.

Feature distillation (issue 4) matches a student state h [d_s] to a teacher state t [d_t] through a
learned projection P [d_t, d_s] (and bias b [d_t]). Per row, with y = P h + b:

    mse:    L = ||y − t||² / d_t                     dL/dy = 2 (y − t) / d_t
    cosine: L = 1 − ⟨y, t⟩ / (||y|| ||t||)             dL/dy = cos·y/||y||² − t/(||y|| ||t||)
            (||y||² or ||t||² ≤ ZERO_NORM_SQ: the row counts as cosine 0, L = 1, dL/dy = 0)

and with g = s·dL/dy (s the row's upstream scale): dh = g P, dP += gᵀ h, db += Σ_rows g.
``mask`` [N] drops rows (padding): they are never read. "mean" divides by the number of kept rows;
with no row kept the loss is 0.0 and every gradient is 0. "none" returns the per-row losses (0 where
masked).

Memory: the driver walks row chunks; a backend forms the chunk's projection tile by tile (Triton) or in
one fp32 [chunk, d_t] buffer (C++, torch), reduces it to the row losses and, when a gradient is wanted,
turns the same buffer into g in place before the three gradient products. With reduction "mean"/"sum"
the gradients are formed during the forward pass (no recompute) and ``backward`` only scales them;
"none" recomputes the chunk projections in ``backward`` with the per-row upstream gradient.

Chunk contract (``projection_chunk`` of ``reference/projection_loss.py``, ``kernels/projection_loss.py``
and the C++ ``_C.projection_chunk``):

    prepare(weight, bias) -> (weight', bias')         # once per call (the cpu/torch backends upcast to fp32)
    projection_chunk(h_c [c, d_s], weight', bias', t_c [c, d_t], kind, zero_norm_sq,
                     row_scale [c] fp32 | None, dW_acc fp32 | None, db_acc fp32 | None, dh_out [c, d_s] | None)
        -> (loss [c] fp32, nonfinite_teacher [c] bool)

Layers: the backends (registered in ``_backend`` under "fused_projection_loss") → the launcher-level functions
:func:`prepare`, :func:`forward`, :func:`backward` (used by the autograd Function here and by the torch.library op
in ``ops/library.py``) → ``fused_projection_loss`` → ``modules.FusedProjectionLoss`` / ``HiddenStateDistiller``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from .. import _backend
from .._validate import FLOAT_DTYPES, check_choice, check_mask, check_positive_int, check_same_dtype, check_tensor
from ..reference import projection_loss as _torch_impl
from ..reference.projection_loss import KINDS, REDUCTIONS, ZERO_NORM_SQ

OP = "fused_projection_loss"

__all__ = ["fused_projection_loss", "ProjectionLossOptions", "prepare", "forward", "backward", "KINDS", "REDUCTIONS",
           "ZERO_NORM_SQ"]


@dataclasses.dataclass(frozen=True)
class ProjectionLossOptions:
    """Non-tensor options of the op (one object for the autograd.Function); validated on construction.

    ``backend`` is the user's choice ("auto" | "triton" | "cpu" | "torch"); ``chunk_rows`` None takes the
    "projection_loss" chunk policy of ``_backend.chunk_rows``."""

    kind: str = "mse"
    reduction: str = "mean"
    backend: str = "auto"
    chunk_rows: Optional[int] = None
    zero_norm_sq: float = ZERO_NORM_SQ

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        check_choice("kind", self.kind, KINDS)
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_choice("backend", self.backend, _backend.BACKENDS)
        check_positive_int("chunk_rows", self.chunk_rows, optional=True)


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------
class ProjectionLossCpuImpl:
    """The chunk contract on ``_C.projection_chunk`` (csrc/cpu/projection_loss.cpp)."""

    @staticmethod
    def prepare(weight, bias):
        """fp32 weights (the C++ GEMMs run in fp32), contiguous: the extension reads raw row-major memory, so a
        transposed or sliced proj_weight/proj_bias view is copied once here rather than refused."""
        w, b = _torch_impl.prepare(weight, bias)
        return w.contiguous(), (None if b is None else b.contiguous())

    @staticmethod
    def projection_chunk(h, weight, bias, t, kind, zero_norm_sq, row_scale, dW_acc, db_acc, dh_out):
        ext = _backend.cpu_extension()
        return ext.projection_chunk(h.float().contiguous(), weight, bias, t.contiguous(), 0 if kind == "mse" else 1,
                                    float(zero_norm_sq), row_scale, dW_acc, db_acc, dh_out)


_backend.register_impl(OP, "torch", _torch_impl)
_backend.register_impl(OP, "cpu", ProjectionLossCpuImpl, cpu_symbol="projection_chunk")
_backend.register_impl(OP, "triton", "distill_engine.kernels.projection_loss")


def _chunk_rows(n_rows: int, d_t: int, device: torch.device) -> int:
    """Rows per chunk: the fp32 [chunk, d_t] buffer within the "projection_loss" budget of ``_backend.chunk_rows``."""
    return _backend.chunk_rows("projection_loss", n_rows, 4 * d_t, device)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def _validate(student_hidden, proj_weight, teacher_hidden, proj_bias, mask) -> None:
    check_tensor("student_hidden", student_hidden, dtypes=FLOAT_DTYPES)
    if student_hidden.dim() < 2:
        raise ValueError(f"student_hidden must have shape [N, d_s] (or [..., d_s]), got {tuple(student_hidden.shape)}")
    dev, dt = student_hidden.device, student_hidden.dtype
    lead, d_s = tuple(student_hidden.shape[:-1]), student_hidden.shape[-1]
    check_tensor("proj_weight", proj_weight, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    if proj_weight.shape[1] != d_s:
        raise ValueError(f"proj_weight has shape {tuple(proj_weight.shape)} but student_hidden has d_s = {d_s}; "
                         f"the projection must be [d_t, d_s] = [teacher width, {d_s}] (nn.Linear(d_s, d_t).weight)")
    d_t = proj_weight.shape[0]
    if d_s < 1 or d_t < 1:
        raise ValueError(f"d_s and d_t must be >= 1, got proj_weight of shape {tuple(proj_weight.shape)}")
    check_same_dtype("proj_weight", proj_weight, "student_hidden", student_hidden)
    check_tensor("teacher_hidden", teacher_hidden, dtypes=FLOAT_DTYPES, device=dev)
    if tuple(teacher_hidden.shape) != lead + (d_t,):
        raise ValueError(f"teacher_hidden has shape {tuple(teacher_hidden.shape)}, expected {lead + (d_t,)} "
                         f"(student_hidden's leading shape {lead} and d_t = proj_weight.shape[0] = {d_t})")
    if teacher_hidden.dtype != dt:
        raise ValueError(f"teacher_hidden has dtype {teacher_hidden.dtype} but student_hidden has {dt}; cast the "
                         f"teacher states with .to({dt})")
    if proj_bias is not None:
        check_tensor("proj_bias", proj_bias, ndim=1, dtypes=FLOAT_DTYPES, shape=(d_t,), device=dev)
        check_same_dtype("proj_bias", proj_bias, "student_hidden", student_hidden)
    if mask is not None:
        check_mask(mask, lead, dev, " (one bool per row of student_hidden; e.g. attention_mask.bool())")


def _raise_nonfinite_teacher(t: torch.Tensor, idx: Optional[torch.Tensor]) -> None:
    bad = ~torch.isfinite(t).all(dim=1)
    if idx is not None:
        keep = torch.zeros_like(bad)
        keep[idx] = True
        bad &= keep
    row = int(bad.nonzero()[0, 0])
    raise ValueError(f"teacher_hidden contains non-finite values (first at row {row} of the flattened [N, d_t] "
                     f"states); rows excluded by mask are never read")


# ----------------------------------------------------------------------------------------------
# the chunk driver
# ----------------------------------------------------------------------------------------------
def _drive(h, weight, bias, t, idx, n_kept, opts: ProjectionLossOptions, backend: str, grad_rows,
           need: Tuple[bool, bool, bool]):
    """Run every chunk of the kept rows.

    h [N, d_s], t [N, d_t] contiguous; idx [n_kept] int64 kept rows (None: all rows kept).
    grad_rows: None (forward only) | float (same scale for every kept row) | [n_kept] fp32 tensor.
    need = (dh, dW, db). Returns (loss over kept rows [n_kept] fp32, dh [N, d_s] h.dtype | None,
    dW [d_t, d_s] fp32 | None, db [d_t] fp32 | None).
    """
    impl = _backend.impl_for(OP, backend)
    N, d_s = h.shape
    d_t = weight.shape[0]
    dev = h.device
    w_c, b_c = impl.prepare(weight, bias)
    grad = grad_rows is not None
    dh = dW = db = None
    if grad and need[0]:
        dh = torch.empty(N, d_s, dtype=h.dtype, device=dev) if idx is None else torch.zeros(N, d_s, dtype=h.dtype, device=dev)
    if grad and need[1]:
        dW = torch.zeros(d_t, d_s, dtype=torch.float32, device=dev)
    if grad and need[2] and bias is not None:
        db = torch.zeros(d_t, dtype=torch.float32, device=dev)
    loss_rows = torch.empty(n_kept, dtype=torch.float32, device=dev)
    bad_t = torch.zeros(n_kept, dtype=torch.bool, device=dev)
    chunk = opts.chunk_rows
    for r0 in range(0, n_kept, chunk):
        r1 = min(r0 + chunk, n_kept)
        if idx is None:
            rows = None
            h_c, t_c = h[r0:r1], t[r0:r1]  # views: no copy
        else:
            rows = idx[r0:r1]
            h_c, t_c = h.index_select(0, rows), t.index_select(0, rows)  # [c, d_s], [c, d_t]
        scale_c = None
        if grad:
            scale_c = grad_rows[r0:r1] if isinstance(grad_rows, torch.Tensor) else \
                torch.full((r1 - r0,), float(grad_rows), dtype=torch.float32, device=dev)
        dh_c = None
        if dh is not None:
            dh_c = dh[r0:r1] if rows is None else torch.empty(r1 - r0, d_s, dtype=dh.dtype, device=dev)
        loss_c, bad_c = impl.projection_chunk(h_c, w_c, b_c, t_c, opts.kind, opts.zero_norm_sq, scale_c, dW, db, dh_c)
        if rows is not None and dh is not None:
            dh.index_copy_(0, rows, dh_c)
        loss_rows[r0:r1] = loss_c
        bad_t[r0:r1] = bad_c
        del h_c, t_c, dh_c
    # One host sync for both checks.
    flags = torch.stack([bad_t.any(), ~torch.isfinite(loss_rows).all()]).tolist() if n_kept else [False, False]
    if flags[0]:
        _raise_nonfinite_teacher(t, idx)
    if flags[1]:
        k = int((~torch.isfinite(loss_rows)).nonzero()[0, 0])
        row = k if idx is None else int(idx[k])
        raise ValueError(f"{OP}: the loss of row {row} is not finite: student_hidden, proj_weight or proj_bias "
                         f"contains non-finite values (or the projection overflows {h.dtype})")
    return loss_rows, dh, dW, db


def _kept_rows(mask: Optional[torch.Tensor], N: int):
    """(idx or None, n_kept): idx None when every row is kept (then chunks are plain views)."""
    if mask is None:
        return None, N
    idx = mask.reshape(-1).nonzero().squeeze(1)  # [n_kept] int64 (one host sync)
    n_kept = idx.numel()
    return (None, N) if n_kept == N else (idx, n_kept)


def _reduce(loss_rows, idx, n_kept, N, reduction, dev):
    if reduction == "none":
        if idx is None:
            return loss_rows
        out = torch.zeros(N, dtype=torch.float32, device=dev)
        out[idx] = loss_rows
        return out
    total = loss_rows.sum()
    if reduction == "mean":
        total = total / n_kept if n_kept > 0 else total  # no row kept: the (empty) sum, 0.0
    return total


def prepare(student_hidden, proj_weight, teacher_hidden, proj_bias, mask, opts: ProjectionLossOptions):
    """Argument checks, the backend that will run and the flattened inputs:
    (h [N, d_s] contiguous, t [N, d_t] contiguous detached, mask [N] | None, opts with chunk_rows set, backend)."""
    _validate(student_hidden, proj_weight, teacher_hidden, proj_bias, mask)
    d_s, d_t = student_hidden.shape[-1], proj_weight.shape[0]
    dev = student_hidden.device
    backend = _backend.resolve_backend(opts.backend, dev, OP)
    h = student_hidden.reshape(-1, d_s).contiguous()
    t = teacher_hidden.detach().reshape(-1, d_t).contiguous()
    m = mask.reshape(-1) if mask is not None else None
    opts = dataclasses.replace(opts, chunk_rows=opts.chunk_rows or _chunk_rows(h.shape[0], d_t, dev))
    return h, t, m, opts, backend


def forward(h, weight, t, bias, mask, opts: ProjectionLossOptions, backend: str, need: Tuple[bool, bool, bool]):
    """(loss, grads) on prepared inputs. With reduction "mean"/"sum" and a wanted gradient (need = (dh, dW, db))
    the loss is a scalar and its gradients (dh, dW fp32, db fp32 | None) are formed now, from the same chunk
    buffers; otherwise grads is None (reduction "none" recomputes in :func:`backward`)."""
    N = h.shape[0]
    idx, n_kept = _kept_rows(mask, N)
    grads = None
    if opts.reduction in ("mean", "sum") and any(need):
        scale = 1.0 / n_kept if (opts.reduction == "mean" and n_kept > 0) else 1.0
        loss_rows, dh, dW, db = _drive(h, weight, bias, t, idx, n_kept, opts, backend, scale, need)
        grads = (dh, dW, db)
    else:
        loss_rows, _, _, _ = _drive(h, weight, bias, t, idx, n_kept, opts, backend, None, need)
    return _reduce(loss_rows, idx, n_kept, N, opts.reduction, h.device), grads


def backward(grad_out, opts: ProjectionLossOptions, backend: str, need: Tuple[bool, bool, bool], dtypes,
             grads=None, inputs=None):
    """(dh, dW, db) in the inputs' ``dtypes`` = (h, weight, bias): the ``grads`` of :func:`forward` scaled by the
    scalar ``grad_out``, or (reduction "none", ``inputs`` = (h, weight, t, bias, mask)) recomputed with the
    per-row ``grad_out``."""
    if grads is not None:
        dh, dW, db = grads
        if bool(grad_out != 1):  # the loss is the last node in the usual case: skip the rescale
            g = grad_out.float()
            dh = dh * g.to(dh.dtype) if dh is not None else None
            dW = dW * g if dW is not None else None
            db = db * g if db is not None else None
    else:
        h, weight, t, bias, mask = inputs
        idx, n_kept = _kept_rows(mask, h.shape[0])
        g = grad_out.reshape(-1).float()
        grad_rows = (g if idx is None else g.index_select(0, idx)).contiguous()
        _, dh, dW, db = _drive(h, weight, bias, t, idx, n_kept, opts, backend, grad_rows, need)
    _, wd, bd = dtypes
    return dh, (dW.to(wd) if dW is not None else None), (db.to(bd) if db is not None else None)


class _FusedProjectionLossFn(torch.autograd.Function):
    """autograd face of :func:`forward` / :func:`backward`. Inputs are the flattened [N, d_s] / [N, d_t] tensors."""

    @staticmethod
    def forward(ctx, h, weight, t, bias, mask, opts: ProjectionLossOptions, backend: str):
        ctx.need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3])
        ctx.opts, ctx.backend = opts, backend
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        loss, ctx.grads = forward(h, weight, t, bias, mask, opts, backend, ctx.need)
        if ctx.grads is None:
            ctx.save_for_backward(h, weight, t, bias, mask)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grads, inputs = ctx.grads, None
        if grads is None:
            if ctx.opts.reduction != "none":
                raise RuntimeError("fused_projection_loss: a second backward through the same loss (retain_graph=True) "
                                   "is not supported for reduction='mean'/'sum'; the gradients formed in the forward "
                                   "pass were handed over already. Recompute the loss.")
            inputs = ctx.saved_tensors
        # Hand the precomputed gradients over once: the autograd node (alive as long as the caller keeps the
        # loss tensor) must not pin them until the next step.
        ctx.grads = None
        dh, dW, db = backward(grad_out, ctx.opts, ctx.backend, ctx.need, ctx.dtypes, grads, inputs)
        return dh, dW, None, db, None, None, None


def fused_projection_loss(student_hidden: torch.Tensor, proj_weight: torch.Tensor, teacher_hidden: torch.Tensor, *,
                          proj_bias: Optional[torch.Tensor] = None, kind: str = "mse",
                          mask: Optional[torch.Tensor] = None, reduction: str = "mean",
                          backend: str = "auto") -> torch.Tensor:
    """Hidden-state distillation loss through a learned projection, without materialising P·h_s.

    Args:
        student_hidden: [N, d_s] (or [..., d_s]) student states; gradients flow to it.
        proj_weight: [d_t, d_s] learned projection (``nn.Linear(d_s, d_t).weight``).
        teacher_hidden: [N, d_t] (or [..., d_t]) teacher states, same dtype; treated as a constant.
        proj_bias: optional [d_t] bias.
        kind: "mse" (||P h + b − t||² / d_t per row) or "cosine" (1 − cos(P h + b, t) per row; a row
            where either vector has zero norm counts as cosine 0, loss 1, zero gradient).
        mask: optional bool tensor of student_hidden's leading shape; False rows are excluded (never read).
        reduction: "mean" over kept rows (0.0 when none is kept) | "sum" | "none" (per-row, 0 where masked).
        backend: "auto" | "triton" | "cpu" | "torch" (see distill_engine._backend).

    Returns a float32 scalar, or float32 per-row losses of the leading shape for reduction="none".
    Raises ValueError on shape/dtype/device mismatch, an unknown option, a malformed mask, non-finite
    teacher states in kept rows, and a non-finite loss (non-finite student states or weights).
    """
    opts = ProjectionLossOptions(kind=kind, reduction=reduction, backend=backend)
    h, t, m, opts, which = prepare(student_hidden, proj_weight, teacher_hidden, proj_bias, mask, opts)
    needs_grad = torch.is_grad_enabled() and (
        student_hidden.requires_grad or proj_weight.requires_grad or (proj_bias is not None and proj_bias.requires_grad))
    if needs_grad:
        out = _FusedProjectionLossFn.apply(h, proj_weight, t, proj_bias, m, opts, which)
    else:  # forward only: no autograd node, no gradient buffers
        out, _ = forward(h, proj_weight, t, proj_bias, m, opts, which, (False, False, False))
    if reduction == "none":
        out = out.reshape(student_hidden.shape[:-1])
    return out
