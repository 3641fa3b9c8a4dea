"""teacher_targets: sparse teacher targets (top-k or sampled ids with log-probabilities) straight from the
teacher's final hidden states and lm_head weight, without the teacher's [N, V] logits.

Math. With l = h Wᵀ + b, z = l / T and lse_T = log Σ_v exp(z_v) over the FULL vocabulary, every returned
log-probability is z_v − lse_T (method "topk") so ``tail="bucket"`` in ``fused_distill_loss`` sees the
true tail mass 1 − Σ_S p.

* ``method="topk"``: the k ids with the largest z (exact; ties may be broken either way), sorted by
  log-probability descending, plus ``rest_logprob`` [N]: log Σ_{v∉S} softmax(z)_v, the exact mass outside
  the ids, from a masked log-sum-exp over the chunk logits (issue 15; ``fused_distill_loss`` takes it as
  ``teacher_rest_logprob`` so the bucket tail never rebuilds it as 1 − Σ_S p).
* ``method="sample"`` (random-sampling KD, Anshumann et al. 2025): k draws with replacement from
  softmax(z); duplicates merged; each distinct id gets log(count / k); sorted by count descending, then
  id ascending; empty slots (-1, -inf) pad the row. E[count_v / k] = p_v, so the sparse target is an
  unbiased estimate of the teacher distribution (use it with ``tail="renormalize"``).
  The draws are exact inverse-CDF draws of the full-vocabulary distribution: a row gets k uniforms
  u ~ U[0, 1) from ``generator`` (drawn as one [N, k] float64 tensor, so chunking does not change them),
  sorted, and draw j is the smallest v with u_j < Σ_{w ≤ v} p_w. The backends resolve the sorted
  uniforms while streaming the vocabulary (torch: float64 block cumsums + searchsorted; cpu: a float64
  walk per row; triton: per-split masses → split of each draw → per-row draw pointers advanced tile by
  tile). The same generator state gives the same targets within one backend and device; across
  backends the same uniforms land on the same ids except where a uniform falls within float rounding
  (~1e-6) of a CDF boundary, so results agree almost always but are not guaranteed identical.

Memory: O(N·k) outputs plus one fp32 [chunk, V] buffer (torch, cpu) or, for triton, per-split candidate
tensors of [chunk, n_splits, k] (no [chunk, V] buffer at all). Never [N, V].
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import torch

from .. import _backend
from .._validate import (check_choice, check_finite_head, check_hidden_weight, check_positive, check_positive_int,
                         check_rest_values, check_target_values, check_tensor)
from ..reference import teacher_targets as _torch_impl
from ._tail import mask_buf, mask_ids
from .distill_loss import OP as _LOSS_OP
from .logit_transform import active as transform_active, check_transform

METHODS = ("topk", "sample")
OP = "teacher_targets"


# ----------------------------------------------------------------------------------------------
# the result type
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TeacherTargets:
    """Sparse teacher targets, the input format of ``fused_distill_loss``.

    ids:        [N, k] int32 token ids; -1 marks an empty slot (empty slots come last in a row).
    logprobs:   [N, k] float32 log-probabilities over the full vocabulary; -inf in empty slots.
    vocab_size: V of the teacher when known (needed by the bit-packed cache format).
    rest_logprob: [N] float32 log of the teacher's exact mass OUTSIDE the row's ids (at the targets'
                temperature; -inf when the ids hold all of it), or None when unknown (e.g. sampled targets,
                whose renormalized tail does not use it). ``fused_distill_loss(teacher_rest_logprob=...)``
                takes it so tail="bucket" sees the teacher's rest mass exactly, not as 1 − Σ_S p.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    vocab_size: Optional[int] = None
    rest_logprob: Optional[torch.Tensor] = None

    def __post_init__(self):
        check_tensor("ids", self.ids, ndim=2, dtypes=(torch.int32, torch.int64))
        check_tensor("logprobs", self.logprobs, ndim=2, shape=tuple(self.ids.shape), device=self.ids.device)
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size < 1):
            raise ValueError(f"vocab_size must be a positive int or None, got {self.vocab_size!r}")
        if self.rest_logprob is not None:
            check_tensor("rest_logprob", self.rest_logprob, ndim=1, shape=(self.ids.shape[0],), device=self.ids.device)

    def _with(self, ids, logprobs, rest) -> "TeacherTargets":
        return TeacherTargets(ids, logprobs, self.vocab_size, rest)

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    @property
    def device(self) -> torch.device:
        return self.ids.device

    @property
    def mask(self) -> torch.Tensor:
        """[N, k] bool: True where a slot holds a target."""
        return self.ids >= 0

    def to(self, device=None, non_blocking: bool = False) -> "TeacherTargets":
        rest = self.rest_logprob.to(device, non_blocking=non_blocking) if self.rest_logprob is not None else None
        return self._with(self.ids.to(device, non_blocking=non_blocking),
                          self.logprobs.to(device, non_blocking=non_blocking), rest)

    def cpu(self) -> "TeacherTargets":
        return self.to("cpu")

    def pin_memory(self) -> "TeacherTargets":
        rest = self.rest_logprob.pin_memory() if self.rest_logprob is not None else None
        return self._with(self.ids.pin_memory(), self.logprobs.pin_memory(), rest)

    def __getitem__(self, rows) -> "TeacherTargets":
        """Row selection (int, slice, index tensor); an int keeps the row dimension."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1) if rows != -1 else slice(-1, None)
        return self._with(self.ids[rows], self.logprobs[rows],
                          self.rest_logprob[rows] if self.rest_logprob is not None else None)

    @staticmethod
    def cat(parts: Sequence["TeacherTargets"]) -> "TeacherTargets":
        """Concatenate along rows; all parts must share k (and vocab_size when set)."""
        if not parts:
            raise ValueError("parts must hold at least one TeacherTargets")
        ks = {p.k for p in parts}
        if len(ks) != 1:
            raise ValueError(f"parts have different k {sorted(ks)}; targets of one batch must share k")
        vs = {p.vocab_size for p in parts if p.vocab_size is not None}
        if len(vs) > 1:
            raise ValueError(f"parts have different vocab_size {sorted(vs)}")
        # the exact rest mass survives only when every part has it (else the loss falls back to 1 − Σp)
        rest = (torch.cat([p.rest_logprob.float() for p in parts])
                if all(p.rest_logprob is not None for p in parts) else None)
        return TeacherTargets(torch.cat([p.ids for p in parts]), torch.cat([p.logprobs for p in parts]),
                              vs.pop() if vs else None, rest)

    def validate(self) -> "TeacherTargets":
        """Value checks (ids in [-1, V), unique per row, log-probs <= 0 and not NaN, -inf in empty slots)."""
        check_target_values("ids", self.ids, "logprobs", self.logprobs, self.vocab_size)
        if bool((~self.mask & (self.logprobs.float() != float("-inf"))).any()):
            raise ValueError("logprobs must be -inf in empty slots (ids == -1)")
        if self.rest_logprob is not None:
            check_rest_values("rest_logprob", self.rest_logprob)
        return self


# ----------------------------------------------------------------------------------------------
# options and validation
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TeacherTargetsOptions:
    """Non-tensor options of the op; validated on construction (``k <= V`` by :meth:`check` against the weight)."""

    k: int = 64
    temperature: float = 1.0
    method: str = "topk"
    backend: str = "auto"
    chunk_rows: Optional[int] = None
    validate: bool = True

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int):
            raise ValueError(f"k must be an int, got {self.k!r}")
        check_positive("temperature", self.temperature)
        check_choice("method", self.method, METHODS)
        check_choice("backend", self.backend, _backend.BACKENDS)
        check_positive_int("chunk_rows", self.chunk_rows, optional=True)

    def check(self, V: int) -> None:
        """The checks that need the vocabulary size V = weight.shape[0]."""
        if not 1 <= self.k <= V:
            raise ValueError(f"k must lie in [1, V={V}] (V = weight.shape[0]), got k={self.k}")


def validate_inputs(hidden, weight, bias, generator, opts: TeacherTargetsOptions) -> str:
    """Every argument check of the op (values too unless ``opts.validate`` is False); returns the backend that
    will run."""
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
        raise ValueError(f"hidden must be [N, d_t], got shape {tuple(hidden.shape)}; flatten it with hidden.flatten(0, 1)")
    check_hidden_weight(hidden, weight, bias)
    opts.check(weight.shape[0])
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if opts.method != "sample":
            raise ValueError("generator is only used by method='sample'; drop it for method='topk'")
    if opts.validate:
        check_finite_head(hidden, weight, bias, "the teacher's ")
    return _backend.resolve_backend(opts.backend, hidden.device, OP)


# ----------------------------------------------------------------------------------------------
# backends: topk(h_c, ...) -> (ids [c,k] int32, logprobs [c,k] fp32, lse [c]);
#           sample(h_c, ..., u_c) -> (draws [c,k] int64 non-decreasing, lse [c])
# ----------------------------------------------------------------------------------------------
class TeacherTargetsTorchImpl:
    """The chunk contract on the torch reference (``reference/teacher_targets.py``)."""

    needs_buffer = True

    topk = staticmethod(_torch_impl.topk_chunk)
    sample = staticmethod(_torch_impl.sample_chunk)


class TeacherTargetsCpuImpl:
    """The chunk contract on the C++ functions of csrc/cpu/teacher_targets.cpp."""

    needs_buffer = True

    @staticmethod
    def topk(h, weight, bias, k, inv_t, buf):
        ids, lp, lse = _backend.cpu_extension().teacher_topk_chunk(h, weight, bias, int(k), float(inv_t), buf)
        return ids, lp, lse

    @staticmethod
    def sample(h, weight, bias, inv_t, u, buf):
        draws, lse = _backend.cpu_extension().teacher_sample_chunk(h, weight, bias, float(inv_t), u, buf)
        return draws, lse


_backend.register_impl(OP, "torch", TeacherTargetsTorchImpl)
_backend.register_impl(OP, "cpu", TeacherTargetsCpuImpl, cpu_symbol="teacher_topk_chunk")
_backend.register_impl(OP, "triton", "distill_engine.kernels.teacher_targets:TeacherTargetsTritonImpl")


def _rest_logprob(z: torch.Tensor, ids: torch.Tensor, temperature: float, buf_lse) -> torch.Tensor:
    """log of the teacher's exact mass outside each row's ids, [c] fp32, from a chunk's fp32 logits ``z`` [c, V].

    ``z`` are the logits before division by ``temperature`` (1.0 when they are already scaled); it is scratch
    afterwards (the ids are set to -inf in place). log p_rest = lse_rest − logaddexp(lse_rest, lse_S) with
    lse_rest = log Σ_{v∉S} exp(z_v/T) (one masked log-sum-exp pass, ``buf_lse``) and lse_S over the k ids in
    float64: a sum of positives, exact at any confidence, where 1 − Σ_S p would cancel.
    """
    mids, has = mask_ids(ids)
    z_S = mask_buf(z, mids, has).double() / temperature  # [c, k]
    rest = buf_lse(z, temperature).double()  # [c]
    lse_S = torch.logsumexp(torch.where(ids >= 0, z_S, float("-inf")), dim=1)
    return (rest - torch.logaddexp(rest, lse_S)).float()


def _rest_logprob_recompute(h, weight, bias, ids, temperature: float, backend: str) -> torch.Tensor:
    """Rest log-mass for a backend that keeps no logits buffer (triton): the logits are formed again, by
    sub-chunks of at most 2^27 fp32 elements (one more lm_head GEMM for the teacher, never [N, V])."""
    _k = _backend.impl_for(_LOSS_OP, "triton")
    c, V = h.shape[0], weight.shape[0]
    rows = _backend.chunk_rows("teacher_rest", c, 4 * V, h.device)  # fp32 [rows, V] logits
    out = torch.empty(c, dtype=torch.float32, device=h.device)
    for s in range(0, c, rows):
        e = min(c, s + rows)
        buf, _, _ = _k.logits_lse(h[s:e], weight, bias, 1.0, False, True)  # raw logits [e−s, V] fp32
        out[s:e] = _rest_logprob(buf, ids[s:e], temperature, _k.buf_lse)
        del buf
    return out


def _chunk_rows(V: int, device: torch.device, needs_buffer: bool) -> int:
    """Rows per chunk: one fp32 [chunk, V] buffer within the "teacher_targets" budget of ``_backend.chunk_rows``."""
    if not needs_buffer:
        return 8192  # triton: per-chunk tensors are [chunk, n_splits, k], no [chunk, V] buffer
    return _backend.chunk_rows("teacher_targets", None, 4 * V, device)


# ----------------------------------------------------------------------------------------------
# draws -> targets
# ----------------------------------------------------------------------------------------------
def merge_draws(draws: torch.Tensor, V: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """k draws per row → (ids [c, k] int32, logprobs [c, k] fp32) with log(count / k).

    Distinct ids first, sorted by count descending then id ascending; the rest of the row is (-1, -inf).
    """
    c, k = draws.shape
    dev = draws.device
    d = torch.sort(draws, dim=1).values  # [c, k], equal ids now adjacent
    start = torch.ones_like(d, dtype=torch.bool)
    start[:, 1:] = d[:, 1:] != d[:, :-1]
    pos = torch.arange(k, device=dev).expand(c, k)
    run = torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), dim=1).values  # run start of each draw
    counts = torch.zeros(c, k, dtype=torch.int64, device=dev).scatter_add_(1, run, torch.ones_like(run))
    big = (k + 1) * (V + 1)
    key = torch.where(counts > 0, (k - counts) * (V + 1) + d, torch.full_like(d, big))
    order = torch.argsort(key, dim=1)
    cnt = counts.gather(1, order)
    ids = torch.where(cnt > 0, d.gather(1, order), torch.full_like(d, -1))
    lp = torch.where(cnt > 0, torch.log(cnt.double() / k), torch.full((), float("-inf"), dtype=torch.float64,
                                                                      device=dev))
    return ids.to(torch.int32), lp.float()


def draw_uniforms(N: int, k: int, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """[N, k] float64 uniforms in [0, 1), sorted per row, drawn in one call (chunking does not change them)."""
    gdev = generator.device if generator is not None else device
    u = torch.rand(N, k, dtype=torch.float64, generator=generator, device=gdev)
    return torch.sort(u.to(device), dim=1).values


# ----------------------------------------------------------------------------------------------
# the op
# ----------------------------------------------------------------------------------------------
def _run(hidden, weight, bias, opts: TeacherTargetsOptions, generator, backend: str,
         transform=(None, None)) -> TeacherTargets:
    impl = _backend.impl_for(OP, backend)
    if transform_active(*transform):  # transformed logits in the op's buffer; the rest pass reads them there
        from .logit_transform import TransformTargets

        impl = TransformTargets(_backend.impl_for(_LOSS_OP, backend), *transform, backend == "torch")
    N = hidden.shape[0]
    V = weight.shape[0]
    dev = hidden.device
    k = opts.k
    inv_t = 1.0 / float(opts.temperature)
    needs_buf = getattr(impl, "needs_buffer", False)
    chunk = opts.chunk_rows or _chunk_rows(V, dev, needs_buf)
    chunk = min(chunk, max(N, 1))
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    buf = torch.empty(chunk, V, dtype=torch.float32, device=dev) if needs_buf else None  # the one [chunk, V]
    ids = torch.empty(N, k, dtype=torch.int32, device=dev)
    lps = torch.empty(N, k, dtype=torch.float32, device=dev)
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    rest = torch.empty(N, dtype=torch.float32, device=dev) if opts.method == "topk" else None
    u = draw_uniforms(N, k, generator, dev) if opts.method == "sample" else None
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        h_c = hidden[s:e]
        if opts.method == "topk":
            ids[s:e], lps[s:e], lse[s:e] = impl.topk(h_c, weight, bias, k, inv_t, buf)
            if needs_buf:  # buf[:c] still holds this chunk's scaled logits z = l/T
                rest[s:e] = _rest_logprob(buf[:e - s], ids[s:e], 1.0, _backend.impl_for(_LOSS_OP, backend).buf_lse)
            else:
                rest[s:e] = _rest_logprob_recompute(h_c, weight, bias, ids[s:e], float(opts.temperature), backend)
        else:
            draws, lse[s:e] = impl.sample(h_c, weight, bias, inv_t, u[s:e].contiguous(), buf)
            ids[s:e], lps[s:e] = merge_draws(draws, V)
    del buf
    # a non-finite log-sum-exp means overflowing logits (finite but huge inputs): never return garbage
    bad = ~torch.isfinite(lse)
    if opts.method == "topk":
        bad = bad | ~torch.isfinite(lps).all(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"teacher logits of row {row} are not finite (hidden/weight too large or non-finite); "
                         f"check the teacher's hidden states and lm_head weight, or run with validate=True")
    return TeacherTargets(ids, lps, V, rest)


def teacher_targets(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    k: int = 64,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    method: str = "topk",
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
    chunk_rows: Optional[int] = None,
    validate: bool = True,
    logit_scale: Optional[float] = None,
    softcap: Optional[float] = None,
) -> TeacherTargets:
    """Top-k or sampled teacher targets from the teacher's final hidden states, never forming [N, V].

    Args:
        hidden: [N, d_t] teacher final hidden states (float32 | bfloat16 | float16; no gradient flows).
        weight: [V, d_t] teacher lm_head weight, same dtype.
        k: slots per row, 1 <= k <= V.
        bias: [V] optional lm_head bias.
        temperature: log-probabilities are of softmax(logits / temperature) over the full vocabulary.
        method: "topk" (exact k most probable ids) | "sample" (k draws with replacement, merged, log(count/k)).
        generator: torch.Generator for method="sample" (same state → same targets on one backend/device).
        backend: "auto" | "triton" | "cpu" | "torch".
        chunk_rows: rows per chunk (default: one fp32 [chunk, V] buffer ≤ 32 MB on CPU, 512 MB on GPU).
        validate: check hidden/weight/bias for non-finite values first (one pass over them; one host sync).
        logit_scale / softcap: the teacher's logits are z = s·(h Wᵀ + b), then c·tanh(z/c) when ``softcap``,
            before ``temperature`` — as in ``fused_distill_loss`` (ops/logit_transform.py).

    Returns:
        TeacherTargets(ids [N, k] int32 (-1 empty), logprobs [N, k] float32 (-inf empty), vocab_size=V,
        rest_logprob [N] float32 for method="topk" (log of the exact mass outside the k ids, from one more
        masked log-sum-exp pass over the chunk logits; the triton backend, which keeps no logits buffer, forms
        them again for it), None for method="sample").
    """
    opts = TeacherTargetsOptions(k=k, temperature=temperature, method=method, backend=backend,
                                 chunk_rows=chunk_rows, validate=validate)
    which = validate_inputs(hidden, weight, bias, generator, opts)
    check_transform(logit_scale, softcap)
    with torch.no_grad():
        hidden, weight = hidden.detach(), weight.detach()
        bias = bias.detach() if bias is not None else None
        if hidden.shape[0] == 0:
            return TeacherTargets(torch.empty(0, k, dtype=torch.int32, device=hidden.device),
                                  torch.empty(0, k, dtype=torch.float32, device=hidden.device), weight.shape[0],
                                  torch.empty(0, dtype=torch.float32, device=hidden.device) if method == "topk" else None)
        return _run(hidden, weight, bias, opts, generator, which, (logit_scale, softcap))
