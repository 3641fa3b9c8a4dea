"""fused_distill_loss: linear layer + sparse-teacher distillation loss without [N, V] logits.

The loss (issue 2; the math is in docs/ARCHITECTURE.md, "The core op"):

    Q = softmax((h Wᵀ + b) / T) over the full vocabulary, S = non-empty teacher ids of the row,
    D = divergence(P, Q) over the k+1 categories S ∪ {rest}   (tail="bucket" or "renormalize"),
    loss_row = (1 − ce_weight) · T² · D + ce_weight · CE(labels) at T = 1.

Gradient decomposition (shared by every backend). With a_c = ∂D/∂q_c, b_c = q_c·a_c and
c̄ = Σ_c b_c, the gradient with respect to the raw logits l = T·z is

    dL/dl_v = s_q·q_v + s_1·q1_v + [v ∈ S]·α·T·(b_v − q_v·a_rest) − [v = label]·ce_weight
    s_q = α·T·(a_rest − c̄),   s_1 = ce_weight,   α = 1 − ce_weight,

so a backend only has to provide two vocabulary-wide passes over a row chunk: the logits with their
log-sum-exps, and the dense gradient g = s_q·exp(l/T − lse_T) + s_1·exp(l − lse_1) followed by the three
products dH = g W, dW += gᵀ h, db += Σ g. The per-row [N, k] category math below runs once, in float64.

Memory: one fp32 [chunk, V] buffer at a time (``chunk_rows``), never [N, V]. When the loss is a scalar
(reduction "mean"/"sum") and gradients are needed, the gradients are formed during the forward pass from
the same buffer (no logits recompute) and ``backward`` only scales them.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import torch

from .. import _backend
from .._validate import FLOAT_DTYPES, INDEX_DTYPES, check_choice, check_tensor
from ..reference import distill_loss as _torch_impl
from ..reference.distill_loss import LOG_FLOOR, TAIL_FLOOR

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TAILS = ("bucket", "renormalize")
REDUCTIONS = ("mean", "sum", "none")
_CPU_SYMBOL = "distill_logits_lse"


@dataclasses.dataclass(frozen=True)
class DistillOptions:
    """Non-tensor options of the op (one object for the autograd.Function)."""

    divergence: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    ce_weight: float = 0.0
    tail: str = "bucket"
    ignore_index: int = -100
    reduction: str = "mean"
    backend: str = "auto"
    validate: bool = True
    chunk_rows: Optional[int] = None

    def check(self) -> None:
        check_choice("divergence", self.divergence, DIVERGENCES)
        check_choice("tail", self.tail, TAILS)
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_choice("backend", self.backend, _backend.BACKENDS)
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not (isinstance(self.ce_weight, (int, float)) and 0.0 <= self.ce_weight <= 1.0):
            raise ValueError(f"ce_weight must be in [0, 1], got {self.ce_weight!r}")
        if self.divergence == "jsd" and not (isinstance(self.beta, (int, float)) and 0.0 < self.beta < 1.0):
            raise ValueError(f"beta must be strictly between 0 and 1 for divergence='jsd' (at 0 or 1 the JSD is "
                             f"identically 0), got {self.beta!r}")
        if self.divergence == "reverse_kl" and self.tail == "renormalize":
            raise ValueError("divergence='reverse_kl' is undefined with tail='renormalize' (the student has mass "
                             "where the renormalized teacher has none); use tail='bucket'")
        if self.chunk_rows is not None and (not isinstance(self.chunk_rows, int) or self.chunk_rows < 1):
            raise ValueError(f"chunk_rows must be a positive int, got {self.chunk_rows!r}")


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------
class _CpuExt:
    """Adapter from the C++ functions in csrc/cpu/distill_loss.cpp to the chunk contract."""

    @staticmethod
    def logits_lse(h, weight, bias, temperature, need_lse1, store=True):
        buf, lse_T, lse_1 = _backend.cpu_extension().distill_logits_lse(h, weight, bias, float(temperature), bool(need_lse1))
        return buf, lse_T, (lse_1 if need_lse1 else None)

    @staticmethod
    def dense_grad(buf, h, weight, bias, temperature, lse_T, lse_1, s_q, s_1, dW_acc, db_acc,
                   sparse_ids=None, sparse_coef=None):
        ext = _backend.cpu_extension()
        return ext.distill_dense_grad(buf, h, weight, float(temperature), lse_T, lse_1, s_q, s_1, dW_acc, db_acc,
                                      sparse_ids, sparse_coef)


def _backend_impl(name: str):
    if name == "torch":
        return _torch_impl
    if name == "cpu":
        return _CpuExt
    from ..kernels import distill_loss as _triton_impl  # imported lazily: triton is optional

    return _triton_impl


def _default_chunk_rows(V: int, device: torch.device) -> int:
    """Rows per chunk so one fp32 [chunk, V] buffer stays within a budget (env-overridable).

    GPU: 2^29 elements (4,096 rows at V = 128,256; a 2 GB fp32 buffer + 1 GB bf16 g), capped at 1/16 of the
    device's memory. The chunk size sets the fp32 dW accumulator traffic: every chunk's dW += gᵀh reads and
    writes the whole [V, d] accumulator (4.2 GB at V = 128,256, d = 4,096) and re-reads W twice, so at N = 8,192
    1,024-row chunks cost ~34 GB of HBM traffic per step, 4,096-row chunks ~8 GB. CPU: 2^23 elements (32 MB;
    the CPU GEMMs are already efficient at a few hundred rows, and the buffer is most of the op's extra memory).
    """
    if device.type == "cuda":
        default = 2**29
        try:
            total = torch.cuda.get_device_properties(device.index if device.index is not None else
                                                     torch.cuda.current_device()).total_memory
            default = min(default, max(2**24, total // 16 // 6))  # 6 B per element: fp32 buffer + 16-bit g
        except (RuntimeError, AssertionError):  # no device properties (mocked devices): keep the default
            pass
    else:
        default = 2**23
    budget = int(os.environ.get("DISTILL_ENGINE_CHUNK_ELEMS", default))
    rows = max(1, budget // max(V, 1))
    # round down to a power of two (GEMM-friendly) but keep at least 16 rows
    rows = 1 << (rows.bit_length() - 1)
    return max(16, min(rows, 8192))


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def _validate_inputs(hidden, weight, ids, lp, labels, bias, opts: DistillOptions) -> None:
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    dev = hidden.device
    N, d = hidden.shape
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, shape=(None, d), device=dev)
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight has dtype {weight.dtype} but hidden has {hidden.dtype}; cast one of them")
    V = weight.shape[0]
    check_tensor("teacher_ids", ids, ndim=2, dtypes=INDEX_DTYPES, shape=(N, None), device=dev)
    k = ids.shape[1]
    if k < 1:
        raise ValueError("teacher_ids must have at least one slot per row (shape [N, k] with k >= 1)")
    check_tensor("teacher_logprobs", lp, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,), shape=(N, k), device=dev)
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, shape=(V,), device=dev)
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias has dtype {bias.dtype} but hidden has {hidden.dtype}; cast one of them")
    if labels is not None:
        check_tensor("labels", labels, ndim=1, dtypes=INDEX_DTYPES, shape=(N,), device=dev)
    elif opts.ce_weight > 0:
        raise ValueError("ce_weight > 0 needs labels (the hard-label cross-entropy term); pass labels=... or set ce_weight=0")
    if not opts.validate or N == 0:
        return
    # value checks: one host sync each, skipped with validate=False
    if bool(((ids < -1) | (ids >= V)).any()):
        bad = ((ids < -1) | (ids >= V)).nonzero()[0].tolist()
        raise ValueError(f"teacher_ids must lie in [-1, V={V}) (-1 marks an empty slot); found {int(ids[bad[0], bad[1]])} "
                         f"at row {bad[0]}, slot {bad[1]}")
    if k > 1:
        srt = ids.sort(dim=1).values
        dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
        if bool(dup.any()):
            row = int(dup.any(1).nonzero()[0, 0])
            raise ValueError(f"teacher_ids must be unique within a row; row {row} repeats an id "
                             f"(merge duplicates, e.g. with de.teacher_targets(method='sample'))")
    slot = ids >= 0
    lpv = lp.float()
    if bool(torch.isnan(lpv).any()):
        row = int(torch.isnan(lpv).any(1).nonzero()[0, 0])
        raise ValueError(f"teacher_logprobs contains NaN (first at row {row})")
    if bool(((lpv > 1e-4) & slot).any()):
        row = int(((lpv > 1e-4) & slot).any(1).nonzero()[0, 0])
        raise ValueError(f"teacher_logprobs must be log-probabilities (<= 0); row {row} has a positive value. "
                         f"Pass log_softmax outputs, not logits")
    if opts.tail == "bucket":
        mass = torch.where(slot, lpv.double().exp(), torch.zeros((), dtype=torch.float64, device=dev)).sum(1)
        if bool((mass > 1 + 1e-3).any()):
            row = int((mass > 1 + 1e-3).nonzero()[0, 0])
            raise ValueError(f"teacher_logprobs of row {row} sum to probability {float(mass[row]):.4f} > 1 with "
                             f"tail='bucket'; they must be normalized over the full vocabulary (or use tail='renormalize')")
    if labels is not None:
        bad = (labels != opts.ignore_index) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"labels must lie in [0, V={V}) or equal ignore_index={opts.ignore_index}; "
                             f"row {row} has {int(labels[row])}")


# ----------------------------------------------------------------------------------------------
# the per-row category math ([N, k], float64)
# ----------------------------------------------------------------------------------------------
def _category_terms(logq_S: torch.Tensor, slot: torch.Tensor, lp: torch.Tensor, opts: DistillOptions):
    """Divergence over the k+1 categories and its derivative factors.

    logq_S [c, k] float64 (log q at the teacher ids), slot [c, k] bool, lp [c, k] teacher log-probs.
    Returns (div [c], b_S [c, k], a_rest [c], cbar [c], q_S [c, k]) with b = q·∂D/∂q, c̄ = Σ_c b_c.
    Rows without any slot get div = 0 and zero factors.
    """
    zero = torch.zeros((), dtype=torch.float64, device=logq_S.device)
    ninf = torch.full((), float("-inf"), dtype=torch.float64, device=logq_S.device)
    has = slot.any(1)  # [c]
    logq_S = torch.where(slot, logq_S, ninf)
    q_S = logq_S.exp()  # [c, k], 0 in empty slots
    q_rest = (1.0 - q_S.sum(1)).clamp(min=0.0)  # [c]
    lp = torch.where(slot, lp.double(), ninf)
    if opts.tail == "renormalize":
        lse_p = torch.logsumexp(lp, dim=1, keepdim=True)
        lp = torch.where(slot & has[:, None], lp - torch.where(has[:, None], lse_p, zero), ninf)
        p_rest = torch.zeros_like(q_rest)
    else:
        p_rest = (1.0 - lp.exp().sum(1)).clamp(min=0.0)
    p_S = lp.exp()
    logp_S = lp.clamp(min=LOG_FLOOR)  # floored where a log of p is taken
    logq_Sf = torch.where(slot, logq_S, zero)  # finite stand-in in empty slots, where q = p = 0
    q_rest_f = q_rest.clamp(min=TAIL_FLOOR)
    logq_rest = q_rest_f.log()
    logp_rest = p_rest.clamp(min=TAIL_FLOOR).log()

    if opts.divergence == "forward_kl":
        div = torch.where(p_S > 0, p_S * (logp_S - logq_Sf), zero).sum(1) \
            + torch.where(p_rest > 0, p_rest * (logp_rest - logq_rest), zero)
        b_S = -p_S
        a_rest = -p_rest / q_rest_f
    elif opts.divergence == "reverse_kl":
        div = torch.where(q_S > 0, q_S * (logq_Sf - logp_S), zero).sum(1) \
            + torch.where(q_rest > 0, q_rest * (logq_rest - logp_rest), zero)
        b_S = torch.where(q_S > 0, q_S * (logq_Sf - logp_S + 1.0), zero)
        a_rest = logq_rest - logp_rest + 1.0
    else:  # jsd
        beta = float(opts.beta)
        lb, l1b = math.log(beta), math.log1p(-beta)
        logm_S = torch.logaddexp(lb + lp, l1b + logq_S)  # lp / logq_S may be -inf: logaddexp handles it
        logm_S = torch.where(slot, logm_S, zero)
        lp_rest_true = torch.where(p_rest > 0, p_rest.clamp(min=1e-300).log(), ninf)
        logm_rest = torch.logaddexp(lb + lp_rest_true, l1b + logq_rest)
        div = beta * (torch.where(p_S > 0, p_S * (logp_S - logm_S), zero).sum(1)
                      + torch.where(p_rest > 0, p_rest * (logp_rest - logm_rest), zero)) \
            + (1 - beta) * (torch.where(q_S > 0, q_S * (logq_Sf - logm_S), zero).sum(1)
                            + torch.where(q_rest > 0, q_rest * (logq_rest - logm_rest), zero))
        b_S = torch.where(q_S > 0, (1 - beta) * q_S * (logq_Sf - logm_S), zero)
        a_rest = (1 - beta) * (logq_rest - logm_rest)
    b_S = torch.where(slot, b_S, zero)
    cbar = b_S.sum(1) + q_rest * a_rest
    div = torch.where(has, div, zero)
    a_rest = torch.where(has, a_rest, zero)
    cbar = torch.where(has, cbar, zero)
    return div, b_S, a_rest, cbar, q_S


# ----------------------------------------------------------------------------------------------
# the chunk driver
# ----------------------------------------------------------------------------------------------
def _row_weights(labels, N, opts, device):
    """valid [N] bool and the mean divisor."""
    if labels is None:
        valid = torch.ones(N, dtype=torch.bool, device=device)
    else:
        valid = labels != opts.ignore_index
    return valid


def _chunk_terms(buf, lse_T, lse_1, ids_c, lp_c, labels_c, valid_c, opts: DistillOptions):
    """Row losses and gradient coefficients of one chunk (upstream gradient 1 per row).

    Returns loss [c] fp32, s_q [c], s_1 [c] | None, sparse_ids [c, m] int64, sparse_coef [c, m] fp32.
    """
    T = float(opts.temperature)
    alpha = 1.0 - float(opts.ce_weight)
    slot = ids_c >= 0
    safe = ids_c.clamp(min=0).long()
    z_S = buf.gather(1, safe).double()  # [c, k] raw logits at the teacher ids
    logq_S = z_S / T - lse_T.double()[:, None]
    div, b_S, a_rest, cbar, q_S = _category_terms(logq_S, slot, lp_c, opts)
    vmask = valid_c.double()
    loss = alpha * T * T * div
    s_q = alpha * T * (a_rest - cbar)
    coef = alpha * T * (b_S - q_S * a_rest[:, None])  # [c, k]
    coef = torch.where(slot, coef, torch.zeros((), dtype=torch.float64, device=coef.device))
    sparse_ids, sparse_coef = safe, coef
    s_1 = None
    if opts.ce_weight > 0:
        lab = labels_c.clamp(min=0).long()
        z_lab = buf.gather(1, lab[:, None]).squeeze(1).double()
        loss = loss + opts.ce_weight * (lse_1.double() - z_lab)
        s_1 = torch.full_like(s_q, float(opts.ce_weight)) * vmask
        sparse_ids = torch.cat([safe, lab[:, None]], dim=1)
        sparse_coef = torch.cat([coef, torch.full_like(coef[:, :1], -float(opts.ce_weight))], dim=1)
    loss = loss * vmask
    s_q = s_q * vmask
    sparse_coef = sparse_coef * vmask[:, None]
    return (loss.float(), s_q.float(), (s_1.float() if s_1 is not None else None), sparse_ids,
            sparse_coef.float())


class _State:
    """What the forward pass hands to backward."""

    __slots__ = ("mode", "dH", "dW", "db", "lse_T", "lse_1", "s_q", "s_1", "sp_ids", "sp_coef", "chunk")


def _forward(hidden, weight, bias, ids, lp, labels, opts: DistillOptions, backend: str, need_grad: bool):
    impl = _backend_impl(backend)
    N, d = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    chunk = opts.chunk_rows or _default_chunk_rows(V, dev)
    T = float(opts.temperature)
    need1 = opts.ce_weight > 0
    valid = _row_weights(labels, N, opts, dev)
    n_valid = int(valid.sum()) if opts.reduction == "mean" else 1
    grad_in_fwd = need_grad and opts.reduction in ("mean", "sum")
    scale = 1.0 / max(n_valid, 1) if opts.reduction == "mean" else 1.0

    loss_rows = torch.empty(N, dtype=torch.float32, device=dev)
    st = _State()
    st.chunk = chunk
    st.mode = "none"
    if grad_in_fwd:
        st.mode = "precomputed"
        st.dH = torch.empty(N, d, dtype=torch.float32, device=dev)
        st.dW = torch.zeros(V, d, dtype=torch.float32, device=dev)
        st.db = torch.zeros(V, dtype=torch.float32, device=dev) if bias is not None else None
    elif need_grad:
        st.mode = "recompute"
        st.lse_T = torch.empty(N, dtype=torch.float32, device=dev)
        st.lse_1 = torch.empty(N, dtype=torch.float32, device=dev) if need1 else None
        st.s_q = torch.empty(N, dtype=torch.float32, device=dev)
        st.s_1 = torch.empty(N, dtype=torch.float32, device=dev) if need1 else None
        m = ids.shape[1] + (1 if need1 else 0)
        st.sp_ids = torch.empty(N, m, dtype=torch.int64, device=dev)
        st.sp_coef = torch.empty(N, m, dtype=torch.float32, device=dev)

    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        h_c = hidden[s:e]
        buf, lse_T, lse_1 = impl.logits_lse(h_c, weight, bias, T, need1, True)  # buf [c, V] fp32
        lab_c = labels[s:e] if labels is not None else None
        loss_c, s_q, s_1, sp_ids, sp_coef = _chunk_terms(buf, lse_T, lse_1, ids[s:e], lp[s:e], lab_c, valid[s:e], opts)
        loss_rows[s:e] = loss_c
        if st.mode == "precomputed":
            if scale != 1.0:
                s_q = s_q * scale
                s_1 = s_1 * scale if s_1 is not None else None
                sp_coef = sp_coef * scale
            st.dH[s:e] = impl.dense_grad(buf, h_c, weight, bias, T, lse_T, lse_1, s_q, s_1, st.dW, st.db,
                                         sp_ids, sp_coef)
        elif st.mode == "recompute":
            st.lse_T[s:e] = lse_T
            if need1:
                st.lse_1[s:e] = lse_1
                st.s_1[s:e] = s_1
            st.s_q[s:e] = s_q
            st.sp_ids[s:e] = sp_ids
            st.sp_coef[s:e] = sp_coef
        del buf

    if opts.reduction == "none":
        out = loss_rows
    else:
        out = loss_rows.sum() * scale
    return out, st


def _backward_recompute(hidden, weight, bias, st: _State, grad_rows: torch.Tensor, opts: DistillOptions, backend: str):
    impl = _backend_impl(backend)
    N, d = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    T = float(opts.temperature)
    need1 = st.lse_1 is not None
    dH = torch.empty(N, d, dtype=torch.float32, device=dev)
    dW = torch.zeros(V, d, dtype=torch.float32, device=dev)
    db = torch.zeros(V, dtype=torch.float32, device=dev) if bias is not None else None
    g = grad_rows.float()
    for s in range(0, N, st.chunk):
        e = min(N, s + st.chunk)
        h_c = hidden[s:e]
        buf, _, _ = impl.logits_lse(h_c, weight, bias, T, False, True)
        gr = g[s:e]
        s_1 = st.s_1[s:e] * gr if need1 else None
        dH[s:e] = impl.dense_grad(buf, h_c, weight, bias, T, st.lse_T[s:e], st.lse_1[s:e] if need1 else None,
                                  st.s_q[s:e] * gr, s_1, dW, db, st.sp_ids[s:e], st.sp_coef[s:e] * gr[:, None])
        del buf
    return dH, dW, db


class _FusedDistillLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, lp, labels, opts: DistillOptions, backend: str):
        need_grad = any(ctx.needs_input_grad[:3])
        out, st = _forward(hidden, weight, bias, ids, lp, labels, opts, backend, need_grad)
        ctx.opts, ctx.backend, ctx.st = opts, backend, st
        ctx.has_bias = bias is not None
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        if st.mode == "recompute":
            ctx.save_for_backward(hidden, weight, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        st: _State = ctx.st
        if st is None:
            raise RuntimeError("fused_distill_loss: backward ran twice through a loss whose gradients were formed in "
                               "the forward pass (reduction 'mean'/'sum'); use reduction='none' and sum it yourself "
                               "if you need retain_graph=True")
        if st.mode == "precomputed":
            # scale the gradients formed in forward in place: no second copy of dW [V, d] at the peak
            dH, dW, db = st.dH, st.dW, st.db
            if not bool(grad_out == 1):
                g = grad_out.float()
                dH.mul_(g)
                dW.mul_(g)
                if db is not None:
                    db.mul_(g)
        else:
            hidden, weight, bias = ctx.saved_tensors
            dH, dW, db = _backward_recompute(hidden, weight, bias, st, grad_out, ctx.opts, ctx.backend)
        ctx.st = None  # free the precomputed gradients as soon as they are handed over
        hd, wd, bd = ctx.dtypes
        return (dH.to(hd), dW.to(wd), db.to(bd) if db is not None else None, None, None, None, None, None)


def fused_distill_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    labels: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    tail: str = "bucket",
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    validate: bool = True,
    chunk_rows: Optional[int] = None,
) -> torch.Tensor:
    """Distillation loss of a student's lm_head against sparse teacher targets, fused with the lm_head.

    Args:
        hidden: [N, d] student final hidden states (float32 | bfloat16 | float16).
        weight: [V, d] student lm_head weight, same dtype (may be tied to the embedding).
        teacher_ids: [N, k] int32/int64 teacher token ids, unique within a row; -1 marks an empty slot.
        teacher_logprobs: [N, k] teacher log-probabilities at those ids over the full vocabulary, already at
            ``temperature``; ignored in empty slots.
        labels: [N] hard labels; rows equal to ``ignore_index`` contribute nothing (and are not counted by "mean").
        bias: [V] optional lm_head bias.
        divergence: "forward_kl" | "reverse_kl" | "jsd" (M = beta·P + (1−beta)·Q).
        temperature: student logits are divided by it; the divergence term is scaled by T².
        ce_weight: loss_row = (1−ce_weight)·T²·D + ce_weight·CE(labels) at temperature 1.
        tail: "bucket" (k+1 categories: S plus one rest category) | "renormalize" (teacher renormalized over S).
        reduction: "mean" over rows not ignored (0.0 when none is left) | "sum" | "none" → [N].
        backend: "auto" | "triton" | "cpu" | "torch".
        validate: value checks on ids/log-probs/labels (one host sync each); switch off for speed.
        chunk_rows: rows per chunk (default: one fp32 [chunk, V] buffer of ≤ 32 MB on CPU, 2 GB on GPU).
    """
    opts = DistillOptions(divergence=divergence, beta=beta, temperature=temperature, ce_weight=ce_weight, tail=tail,
                          ignore_index=ignore_index, reduction=reduction, backend=backend, validate=validate,
                          chunk_rows=chunk_rows)
    opts.check()
    _validate_inputs(hidden, weight, teacher_ids, teacher_logprobs, labels, bias, opts)
    which = _backend.resolve_backend(backend, hidden.device, "fused_distill_loss", _CPU_SYMBOL)
    if hidden.shape[0] == 0:
        z = (hidden.sum() * 0.0 + weight.sum() * 0.0).float()
        return hidden.new_zeros((0,), dtype=torch.float32) if reduction == "none" else z
    return _FusedDistillLossFn.apply(hidden, weight, bias, teacher_ids, teacher_logprobs, labels, opts, which)
