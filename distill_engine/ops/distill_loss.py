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
products dH = g W, dW += gᵀ h, db += Σ g — plus one reduction, ``buf_lse``, for the exact tail (below).
The per-row [N, k] category math below runs once, in float64.

Exact tail bucket (issue 15; docs/ARCHITECTURE.md, "The exact tail bucket"): the teacher ids are set to
−inf in the chunk buffer, lse_rest = buf_lse(buf, T) = log Σ_{v∉S} exp(l_v/T), and lse_T is rebuilt in
float64 as logaddexp(lse_rest, logsumexp_S(z_S)), so log q_rest = lse_rest − lse_T is exact in log space at
any confidence (never 1 − Σ_S q, no floor). With S masked the dense pass forms 0 at S and each j ∈ S gets its
whole gradient α·T·(b_j − q_j·c̄) sparsely; for v ∉ S the dense coefficient is α·T·(b_rest − c̄·q_rest) against
lse_rest (O(1) at any confidence), or the equivalent α·T·(a_rest − c̄) against lse_T when q_rest > e^-16.
LOG_FLOOR floors only the teacher's log-probabilities inside reverse KL.

Memory: one fp32 [chunk, V] buffer at a time (``chunk_rows``; default from the "distill_loss" chunk policy of
``_backend.chunk_rows``), never [N, V]. When the loss is a scalar
(reduction "mean"/"sum") and gradients are needed, the gradients are formed during the forward pass from
the same buffer (no logits recompute) and ``backward`` only scales them.

Layers: the backends (registered in ``_backend`` under "fused_distill_loss") → the launcher-level functions
:func:`validate_inputs`, :func:`forward`, :func:`backward` (used by the autograd Function here and by the torch.library op
in ``ops/library.py``) → ``fused_distill_loss`` → ``modules.FusedDistillLoss``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import torch

from .. import _backend
from .._validate import (FLOAT_DTYPES, INDEX_DTYPES, check_choice, check_finite_head, check_hidden_weight,
                         check_positive, check_positive_int, check_rest_values, check_target_values, check_tensor)
from ..reference import distill_loss as _torch_impl
from ..reference.distill_loss import LOG_FLOOR
from ._tail import logits_and_rest, mask_buf, mask_ids, repeated
from .logit_transform import active, check_transform, fold_scale

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TAILS = ("bucket", "renormalize")
REDUCTIONS = ("mean", "sum", "none")
OP = "fused_distill_loss"


@dataclasses.dataclass(frozen=True)
class DistillOptions:
    """Non-tensor options of the op (one object for the autograd.Function); validated on construction."""

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
    logit_scale: Optional[float] = None  # issue 12: z = s·l, then c·tanh(z/c) (ops/logit_transform.py)
    softcap: Optional[float] = None

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        check_choice("divergence", self.divergence, DIVERGENCES)
        check_choice("tail", self.tail, TAILS)
        check_choice("reduction", self.reduction, REDUCTIONS)
        check_choice("backend", self.backend, _backend.BACKENDS)
        check_positive("temperature", self.temperature)
        if not (isinstance(self.ce_weight, (int, float)) and 0.0 <= self.ce_weight <= 1.0):
            raise ValueError(f"ce_weight must be in [0, 1], got {self.ce_weight!r}")
        if self.divergence == "jsd" and not (isinstance(self.beta, (int, float)) and 0.0 < self.beta < 1.0):
            raise ValueError(f"beta must be strictly between 0 and 1 for divergence='jsd' (at 0 or 1 the JSD is "
                             f"identically 0), got {self.beta!r}")
        if self.divergence == "reverse_kl" and self.tail == "renormalize":
            raise ValueError("divergence='reverse_kl' is undefined with tail='renormalize' (the student has mass "
                             "where the renormalized teacher has none); use tail='bucket'")
        check_positive_int("chunk_rows", self.chunk_rows, optional=True)


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------
class DistillLossCpuImpl:
    """The loss's chunk contract on the C++ functions of csrc/cpu/distill_loss.cpp."""

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

    @staticmethod
    def buf_lse(buf, temperature):
        return _backend.cpu_extension().distill_buf_lse(buf, float(temperature))

    # The C++ logits pass can leave the teacher ids out of its log-sum-exps itself (same single pass, no
    # extra reduction over the buffer): the driver then skips buf_lse.
    fused_rest = True

    @staticmethod
    def logits_lse_excluding(h, weight, bias, temperature, need_lse1, exclude_ids):
        buf, rest_T, rest_1 = _backend.cpu_extension().distill_logits_lse(h, weight, bias, float(temperature),
                                                                          bool(need_lse1), exclude_ids)
        return buf, rest_T, (rest_1 if need_lse1 else None)


_backend.register_impl(OP, "torch", _torch_impl)
_backend.register_impl(OP, "cpu", DistillLossCpuImpl, cpu_symbol="distill_logits_lse")
_backend.register_impl(OP, "triton", "distill_engine.kernels.distill_loss")


def _impl(backend: str, opts: DistillOptions):
    """The registered backend, wrapped by the logit transform when one is active (raw logits, transformed
    elementwise in the chunk buffer)."""
    impl = _backend.impl_for(OP, backend)
    if active(opts.logit_scale, opts.softcap):
        from .logit_transform import TransformChunks

        return TransformChunks(impl, opts.logit_scale, opts.softcap)
    return impl


def _chunk_rows(V: int, device: torch.device) -> int:
    """Rows per chunk: one fp32 [chunk, V] buffer within the "distill_loss" budget of ``_backend.chunk_rows``."""
    return _backend.chunk_rows("distill_loss", None, 4 * V, device)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def validate_inputs(hidden, weight, ids, lp, labels, bias, rest, opts: DistillOptions) -> str:
    """Every argument check of the op (shapes, dtypes, devices; values unless ``opts.validate`` is False);
    returns the backend that will run."""
    _validate_inputs(hidden, weight, ids, lp, labels, bias, opts)
    _validate_rest(rest, hidden.shape[0], hidden.device, opts)
    return _backend.resolve_backend(opts.backend, hidden.device, OP)


def _validate_inputs(hidden, weight, ids, lp, labels, bias, opts: DistillOptions) -> None:
    check_hidden_weight(hidden, weight, bias)
    dev = hidden.device
    N, d = hidden.shape
    V = weight.shape[0]
    check_tensor("teacher_ids", ids, ndim=2, dtypes=INDEX_DTYPES, shape=(N, None), device=dev)
    k = ids.shape[1]
    if k < 1:
        raise ValueError("teacher_ids must have at least one slot per row (shape [N, k] with k >= 1)")
    check_tensor("teacher_logprobs", lp, ndim=2, dtypes=FLOAT_DTYPES + (torch.float64,), shape=(N, k), device=dev)
    if labels is not None:
        check_tensor("labels", labels, ndim=1, dtypes=INDEX_DTYPES, shape=(N,), device=dev)
    elif opts.ce_weight > 0:
        raise ValueError("ce_weight > 0 needs labels (the hard-label cross-entropy term); pass labels=... or set ce_weight=0")
    if not opts.validate or N == 0:
        return
    # value checks: one host sync each, skipped with validate=False
    # non-finite student inputs would come out as a NaN/inf loss: refuse them here, as teacher_targets does
    check_finite_head(hidden, weight, bias, "the student's ")
    check_target_values("teacher_ids", ids, "teacher_logprobs", lp, V,
                        " (merge duplicates, e.g. with de.teacher_targets(method='sample'))")
    slot = ids >= 0
    if opts.tail == "bucket":
        mass = torch.where(slot, lp.float().double().exp(), torch.zeros((), dtype=torch.float64, device=dev)).sum(1)
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


def _validate_rest(rest, N: int, dev, opts: DistillOptions) -> None:
    if rest is None:
        return
    check_tensor("teacher_rest_logprob", rest, ndim=1, dtypes=FLOAT_DTYPES + (torch.float64,), shape=(N,), device=dev)
    if not opts.validate or N == 0:
        return
    check_rest_values("teacher_rest_logprob", rest)


# ----------------------------------------------------------------------------------------------
# the per-row category math ([N, k], float64, all in log space)
# ----------------------------------------------------------------------------------------------
def _teacher_rest(lp: torch.Tensor, slot: torch.Tensor, rest_lp: Optional[torch.Tensor]) -> torch.Tensor:
    """log p_rest [c] float64: the teacher's exact rest log-mass when given, else log(1 − Σ_S p) (stable)."""
    if rest_lp is not None:
        return rest_lp.double()
    return _torch_impl.teacher_rest_from_slots(lp, slot)


def _category_terms(logq_S: torch.Tensor, logq_rest: torch.Tensor, slot: torch.Tensor, lp: torch.Tensor,
                    rest_lp: Optional[torch.Tensor], opts: DistillOptions):
    """Divergence over the k+1 categories and its derivative factors, in log space (no floor on q).

    logq_S [c, k] float64 (log q at the teacher ids), logq_rest [c] float64 (log of the student's exact mass
    outside S; −inf when S covers the vocabulary), slot [c, k] bool, lp [c, k] teacher log-probs, rest_lp [c]
    teacher rest log-mass | None. Returns (div [c], b_S [c, k], b_rest [c], cbar [c], q_S [c, k]) with
    b_c = q_c·∂D/∂q_c and c̄ = Σ_c b_c. b_rest stays finite however small q_rest is (forward KL: b_rest = −p_rest),
    which is what lets the chunk driver avoid a_rest = b_rest / q_rest. Rows without any slot get zeros.
    """
    zero = torch.zeros((), dtype=torch.float64, device=logq_S.device)
    ninf = torch.full((), float("-inf"), dtype=torch.float64, device=logq_S.device)
    has = slot.any(1)  # [c]
    logq_S = torch.where(slot, logq_S, ninf)
    q_S = logq_S.exp()  # [c, k], 0 in empty slots
    q_rest = logq_rest.exp()  # [c]; may underflow to 0 in float64 — every term below stays in log space
    lp = torch.where(slot, lp.double(), ninf)
    if opts.tail == "renormalize":
        lse_p = torch.logsumexp(lp, dim=1, keepdim=True)
        lp = torch.where(slot & has[:, None], lp - torch.where(has[:, None], lse_p, zero), ninf)
        logp_rest = torch.full_like(logq_rest, float("-inf"))
    else:
        logp_rest = _teacher_rest(lp, slot, rest_lp)
    # an empty rest category (S covers the vocabulary) has no teacher mass either (1 − Σp is rounding there)
    logp_rest = torch.where(torch.isfinite(logq_rest), logp_rest, ninf)
    p_S, p_rest = lp.exp(), logp_rest.exp()
    # finite stand-ins where a probability is exactly 0, so 0·log 0 terms are 0 (and no NaN from −inf − −inf)
    pS_pos, pr_pos, qS_pos, qr_pos = p_S > 0, p_rest > 0, q_S > 0, q_rest > 0
    lpf = torch.where(pS_pos, lp, zero)
    lprf = torch.where(pr_pos, logp_rest, zero)
    lqf = torch.where(slot, logq_S, zero)  # finite in every slot, even where q underflows (p·log q needs it)
    lqrf = torch.where(qr_pos | torch.isfinite(logq_rest), logq_rest, zero)

    if opts.divergence == "forward_kl":
        div = torch.where(pS_pos, p_S * (lpf - lqf), zero).sum(1) + torch.where(pr_pos, p_rest * (lprf - lqrf), zero)
        b_S, b_rest = -p_S, -p_rest
    elif opts.divergence == "reverse_kl":
        # the one floor: the teacher's log p (LOG_FLOOR), so zero teacher mass is a large finite penalty
        lpF = lp.clamp(min=LOG_FLOOR)
        lprF = logp_rest.clamp(min=LOG_FLOOR)
        t_S = torch.where(qS_pos, lqf - lpF, zero)
        t_r = torch.where(qr_pos, lqrf - lprF, zero)
        div = (q_S * t_S).sum(1) + q_rest * t_r
        b_S = torch.where(qS_pos, q_S * (t_S + 1.0), zero)
        b_rest = torch.where(qr_pos, q_rest * (t_r + 1.0), zero)
    else:  # jsd, M = β·P + (1−β)·Q, every log m by logaddexp
        beta = float(opts.beta)
        lb, l1b = math.log(beta), math.log1p(-beta)
        logm_S = torch.logaddexp(lb + lp, l1b + logq_S)  # −inf only where p = q = 0
        logm_rest = torch.logaddexp(lb + logp_rest, l1b + logq_rest)
        lmf = torch.where(torch.isfinite(logm_S), logm_S, zero)
        lmrf = torch.where(torch.isfinite(logm_rest), logm_rest, zero)
        div = beta * (torch.where(pS_pos, p_S * (lpf - lmf), zero).sum(1) + torch.where(pr_pos, p_rest * (lprf - lmrf), zero)) \
            + (1 - beta) * (torch.where(qS_pos, q_S * (lqf - lmf), zero).sum(1)
                            + torch.where(qr_pos, q_rest * (lqrf - lmrf), zero))
        b_S = torch.where(qS_pos, (1 - beta) * q_S * (lqf - lmf), zero)
        b_rest = torch.where(qr_pos, (1 - beta) * q_rest * (lqrf - lmrf), zero)
    b_S = torch.where(slot, b_S, zero)
    cbar = b_S.sum(1) + b_rest
    div = torch.where(has, div, zero)
    b_rest = torch.where(has, b_rest, zero)
    cbar = torch.where(has, cbar, zero)
    return div, b_S, b_rest, cbar, q_S


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


# Rows with log q_rest above this run the dense pass relative to the full log-sum-exp (so the CPU kernel can
# share one exp between the KD and CE terms at T = 1); below it, relative to the rest log-sum-exp, whose
# coefficient α·T·(b_rest − c̄·q_rest) is O(1) at any confidence (a_rest = b_rest/q_rest would overflow).
_FULL_LSE_MIN_LOGQ_REST = -16.0


def _chunk_terms(buf, lse_1, rest_lse, z_S, ids_c, lp_c, rest_lp_c, labels_c, valid_c, opts: DistillOptions):
    """Row losses and gradient coefficients of one chunk (upstream gradient 1 per row).

    buf has S masked to −inf; z_S [c, k] are the raw logits at the ids (read before masking); rest_lse [c] is
    logsumexp over the vocabulary minus S at temperature T. The dense gradient is s_d·exp(l/T − off) (0 at S),
    the sparse one coef at sparse_ids (S: the whole value, label: −ce_weight).
    Returns loss [c] fp32, s_d [c], off [c], lse_1 [c] | None (fp32, for the dense CE term), s_1 [c] | None,
    sparse_ids [c, m] int64, sparse_coef [c, m] fp32.
    """
    T = float(opts.temperature)
    alpha = 1.0 - float(opts.ce_weight)
    slot = ids_c >= 0
    safe = ids_c.clamp(min=0).long()
    z_S = z_S.double()
    rest_d = rest_lse.double()
    # The row's log-sum-exp rebuilt in float64 from its two exact parts: the rest (fp32, but weighted by q_rest
    # in the sum, so its rounding fades as the student grows confident) and the k raw logits at S (exact).
    # A repeated id (validate=False) counts once, as in the masked buffer.
    lse_S = torch.logsumexp(torch.where(slot & ~repeated(ids_c), z_S / T, float("-inf")), dim=1)
    lse_Td = torch.logaddexp(rest_d, lse_S)  # [c]
    if lse_1 is not None and T == 1.0:
        lse_1 = lse_Td  # the same quantity at T = 1 (and bit-equal offsets let the CPU kernel share one exp)
    logq_S = z_S / T - lse_Td[:, None]
    logq_rest = rest_d - lse_Td  # exact in log space: −inf only when S covers the vocabulary
    div, b_S, b_rest, cbar, q_S = _category_terms(logq_S, logq_rest, slot, lp_c, rest_lp_c, opts)
    zero = torch.zeros((), dtype=torch.float64, device=buf.device)
    vmask = valid_c.double()
    loss = alpha * T * T * div
    # dense part over v ∉ S: α·T·(a_rest − c̄)·q_v = α·T·(b_rest − c̄·q_rest)·exp(l_v/T − rest_lse)
    q_rest = logq_rest.exp()
    s_rest = alpha * T * (b_rest - cbar * q_rest)
    full = logq_rest > _FULL_LSE_MIN_LOGQ_REST
    s_d = torch.where(full, s_rest * torch.exp(torch.where(full, -logq_rest, zero)), s_rest)
    s_d = torch.where(torch.isfinite(logq_rest), s_d, zero)  # no rest category: no dense KD term
    off = torch.where(full | ~torch.isfinite(rest_d), lse_Td, rest_d)
    # sparse part at v ∈ S: the whole gradient there (the dense pass forms 0 at the masked ids)
    coef = alpha * T * (b_S - q_S * cbar[:, None])  # [c, k]
    coef = torch.where(slot, coef, zero)
    sparse_ids, sparse_coef = safe, coef
    s_1 = None
    if opts.ce_weight > 0:
        lab = labels_c.clamp(min=0).long()
        z_lab = buf.gather(1, lab[:, None]).squeeze(1).double()
        in_S = (safe == lab[:, None]) & slot
        # the label's raw logit: from z_S when the label is a (masked) teacher id
        z_lab = torch.where(in_S.any(1), torch.where(in_S, z_S, zero).sum(1), z_lab)
        loss = loss + opts.ce_weight * (lse_1.double() - z_lab)
        s_1 = torch.full_like(s_d, float(opts.ce_weight)) * vmask
        # CE's softmax at the masked ids, which the dense pass no longer forms there
        coef = coef + torch.where(slot, float(opts.ce_weight) * torch.exp(z_S - lse_1.double()[:, None]), zero)
        sparse_ids = torch.cat([safe, lab[:, None]], dim=1)
        sparse_coef = torch.cat([coef, torch.full_like(coef[:, :1], -float(opts.ce_weight))], dim=1)
    loss = loss * vmask
    s_d = s_d * vmask
    sparse_coef = sparse_coef * vmask[:, None]
    return (loss.float(), s_d.float(), off.float(), (lse_1.float() if lse_1 is not None else None),
            (s_1.float() if s_1 is not None else None), sparse_ids, sparse_coef.float())


class DistillState:
    """What :func:`forward` hands to :func:`backward`: the gradients formed in forward ("precomputed"), the row
    statistics of a recompute ("recompute"), or nothing ("none"; "consumed" once backward has run)."""

    __slots__ = ("mode", "dH", "dW", "db", "lse_T", "lse_1", "s_q", "s_1", "sp_ids", "sp_coef", "chunk", "ids",
                 "dtypes")


def forward(hidden, weight, bias, ids, lp, rest_lp, labels, opts: DistillOptions, backend: str,
            need_grad: bool) -> Tuple[torch.Tensor, DistillState]:
    """The chunk driver's forward pass on validated inputs (:func:`validate_inputs`), N > 0: (loss, state).

    With ``need_grad`` and reduction "mean"/"sum" the gradients are formed here, from the same chunk buffers;
    with reduction "none" the per-row statistics for a recompute in :func:`backward` are kept."""
    impl = _impl(backend, opts)
    N, d = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    chunk = opts.chunk_rows or _chunk_rows(V, dev)
    T = float(opts.temperature)
    need1 = opts.ce_weight > 0
    valid = _row_weights(labels, N, opts, dev)
    n_valid = int(valid.sum()) if opts.reduction == "mean" else 1
    grad_in_fwd = need_grad and opts.reduction in ("mean", "sum")
    scale = 1.0 / max(n_valid, 1) if opts.reduction == "mean" else 1.0

    loss_rows = torch.empty(N, dtype=torch.float32, device=dev)
    st = DistillState()
    st.chunk = chunk
    st.mode = "none"
    st.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
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
        st.ids = ids

    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        h_c = hidden[s:e]
        buf, rest_lse, lse_1, z_S = logits_and_rest(impl, h_c, weight, bias, T, need1, ids[s:e])
        lab_c = labels[s:e] if labels is not None else None
        rest_c = rest_lp[s:e] if rest_lp is not None else None
        loss_c, s_q, lse_T, lse_1, s_1, sp_ids, sp_coef = _chunk_terms(buf, lse_1, rest_lse, z_S, ids[s:e], lp[s:e],
                                                                       rest_c, lab_c, valid[s:e], opts)
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


def _backward_recompute(hidden, weight, bias, st: DistillState, grad_rows: torch.Tensor, opts: DistillOptions,
                        backend: str):
    impl = _impl(backend, opts)
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
        mask_buf(buf, *mask_ids(st.ids[s:e]))  # the same −inf at S as in forward (lse_T holds the dense offset)
        gr = g[s:e]
        s_1 = st.s_1[s:e] * gr if need1 else None
        dH[s:e] = impl.dense_grad(buf, h_c, weight, bias, T, st.lse_T[s:e], st.lse_1[s:e] if need1 else None,
                                  st.s_q[s:e] * gr, s_1, dW, db, st.sp_ids[s:e], st.sp_coef[s:e] * gr[:, None])
        del buf
    return dH, dW, db


def backward(st: DistillState, grad_out: torch.Tensor, opts: DistillOptions, backend: str,
             inputs: Optional[tuple] = None):
    """(dH, dW, db | None) in the inputs' dtypes for the upstream ``grad_out`` (a scalar, or [N] for reduction
    "none"). ``inputs`` = (hidden, weight, bias) for a "recompute" state. The state is consumed: the gradients
    formed in forward are scaled in place (no second copy of dW [V, d] at the peak) and handed over once."""
    if st.mode == "precomputed":
        dH, dW, db = st.dH, st.dW, st.db
        if not bool(grad_out == 1):
            g = grad_out.float()
            dH.mul_(g)
            dW.mul_(g)
            if db is not None:
                db.mul_(g)
    elif st.mode == "recompute":
        hidden, weight, bias = inputs
        dH, dW, db = _backward_recompute(hidden, weight, bias, st, grad_out, opts, backend)
    else:
        raise RuntimeError("fused_distill_loss: backward ran twice through a loss whose gradients were formed in "
                           "the forward pass (reduction 'mean'/'sum'); use reduction='none' and sum it yourself "
                           "if you need retain_graph=True")
    for slot in DistillState.__slots__[1:-1]:  # free the gradients / statistics as soon as they are handed over
        setattr(st, slot, None)
    st.mode = "consumed"
    hd, wd, bd = st.dtypes
    return dH.to(hd), dW.to(wd), (db.to(bd) if db is not None else None)


class _FusedDistillLossFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, lp, rest_lp, labels, opts: DistillOptions, backend: str):
        out, st = forward(hidden, weight, bias, ids, lp, rest_lp, labels, opts, backend, any(ctx.needs_input_grad[:3]))
        ctx.opts, ctx.backend, ctx.st = opts, backend, st
        if st.mode == "recompute":
            ctx.save_for_backward(hidden, weight, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        st: DistillState = ctx.st
        inputs = ctx.saved_tensors if st.mode == "recompute" else None
        return backward(st, grad_out, ctx.opts, ctx.backend, inputs) + (None,) * 6


def fused_distill_loss(hidden: torch.Tensor, weight: torch.Tensor, teacher_ids: torch.Tensor,
                       teacher_logprobs: torch.Tensor, *, labels: Optional[torch.Tensor] = None,
                       bias: Optional[torch.Tensor] = None, divergence: str = "forward_kl", beta: float = 0.5,
                       temperature: float = 1.0, ce_weight: float = 0.0, tail: str = "bucket", ignore_index: int = -100,
                       reduction: str = "mean", backend: str = "auto", validate: bool = True,
                       chunk_rows: Optional[int] = None, teacher_rest_logprob: Optional[torch.Tensor] = None,
                       logit_scale: Optional[float] = None, softcap: Optional[float] = None) -> torch.Tensor:
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
        teacher_rest_logprob: [N] optional log of the teacher's exact mass outside the row's ids (at
            ``temperature``; ``TeacherTargets.rest_logprob``); -inf for none. Used by tail="bucket"; when
            absent it is log(1 − Σ_S p) from ``teacher_logprobs`` (computed stably, but it cannot resolve a
            teacher rest mass below the rounding of those log-probs).
        logit_scale: s, the logits become s·(h Wᵀ + b) (Cohere, Granite = 1/logits_scaling, Falcon-H1, ...).
        softcap: c, the (scaled) logits become c·tanh(z/c) (Gemma 2/3 ``final_logit_softcapping``); both are
            applied before ``temperature`` and the CE term, gradients through tanh (ops/logit_transform.py).

    The rest category is exact at every confidence (docs/ARCHITECTURE.md, "The exact tail bucket"): the
    student's log q_rest is a log-sum-exp over the vocabulary minus the row's ids, minus the row's
    log-sum-exp, never 1 − Σ_S q; all category math is in log space (logaddexp for JSD's mixture) and the
    returned gradient is the gradient of the returned loss. The one floor, ``LOG_FLOOR = -100``, applies
    only to the teacher's log-probabilities (slots and rest) inside reverse KL, where a teacher probability
    of 0 would make the loss infinite; it never touches the student's log q, forward KL or JSD.
    """
    check_transform(logit_scale, softcap)
    if fold_scale(hidden, logit_scale, softcap):  # s·l = (s·h)Wᵀ + s·b exactly: the backend's own fast path
        hidden, bias = hidden * float(logit_scale), (bias * float(logit_scale) if bias is not None else None)
        logit_scale = None
    opts = DistillOptions(divergence=divergence, beta=beta, temperature=temperature, ce_weight=ce_weight, tail=tail,
                          ignore_index=ignore_index, reduction=reduction, backend=backend, validate=validate,
                          chunk_rows=chunk_rows, logit_scale=logit_scale, softcap=softcap)
    which = validate_inputs(hidden, weight, teacher_ids, teacher_logprobs, labels, bias, teacher_rest_logprob, opts)
    if hidden.shape[0] == 0:
        z = (hidden.sum() * 0.0 + weight.sum() * 0.0).float()
        return hidden.new_zeros((0,), dtype=torch.float32) if reduction == "none" else z
    rest = teacher_rest_logprob if opts.tail == "bucket" else None  # renormalize: the teacher has no rest mass
    return _FusedDistillLossFn.apply(hidden, weight, bias, teacher_ids, teacher_logprobs, rest, labels, opts, which)
