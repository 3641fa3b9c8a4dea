"""logprobs_at: log-probabilities of a linear layer's softmax at given ids, without [N, V] logits.

    l = h Wᵀ + b                                  (raw logits, [N, V], never materialised whole)
    out[n, j] = l[n, ids[n, j]] / T − logsumexp_v(l[n, v] / T)            [N, m] float32

It reuses the two vocabulary-wide passes of ``fused_distill_loss``'s backend contract (see
``ops/distill_loss.py``), so every backend (torch chunked, the C++ CPU kernels, Triton) is available:

* forward, per row chunk: ``logits_lse`` → (buf [c, V] fp32, lse_T [c]); gather buf at the ids.
* backward, with upstream gradient G [N, m] and q = softmax(l / T):

      ∂L/∂l_v = (1/T) · ( Σ_j G_j·[v = ids_j]  −  (Σ_j G_j) · q_v )

  i.e. ``dense_grad`` with s_q = −(Σ_j G_j)/T, no CE term, and the sparse coefficients G/T scattered at
  the ids (scatter-add: a repeated id gets the sum of its coefficients). The logits of the chunk are
  recomputed (one more GEMM) instead of keeping [N, V] alive between forward and backward.

Logit transforms (``logit_scale`` s, ``softcap`` c; Gemma-2 soft-capping, scaled-logit families): l is replaced
by z = s·l, then c·tanh(z/c), before the temperature — exactly as ``fused_distill_loss`` does. The backend is
wrapped in :class:`~distill_engine.ops.logit_transform.TransformChunks` (the transform on the [chunk, V] buffer,
lse over z; backward multiplies the dense and the sparse coefficients by dz/dl = s·(1 − (z/c)²)).

Memory: one fp32 [chunk, V] buffer at a time (``chunk_rows``; default from the "logprobs_at" chunk policy of
``_backend.chunk_rows``, the loss's budget), plus lse_T [N] saved for backward.
Used by the on-policy trainer's ``sampled_reverse_kl`` objective (teacher and student log-probs at the
student's sampled tokens).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .. import _backend
from .._validate import INDEX_DTYPES, check_choice, check_finite_head, check_hidden_weight, check_positive, \
    check_positive_int, check_tensor
from .distill_loss import OP as _LOSS_OP
from .logit_transform import TransformChunks, active, check_transform

OP = "logprobs_at"


@dataclasses.dataclass(frozen=True)
class LogprobsAtOptions:
    """Non-tensor options of the op; validated on construction."""

    temperature: float = 1.0
    backend: str = "auto"
    validate: bool = True
    chunk_rows: Optional[int] = None
    logit_scale: Optional[float] = None  # z = s·l, then c·tanh(z/c) (ops/logit_transform.py), as the loss's
    softcap: Optional[float] = None

    def __post_init__(self):
        check_positive("temperature", self.temperature)
        check_choice("backend", self.backend, _backend.BACKENDS)
        check_positive_int("chunk_rows", self.chunk_rows, optional=True)
        check_transform(self.logit_scale, self.softcap)


def _impl(backend: str, transform=(None, None)):
    """logprobs_at runs on the loss's chunk contract: its registered implementations are the loss's; with an
    active (logit_scale, softcap), wrapped to work on the transformed logits z."""
    impl = _backend.impl_for(_LOSS_OP, backend)
    return TransformChunks(impl, *transform) if active(*transform) else impl


def validate_inputs(hidden, weight, ids, bias, opts: LogprobsAtOptions) -> str:
    """Every argument check of the op; returns the backend that will run."""
    check_hidden_weight(hidden, weight, bias)
    N = hidden.shape[0]
    V = weight.shape[0]
    check_tensor("ids", ids, ndim=2, dtypes=INDEX_DTYPES, shape=(N, None), device=hidden.device)
    if ids.shape[1] < 1:
        raise ValueError("ids must have at least one column (shape [N, m] with m >= 1)")
    if N > 0:
        # ids out of range would index out of bounds in the kernels: always checked (one host sync)
        bad = (ids < 0) | (ids >= V)
        if bool(bad.any()):
            r, c = bad.nonzero()[0].tolist()
            raise ValueError(f"ids must lie in [0, V={V}); found {int(ids[r, c])} at row {r}, column {c}")
        if opts.validate:
            check_finite_head(hidden, weight, bias, "the ")
    return _backend.resolve_backend(opts.backend, hidden.device, OP, _backend.cpu_symbol_for(_LOSS_OP))


def _forward(hidden, weight, bias, ids, T: float, chunk: int, backend: str, transform=(None, None)):
    impl = _impl(backend, transform)
    N = hidden.shape[0]
    out = torch.empty(ids.shape, dtype=torch.float32, device=hidden.device)  # [N, m]
    lse_all = torch.empty(N, dtype=torch.float32, device=hidden.device)  # [N]
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        buf, lse_T, _ = impl.logits_lse(hidden[s:e], weight, bias, T, False, True)  # buf [c, V] fp32
        z = buf.gather(1, ids[s:e].long())  # [c, m] raw logits at the ids
        out[s:e] = (z.double() / T - lse_T.double()[:, None]).float()
        lse_all[s:e] = lse_T
        del buf
    return out, lse_all


def _backward(hidden, weight, bias, ids, lse_all, grad, T: float, chunk: int, backend: str, need_dW: bool,
              transform=(None, None)):
    impl = _impl(backend, transform)
    N, d = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    dH = torch.empty(N, d, dtype=torch.float32, device=dev)
    # the torch and C++ backends always accumulate dW; Triton skips the GEMM when dW is not wanted
    dW = torch.zeros(V, d, dtype=torch.float32, device=dev) if need_dW or backend != "triton" else None
    db = torch.zeros(V, dtype=torch.float32, device=dev) if bias is not None else None
    g = grad.float()  # [N, m]
    s_q_all = -g.sum(1) / T  # [N]
    coef_all = g / T  # [N, m]
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        h_c = hidden[s:e]
        buf, _, _ = impl.logits_lse(h_c, weight, bias, T, False, True)
        dH[s:e] = impl.dense_grad(buf, h_c, weight, bias, T, lse_all[s:e], None, s_q_all[s:e].contiguous(), None,
                                  dW, db, ids[s:e].long().contiguous(), coef_all[s:e].contiguous())
        del buf
    return dH, dW, db


class _LogprobsAtFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, T: float, chunk: int, backend: str, transform=(None, None)):
        out, lse_all = _forward(hidden, weight, bias, ids, T, chunk, backend, transform)
        ctx.T, ctx.chunk, ctx.backend, ctx.transform = T, chunk, backend, transform
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.save_for_backward(hidden, weight, bias, ids, lse_all)
        ctx.mark_non_differentiable(lse_all)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, ids, lse_all = ctx.saved_tensors
        need_dW = ctx.needs_input_grad[1]
        dH, dW, db = _backward(hidden, weight, bias, ids, lse_all, grad_out, ctx.T, ctx.chunk, ctx.backend, need_dW,
                               ctx.transform)
        hd, wd, bd = ctx.dtypes
        return (dH.to(hd) if ctx.needs_input_grad[0] else None,
                dW.to(wd) if need_dW else None,
                db.to(bd) if (db is not None and ctx.needs_input_grad[2]) else None,
                None, None, None, None, None)


def logprobs_at(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    backend: str = "auto",
    validate: bool = True,
    chunk_rows: Optional[int] = None,
    logit_scale: Optional[float] = None,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Log-probabilities log softmax((h Wᵀ + b)/T)[ids] without materialising the [N, V] logits.
    With ``logit_scale`` s / ``softcap`` c the logits are z = s·l, then c·tanh(z/c), before T (model families).

    Args:
        hidden: [N, d] final hidden states (float32 | bfloat16 | float16).
        weight: [V, d] lm_head weight, same dtype.
        ids: [N, m] int32/int64 token ids in [0, V); repeats are allowed (each gets its log-prob).
        bias: [V] optional lm_head bias.
        temperature: logits are divided by it before the softmax.
        backend: "auto" | "triton" | "cpu" | "torch".
        validate: finiteness checks on hidden/weight/bias (one host sync each); ids are always range-checked.
        chunk_rows: rows per chunk (default: one fp32 [chunk, V] buffer of ≤ 32 MiB on CPU, 2 GiB on GPU).
        logit_scale: multiply the logits by it (None: 1), as Cohere / Granite (1/s) / ... do.
        softcap: soft-cap the (scaled) logits to c·tanh(z/c) (Gemma 2/3's final_logit_softcapping); None: off.

    Returns:
        [N, m] float32 log-probabilities; differentiable with respect to hidden, weight and bias.
    """
    opts = LogprobsAtOptions(temperature=temperature, backend=backend, validate=validate, chunk_rows=chunk_rows,
                             logit_scale=logit_scale, softcap=softcap)
    which = validate_inputs(hidden, weight, ids, bias, opts)
    if hidden.shape[0] == 0:
        z = (hidden.sum() * 0.0 + weight.sum() * 0.0).float()
        return z.expand(0, ids.shape[1]).clone() if z.requires_grad else hidden.new_zeros(ids.shape, dtype=torch.float32)
    chunk = chunk_rows or _backend.chunk_rows(OP, None, 4 * weight.shape[0], hidden.device)  # fp32 [chunk, V]
    return _LogprobsAtFn.apply(hidden, weight, bias, ids, float(temperature), chunk, which,
                               (opts.logit_scale, opts.softcap))
