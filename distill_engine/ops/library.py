"""torch.library registration of the public ops, so that ``torch.compile`` traces them (no graph break).

    torch.ops.distill_engine.fused_distill_loss        (+ _backward, for reduction="none")
    torch.ops.distill_engine.teacher_targets           (no gradient: the teacher is a constant)
    torch.ops.distill_engine.fused_projection_loss     (+ _backward, for reduction="none")

Use them through :func:`fused_distill_loss`, :func:`teacher_targets`, :func:`fused_projection_loss` below (same
arguments as the eager functions of ``distill_engine.ops.*``); each is a thin layer over the op's public
launcher-level functions (``distill_loss.validate_inputs/forward/backward``, ``projection_loss.prepare/forward/
backward``), the same ones the op's eager ``torch.autograd.Function`` calls (autograd is off below the custom op,
so ``.apply`` would record nothing).

Why the forward returns the gradients. For reduction "mean"/"sum" the eager op forms dH, dW (and db) in the forward
pass, from the same [chunk, V] buffers (one pass over the vocabulary instead of two). The custom op keeps that: it
returns (loss, dH, dW, db) and its registered backward only scales them by the incoming gradient. Empty [0]
tensors stand for gradients that are not needed (``need_grad`` False, or no bias). For reduction "none" the
backward depends on the per-row incoming gradient, so it is a second custom op that recomputes (the eager op does
the same recompute, from saved row statistics).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import distill_loss as _dl
from . import projection_loss as _pl
from . import teacher_targets as _tt

__all__ = ["fused_distill_loss", "teacher_targets", "fused_projection_loss"]

_NS = "distill_engine"


def _none0(t: Optional[Tensor], like: Tensor) -> Tensor:
    """A gradient slot: the tensor, or an empty [0] tensor that stands for None (custom ops return Tensors)."""
    return t if t is not None else like.new_empty(0)


# ---- fused_distill_loss -----------------------------------------------------------------------------------
def _distill_prep(hidden, weight, bias, ids, lp, rest, labels, divergence, beta, temperature, ce_weight, tail,
                  ignore_index, reduction, backend, validate):
    opts = _dl.DistillOptions(divergence=divergence, beta=beta, temperature=temperature, ce_weight=ce_weight,
                              tail=tail, ignore_index=ignore_index, reduction=reduction, backend=backend,
                              validate=validate)
    return opts, _dl.validate_inputs(hidden, weight, ids, lp, labels, bias, rest, opts)


@torch.library.custom_op(f"{_NS}::fused_distill_loss", mutates_args=())
def _distill_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_ids: Tensor,
                teacher_logprobs: Tensor, teacher_rest_logprob: Optional[Tensor], labels: Optional[Tensor], divergence: str, beta: float,
                temperature: float, ce_weight: float, tail: str, ignore_index: int, reduction: str, backend: str,
                validate: bool, need_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    opts, which = _distill_prep(hidden, weight, bias, teacher_ids, teacher_logprobs, teacher_rest_logprob, labels,
                                divergence, beta, temperature, ce_weight, tail, ignore_index, reduction, backend,
                                validate)
    rest = teacher_rest_logprob if tail == "bucket" else None  # renormalize: the teacher has no rest mass
    N = hidden.shape[0]
    in_fwd = need_grad and reduction != "none"
    if N == 0:
        loss = hidden.new_zeros((0,) if reduction == "none" else (), dtype=torch.float32)
        return (loss, torch.zeros_like(hidden) if in_fwd else hidden.new_empty(0),
                torch.zeros_like(weight) if in_fwd else weight.new_empty(0),
                torch.zeros_like(bias) if in_fwd and bias is not None else hidden.new_empty(0))
    loss, st = _dl.forward(hidden, weight, bias, teacher_ids, teacher_logprobs, rest, labels, opts, which, in_fwd)
    if not in_fwd:
        return loss, hidden.new_empty(0), weight.new_empty(0), hidden.new_empty(0)
    dH, dW, db = _dl.backward(st, torch.ones((), device=hidden.device), opts, which)
    return loss, dH, dW, _none0(db, hidden)


@_distill_op.register_fake
def _(hidden, weight, bias, teacher_ids, teacher_logprobs, teacher_rest_logprob, labels, divergence, beta,
      temperature, ce_weight, tail, ignore_index, reduction, backend, validate, need_grad):
    N = hidden.shape[0]
    loss = hidden.new_empty((N,) if reduction == "none" else (), dtype=torch.float32)
    if need_grad and reduction != "none":
        return (loss, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape),
                bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0))
    return loss, hidden.new_empty(0), weight.new_empty(0), hidden.new_empty(0)


@torch.library.custom_op(f"{_NS}::fused_distill_loss_backward", mutates_args=())
def _distill_bwd_op(grad_rows: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher_ids: Tensor,
                    teacher_logprobs: Tensor, teacher_rest_logprob: Optional[Tensor], labels: Optional[Tensor], divergence: str, beta: float,
                    temperature: float, ce_weight: float, tail: str, ignore_index: int, backend: str
                    ) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of Σ_rows grad_rows · loss_rows (reduction "none"), by the eager op's recompute path."""
    opts, which = _distill_prep(hidden, weight, bias, teacher_ids, teacher_logprobs, teacher_rest_logprob, labels,
                                divergence, beta, temperature, ce_weight, tail, ignore_index, "none", backend, False)
    rest = teacher_rest_logprob if tail == "bucket" else None
    if hidden.shape[0] == 0:
        return torch.zeros_like(hidden), torch.zeros_like(weight), _none0(
            torch.zeros_like(bias) if bias is not None else None, hidden)
    _, st = _dl.forward(hidden, weight, bias, teacher_ids, teacher_logprobs, rest, labels, opts, which, True)
    dH, dW, db = _dl.backward(st, grad_rows.contiguous(), opts, which, (hidden, weight, bias))
    return dH, dW, _none0(db, hidden)


@_distill_bwd_op.register_fake
def _(grad_rows, hidden, weight, bias, *args):
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), (
        bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0))


def _distill_setup(ctx, inputs, output):
    hidden, weight, bias, ids, lp, rest, labels = inputs[:7]
    ctx.opts = inputs[7:15]  # divergence .. backend
    ctx.has_bias = bias is not None
    if ctx.opts[6] == "none":  # reduction
        ctx.save_for_backward(hidden, weight, bias, ids, lp, rest, labels)
    else:
        ctx.save_for_backward(*output[1:])


def _distill_backward(ctx, g_loss, _g_dH, _g_dW, _g_db):
    nones = (None,) * 14
    if ctx.opts[6] == "none":
        hidden, weight, bias, ids, lp, rest, labels = ctx.saved_tensors
        dH, dW, db = _distill_bwd_op(g_loss.float(), hidden, weight, bias, ids, lp, rest, labels, *ctx.opts[:6],
                                     ctx.opts[7])
    else:
        dH, dW, db = ctx.saved_tensors
        if dH.numel() == 0 and ctx.needs_input_grad[0]:
            raise RuntimeError("fused_distill_loss: the forward ran with need_grad=False; call the op with "
                               "gradients enabled and a hidden/weight that requires grad")
        g = g_loss.float()
        dH, dW = (dH.float() * g).to(dH.dtype), (dW.float() * g).to(dW.dtype)
        db = (db.float() * g).to(db.dtype)
    return (dH, dW, db if ctx.has_bias else None) + nones


_distill_op.register_autograd(_distill_backward, setup_context=_distill_setup)


def fused_distill_loss(hidden: Tensor, weight: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, *,
                       labels: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                       divergence: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                       ce_weight: float = 0.0, tail: str = "bucket", ignore_index: int = -100,
                       reduction: str = "mean", backend: str = "auto", validate: bool = True,
                       teacher_rest_logprob: Optional[Tensor] = None) -> Tensor:
    """:func:`distill_engine.fused_distill_loss` as a torch.library op (traceable by torch.compile)."""
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad))
    return _distill_op(hidden, weight, bias, teacher_ids, teacher_logprobs, teacher_rest_logprob, labels, divergence, float(beta),
                       float(temperature), float(ce_weight), tail, int(ignore_index), reduction, backend,
                       bool(validate), bool(need_grad))[0]


# ---- teacher_targets --------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::teacher_targets", mutates_args=())
def _targets_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], k: int, temperature: float, method: str,
                seed: Optional[int], backend: str, validate: bool) -> Tuple[Tensor, Tensor, Tensor]:
    gen = None
    if seed is not None:
        gen = torch.Generator(device=hidden.device).manual_seed(seed)
    t = _tt.teacher_targets(hidden, weight, k, bias=bias, temperature=temperature, method=method, generator=gen,
                            backend=backend, validate=validate)
    # rest_logprob [N] (method="topk"), or an empty [0] tensor standing for None (custom ops return Tensors)
    rest = t.rest_logprob if t.rest_logprob is not None else hidden.new_empty(0, dtype=torch.float32)
    return t.ids, t.logprobs, rest


@_targets_op.register_fake
def _(hidden, weight, bias, k, temperature, method, seed, backend, validate):
    N = hidden.shape[0]
    return (hidden.new_empty((N, k), dtype=torch.int32), hidden.new_empty((N, k), dtype=torch.float32),
            hidden.new_empty((N,) if method == "topk" else (0,), dtype=torch.float32))


def teacher_targets(hidden: Tensor, weight: Tensor, k: int = 64, *, bias: Optional[Tensor] = None,
                    temperature: float = 1.0, method: str = "topk", seed: Optional[int] = None,
                    backend: str = "auto", validate: bool = True) -> "_tt.TeacherTargets":
    """:func:`distill_engine.teacher_targets` as a torch.library op. ``seed`` (int) replaces ``generator`` for
    method="sample" (a Generator is no op argument). No gradient flows (the teacher is a constant)."""
    ids, lps, rest = _targets_op(hidden.detach(), weight.detach(), bias.detach() if bias is not None else None, int(k),
                           float(temperature), method, seed, backend, bool(validate))
    return _tt.TeacherTargets(ids, lps, weight.shape[0], rest if method == "topk" else None)


# ---- fused_projection_loss --------------------------------------------------------------------------------
def _projection_prep(h, weight, t, bias, mask, kind, reduction, backend):
    """(h [N, d_s], t [N, d_t], mask [N] | None, opts, resolved backend, dtypes) for the launcher functions."""
    opts = _pl.ProjectionLossOptions(kind=kind, reduction=reduction, backend=backend)
    dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
    return _pl.prepare(h, weight, t, bias, mask, opts) + (dtypes,)


@torch.library.custom_op(f"{_NS}::fused_projection_loss", mutates_args=())
def _projection_op(student_hidden: Tensor, proj_weight: Tensor, teacher_hidden: Tensor, proj_bias: Optional[Tensor],
                   mask: Optional[Tensor], kind: str, reduction: str, backend: str, need_grad: bool
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    h, t, m, opts, which, dtypes = _projection_prep(student_hidden, proj_weight, teacher_hidden, proj_bias, mask, kind,
                                                    reduction, backend)
    in_fwd = need_grad and reduction != "none"
    need = (in_fwd, in_fwd, in_fwd and proj_bias is not None)
    loss, grads = _pl.forward(h, proj_weight, t, proj_bias, m, opts, which, need)
    if reduction == "none":
        loss = loss.reshape(student_hidden.shape[:-1])
    if not in_fwd:
        return loss, student_hidden.new_empty(0), proj_weight.new_empty(0), proj_weight.new_empty(0)
    dh, dW, db = _pl.backward(torch.ones((), device=h.device), opts, which, need, dtypes, grads=grads)
    return loss, dh.reshape(student_hidden.shape), dW, _none0(db, proj_weight)


@_projection_op.register_fake
def _(student_hidden, proj_weight, teacher_hidden, proj_bias, mask, kind, reduction, backend, need_grad):
    if reduction == "none":
        return (student_hidden.new_empty(student_hidden.shape[:-1], dtype=torch.float32),
                student_hidden.new_empty(0), proj_weight.new_empty(0), proj_weight.new_empty(0))
    loss = student_hidden.new_empty((), dtype=torch.float32)
    if need_grad:
        return (loss, student_hidden.new_empty(student_hidden.shape), proj_weight.new_empty(proj_weight.shape),
                proj_bias.new_empty(proj_bias.shape) if proj_bias is not None else proj_weight.new_empty(0))
    return loss, student_hidden.new_empty(0), proj_weight.new_empty(0), proj_weight.new_empty(0)


@torch.library.custom_op(f"{_NS}::fused_projection_loss_backward", mutates_args=())
def _projection_bwd_op(grad_rows: Tensor, student_hidden: Tensor, proj_weight: Tensor, teacher_hidden: Tensor,
                       proj_bias: Optional[Tensor], mask: Optional[Tensor], kind: str, backend: str
                       ) -> Tuple[Tensor, Tensor, Tensor]:
    h, t, m, opts, which, dtypes = _projection_prep(student_hidden, proj_weight, teacher_hidden, proj_bias, mask, kind,
                                                    "none", backend)
    need = (True, True, proj_bias is not None)
    dh, dW, db = _pl.backward(grad_rows.reshape(-1).contiguous(), opts, which, need, dtypes,
                              inputs=(h, proj_weight, t, proj_bias, m))
    return dh.reshape(student_hidden.shape), dW, _none0(db, proj_weight)


@_projection_bwd_op.register_fake
def _(grad_rows, student_hidden, proj_weight, teacher_hidden, proj_bias, mask, kind, backend):
    return student_hidden.new_empty(student_hidden.shape), proj_weight.new_empty(proj_weight.shape), (
        proj_bias.new_empty(proj_bias.shape) if proj_bias is not None else proj_weight.new_empty(0))


def _projection_setup(ctx, inputs, output):
    h, w, t, b, m, kind, reduction, backend, _ = inputs
    ctx.kind, ctx.reduction, ctx.backend, ctx.has_bias = kind, reduction, backend, b is not None
    if reduction == "none":
        ctx.save_for_backward(h, w, t, b, m)
    else:
        ctx.save_for_backward(*output[1:])


def _projection_backward(ctx, g_loss, _a, _b, _c):
    if ctx.reduction == "none":
        h, w, t, b, m = ctx.saved_tensors
        dh, dW, db = _projection_bwd_op(g_loss.float(), h, w, t, b, m, ctx.kind, ctx.backend)
    else:
        dh, dW, db = ctx.saved_tensors
        g = g_loss.float()
        dh, dW, db = (dh.float() * g).to(dh.dtype), (dW.float() * g).to(dW.dtype), (db.float() * g).to(db.dtype)
    return dh, dW, None, db if ctx.has_bias else None, None, None, None, None, None


_projection_op.register_autograd(_projection_backward, setup_context=_projection_setup)


def fused_projection_loss(student_hidden: Tensor, proj_weight: Tensor, teacher_hidden: Tensor, *,
                          proj_bias: Optional[Tensor] = None, kind: str = "mse", mask: Optional[Tensor] = None,
                          reduction: str = "mean", backend: str = "auto") -> Tensor:
    """:func:`distill_engine.fused_projection_loss` as a torch.library op (traceable by torch.compile)."""
    need_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or proj_weight.requires_grad
                                             or (proj_bias is not None and proj_bias.requires_grad))
    return _projection_op(student_hidden, proj_weight, teacher_hidden.detach(), proj_bias, mask, kind, reduction,
                          backend, bool(need_grad))[0]
