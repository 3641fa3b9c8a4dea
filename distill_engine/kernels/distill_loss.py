"""Triton backend of ``fused_distill_loss``: the two vocabulary-wide passes of a row chunk.

The chunk driver (``ops/distill_loss.py``) calls, per chunk of c rows:

* :func:`logits_lse` -- logits l = h Wᵀ + b (temperature 1), their log-sum-exp at temperature T
  and (optionally) at temperature 1, and optionally the fp32 [c, V] logits buffer;
* :func:`dense_grad` -- the dense part of dL/dl, g = s_q·softmax(l/T) + s_1·softmax(l), and from it
  dH = g W (returned), dW += gᵀ h and db += Σ_rows g (accumulated in fp32).

Kernels (the tile GEMM, the online log-sum-exp step and the interpreter's bf16 rounding are the shared
helpers of ``kernels/_tiles.py``; ``logprobs_at`` runs these same kernels through its chunk driver):

* ``_loss_logits_lse_kernel`` -- tile GEMM over d with fp32 accumulation + online log-sum-exp over the
  vocabulary tiles of a row block; grid (row blocks, vocabulary splits); each split writes its
  running (max, sum) pair and a tiny combine in PyTorch merges the splits. With ``FROM_BUF`` it reads
  the logits from a buffer that cuBLAS filled instead of computing them (the ``cublas`` logits mode).
* ``_loss_dense_grad_kernel`` -- elementwise: g from the stored logits, in place in fp32 (fp32 inputs) or
  as a copy in the input dtype for the tensor-core gradient GEMMs (bf16/fp16), plus per-row-block
  column sums for db.
* ``_loss_buf_lse_kernel`` -- the exact tail's one extra reduction (issue 15): row log-sum-exp of the
  stored chunk buffer after the driver set the teacher ids to -inf (:func:`buf_lse`); also used by
  ``teacher_targets`` for the teacher's rest mass.
* ``_loss_recompute_grad_kernel`` -- buffer-free mode: recomputes a logits tile (same tile GEMM as the
  forward) and writes g for it, so no fp32 [c, V] buffer is ever kept between the passes.

The two gradient GEMMs (dH = g W, dW += gᵀ h) run in cuBLAS through ``torch.mm``/``torch.addmm``
with fp32 outputs (``out_dtype``) when the installed torch supports it (``_tiles.mm_f32``/``addmm_f32_``;
``DISTILL_ENGINE_GEMM_F32_OUT=0`` forces their fallback, with a one-time RuntimeWarning naming it).

Precision: fp32 inputs use IEEE fp32 dots (no TF32) so CPU interpreter tests match a float64
reference at ~1e-5; bf16/fp16 inputs use tensor-core dots accumulating in fp32. g is rounded once to
the input dtype for the gradient GEMMs (fp16: after a power-of-two rescale so small values do not
flush to zero); db is summed from the fp32 g.

Interpreter (TRITON_INTERPRET=1, CPU tensors) workarounds, both exact and compiled out on CUDA:
its bf16/fp16 ``tl.dot`` is wrong, so low-precision tiles are upcast to fp32 first (``DOT_MODE=2``),
and its fp32 -> bf16 cast truncates, so g is rounded to nearest-even by hand (``RTNE_FIX``).

Environment knobs (read at every call; for benchmarks and debugging):

* ``DISTILL_ENGINE_TRITON_LOGITS=cublas`` -- when the buffer is stored, form it with cuBLAS and run
  the log-sum-exp kernel over it (``FROM_BUF``) instead of the fused Triton tile GEMM.
* ``DISTILL_ENGINE_TRITON_AUTOTUNE=0`` -- on CUDA use the first (heuristic) config, no autotuning.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._tiles import (_logits_tile, _online_lse, _rtne_bf16, addmm_f32_, autotune_configs, check_device, combine_lse,
                     device_sm_count, dot_mode, interpreting, logits_mode, mm_f32, mm_f32_into, tile_args)
# the fp32-output GEMM probe under the names the GPU-path tests patch (tests/test_gpu_paths.py)
from ._tiles import f32_out_gemm_ok as _out_dtype_gemm_ok  # noqa: F401
from ._tiles import f32_out_gemm_ok_cached as _out_dtype_gemm_ok_cached  # noqa: F401
from ._tiles import warn_forced_fallback as _warn_forced_fallback  # noqa: F401

__all__ = ["logits_lse", "dense_grad", "buf_lse"]


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _loss_logits_lse_kernel(
    h_ptr, w_ptr, b_ptr, buf_ptr, part_ptr,
    C, V, D, v_per_split, inv_t,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_b, stride_buf,
    HAS_BIAS: tl.constexpr, STORE: tl.constexpr, FROM_BUF: tl.constexpr,
    NEED_LSE1: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Logits and online log-sum-exp of one row block over one vocabulary split.

    Program (i, s) owns rows [i·BLOCK_N, (i+1)·BLOCK_N) and vocabulary columns
    [s·v_per_split, min((s+1)·v_per_split, V)). For each vocabulary tile it forms the raw logits
    l = h Wᵀ + b with a tile GEMM over d (or loads them from ``buf`` when ``FROM_BUF``), stores them to
    ``buf`` when ``STORE``, and updates, per row and per temperature, the running pair (m, s):

        z     = l · inv_t                        (masked columns: z = -inf)
        m'    = max(m, max_j z_j)
        s     = s · exp(m - m') + Σ_j exp(z_j - m')
        m     = m'

    so that at the end logsumexp_split(z) = m + log s. m starts at -inf; every tile holds at least
    one valid column, so m' is finite from the first tile on and exp(m - m') = exp(-inf) = 0 — no
    inf - inf anywhere. The pairs go to ``part`` [4, n_split, C] = (m_T, s_T, m_1, s_1); the launcher
    merges splits: lse = M + log Σ_s s_s · exp(m_s - M), M = max_s m_s.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)      # [BN]
    mask_n = offs_n < C
    offs_n_ld = offs_n % C                                 # clamped rows for unmasked loads
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)

    m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m_1 = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_1 = tl.zeros((BLOCK_N,), dtype=tl.float32)

    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)                # [BV]
        mask_v = offs_v < v_end
        buf_ptrs = buf_ptr + offs_n.to(tl.int64)[:, None] * stride_buf + offs_v[None, :]
        if FROM_BUF:
            acc = tl.load(buf_ptrs, mask=mask_n[:, None] & mask_v[None, :], other=0.0)
        else:
            acc = _logits_tile(
                h_ptr, w_ptr, b_ptr, offs_n_ld, offs_v % V, D,
                stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
                HAS_BIAS, DOT_MODE, BLOCK_N, BLOCK_V, BLOCK_D,
            )                                              # [BN, BV] fp32
            if STORE:
                tl.store(buf_ptrs, acc, mask=mask_n[:, None] & mask_v[None, :])

        m_t, s_t = _online_lse(m_t, s_t, tl.where(mask_v[None, :], acc * inv_t, float("-inf")))
        if NEED_LSE1:
            m_1, s_1 = _online_lse(m_1, s_1, tl.where(mask_v[None, :], acc, float("-inf")))

    part = part_ptr + pid_s * C + offs_n                   # part[q, s, n] at (q·n_split + s)·C + n
    plane = n_split * C
    tl.store(part, m_t, mask=mask_n)
    tl.store(part + plane, s_t, mask=mask_n)
    if NEED_LSE1:
        tl.store(part + 2 * plane, m_1, mask=mask_n)
        tl.store(part + 3 * plane, s_1, mask=mask_n)


@triton.jit
def _loss_buf_lse_kernel(
    buf_ptr, out_ptr, C, V, inv_t, stride_buf,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Row log-sum-exp of a stored logits buffer whose masked entries are -inf (the teacher ids).

        out[n] = log Σ_v exp(buf[n, v] · inv_t)      (-inf entries: zero mass; an all -inf row: -inf)

    Online over vocabulary tiles with the running pair (m, s) (``_online_lse``). Unlike in
    ``_loss_logits_lse_kernel`` a whole tile of a row may be -inf here: the update's guarded shift keeps
    s = 0 for such rows and never forms -inf - -inf. The student's exact rest
    log-mass (issue 15) is one launch of this kernel: a streaming read of the buffer, no GEMM.
    """
    pid = tl.program_id(0)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)        # [BR]
    mask_r = offs_r < C
    rows = offs_r.to(tl.int64)[:, None] * stride_buf
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_C):
        offs_c = v0 + tl.arange(0, BLOCK_C)               # [BC]
        mask = mask_r[:, None] & (offs_c < V)[None, :]
        z = tl.load(buf_ptr + rows + offs_c[None, :], mask=mask, other=float("-inf")) * inv_t
        m, s = _online_lse(m, s, z)
    out = tl.where(s > 0.0, m + tl.log(tl.where(s > 0.0, s, 1.0)), float("-inf"))
    tl.store(out_ptr + offs_r, out, mask=mask_r)


@triton.jit
def _dense_g(l, offs_r, mask_r, mask, lse_t_ptr, lse_1_ptr, sq_ptr, s1_ptr, inv_t, HAS_LSE1: tl.constexpr):
    """g = s_q · exp(l · inv_t - lse_T) + s_1 · exp(l - lse_1) of one [BR, BC] logits tile (rows offs_r),
    0 outside ``mask``. The exponents are ≤ ~0 because lse ≥ max (up to fp32 rounding), so nothing
    overflows even for |l| ~ 1e4."""
    lse_t = tl.load(lse_t_ptr + offs_r, mask=mask_r, other=0.0)   # [BR]
    sq = tl.load(sq_ptr + offs_r, mask=mask_r, other=0.0)
    g = sq[:, None] * tl.exp(l * inv_t - lse_t[:, None])
    if HAS_LSE1:
        lse_1 = tl.load(lse_1_ptr + offs_r, mask=mask_r, other=0.0)
        s1 = tl.load(s1_ptr + offs_r, mask=mask_r, other=0.0)
        g += s1[:, None] * tl.exp(l - lse_1[:, None])
    return tl.where(mask, g, 0.0)


@triton.jit
def _store_scaled(ptrs, g, g_scale, mask, RTNE_FIX: tl.constexpr):
    """Store g · g_scale in the pointee dtype (the gradient GEMMs' operand), rounded to nearest even."""
    g_lp = g * g_scale
    if RTNE_FIX:
        g_lp = _rtne_bf16(g_lp)
    tl.store(ptrs, g_lp.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _loss_dense_grad_kernel(
    buf_ptr, glp_ptr, dbp_ptr, lse_t_ptr, lse_1_ptr, sq_ptr, s1_ptr,
    C, V, inv_t, g_scale, stride_buf, stride_glp,
    HAS_LSE1: tl.constexpr, WRITE_F32: tl.constexpr, WRITE_LP: tl.constexpr, HAS_BIAS: tl.constexpr,
    RTNE_FIX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Dense gradient with respect to the raw logits, from the stored logits l (elementwise).

        g[n, v] = s_q[n] · exp(l[n, v] · inv_t - lse_T[n])  +  s_1[n] · exp(l[n, v] - lse_1[n])

    i.e. s_q·softmax(l/T) + s_1·softmax(l) (``_dense_g``). Writes g over l in place (fp32) when
    ``WRITE_F32``, g · g_scale in the input dtype to ``glp`` when ``WRITE_LP`` (the operand of the
    tensor-core GEMMs; g_scale is a power of two that keeps fp16 from underflowing), and the column
    sums of this program's row block to ``dbp[pid_r, :]`` for the bias gradient (deterministic:
    the launcher sums the row blocks).
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)       # [BR]
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)       # [BC]
    mask_r = offs_r < C
    mask_c = offs_c < V
    mask = mask_r[:, None] & mask_c[None, :]
    rows = offs_r.to(tl.int64)[:, None]

    l = tl.load(buf_ptr + rows * stride_buf + offs_c[None, :], mask=mask, other=0.0)   # [BR, BC]
    g = _dense_g(l, offs_r, mask_r, mask, lse_t_ptr, lse_1_ptr, sq_ptr, s1_ptr, inv_t, HAS_LSE1)

    if WRITE_F32:
        tl.store(buf_ptr + rows * stride_buf + offs_c[None, :], g, mask=mask)
    if WRITE_LP:
        _store_scaled(glp_ptr + rows * stride_glp + offs_c[None, :], g, g_scale, mask, RTNE_FIX)
    if HAS_BIAS:
        tl.store(dbp_ptr + pid_r.to(tl.int64) * V + offs_c, tl.sum(g, axis=0), mask=mask_c)


@triton.jit
def _loss_recompute_grad_kernel(
    h_ptr, w_ptr, b_ptr, g_ptr, dbp_ptr, lse_t_ptr, lse_1_ptr, sq_ptr, s1_ptr,
    C, V, D, inv_t, g_scale,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_b, stride_g,
    HAS_BIAS: tl.constexpr, HAS_LSE1: tl.constexpr, WANT_DB: tl.constexpr, DOT_MODE: tl.constexpr,
    RTNE_FIX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Buffer-free dense gradient: recompute one logits tile, then form g for it.

        l = h Wᵀ + b                     (the tile GEMM of ``_loss_logits_lse_kernel``)
        g = s_q · exp(l · inv_t - lse_T) + s_1 · exp(l - lse_1)

    writes g · g_scale to ``g`` (input dtype, the operand of the gradient GEMMs) and the column sums
    of g over this row block to ``dbp[pid_n, :]`` when ``WANT_DB``.
    """
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < C
    mask_v = offs_v < V
    mask = mask_n[:, None] & mask_v[None, :]

    l = _logits_tile(
        h_ptr, w_ptr, b_ptr, offs_n % C, offs_v % V, D,
        stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
        HAS_BIAS, DOT_MODE, BLOCK_N, BLOCK_V, BLOCK_D,
    )                                                      # [BN, BV] fp32
    g = _dense_g(l, offs_n, mask_n, mask, lse_t_ptr, lse_1_ptr, sq_ptr, s1_ptr, inv_t, HAS_LSE1)
    _store_scaled(g_ptr + offs_n.to(tl.int64)[:, None] * stride_g + offs_v[None, :], g, g_scale, mask, RTNE_FIX)
    if WANT_DB:
        tl.store(dbp_ptr + pid_n.to(tl.int64) * V + offs_v, tl.sum(g, axis=0), mask=mask_v)


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------

# Under the interpreter every program runs in Python: tiny tiles keep the CPU tests fast while still
# exercising several tiles per axis at the test shapes.
_INTERP_TILE = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16)
_INTERP_EW = dict(BLOCK_R=16, BLOCK_C=64)
# Every vocabulary split is a multiple of this, so any autotuned BLOCK_V (≤ 256) divides it.
_CUDA_V_UNIT = 256

# Tile GEMM configs (first = the heuristic default). bf16/fp16 run on tensor cores (wgmma on
# Hopper); fp32 runs IEEE FMA dots, where smaller tiles are enough.
# Register rule (checked by the AOT compile check, distill_engine/kernels/_aot.py, for sm_90a): at most 64 fp32
# accumulator registers per thread (BLOCK_N·BLOCK_V / (32·num_warps) ≤ 64). The epilogue keeps the tile alive
# through the store and both temperatures' exp/sum, so 128 accumulators per thread (128×256 at 8 warps,
# 128×128 or 64×256 at 4 warps) spilled 200–600 B/thread with STORE, and 16 warps cap a thread at 128
# registers (spills again). The buffer stays fp32: a bf16 buffer would round l by up to |l|·2⁻⁹ (≈0.04 at
# |l| = 20), i.e. ~4% error in exp(l − lse), far over the 1e-2 bf16 budget of the gradient.
_CUDA_LP_CONFIGS = [
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=4),
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=64, BLOCK_V=256, BLOCK_D=64, num_warps=8, num_stages=3),
]
_CUDA_F32_CONFIGS = [
    dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=3),
    dict(BLOCK_N=128, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=3),
]
# Buffer-free recompute (fp32): its own tile, 2 stages: the first forward config spilled 8 B on Triton 3.6.
_CUDA_RECOMPUTE_F32 = dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=2)
_CUDA_EW = dict(BLOCK_R=16, BLOCK_C=512, num_warps=8)
# FROM_BUF (log-sum-exp over a cuBLAS-filled buffer) is a pure streaming pass: no tuning needed.
_CUDA_FROM_BUF = dict(BLOCK_N=16, BLOCK_V=256, BLOCK_D=16, num_warps=4, num_stages=2)


# Autotuned handles on CUDA (the key excludes C: the last, ragged chunk must not retune).
_lse_tuned_lp = triton.autotune(
    autotune_configs(_CUDA_LP_CONFIGS), key=["V", "D", "STORE", "FROM_BUF", "NEED_LSE1"]
)(_loss_logits_lse_kernel)
_lse_tuned_f32 = triton.autotune(
    autotune_configs(_CUDA_F32_CONFIGS), key=["V", "D", "STORE", "FROM_BUF", "NEED_LSE1"]
)(_loss_logits_lse_kernel)


def _autotune_enabled() -> bool:
    return os.environ.get("DISTILL_ENGINE_TRITON_AUTOTUNE", "1") != "0"


def _check_inputs(h, weight, bias):
    check_device(h, "fused_distill_loss / logprobs_at")
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"h [c, d] and weight [V, d] shapes do not match: {tuple(h.shape)} vs {tuple(weight.shape)}")
    if weight.dtype != h.dtype or (bias is not None and bias.dtype != h.dtype):
        raise ValueError(f"h, weight and bias must share one dtype, got {h.dtype}, {weight.dtype}, "
                         f"{None if bias is None else bias.dtype}")
    if h.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"h must be float32, bfloat16 or float16, got {h.dtype}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _plan_splits(c: int, V: int, dev: torch.device, split: Optional[int]) -> Tuple[int, int]:
    """(number of vocabulary splits, columns per split) for a chunk of c rows: enough (row block, split)
    programs to cover the SMs a few times over even when c is small; each split a multiple of the unit
    every autotuned BLOCK_V divides, and none empty."""
    interp = dev.type != "cuda"
    unit = _INTERP_TILE["BLOCK_V"] if interp else _CUDA_V_UNIT
    n_units = triton.cdiv(V, unit)
    if split is None:
        split = 1 if interp else triton.cdiv(4 * device_sm_count(dev), triton.cdiv(c, 128))
    split = max(1, min(int(split), n_units))
    v_per_split = triton.cdiv(n_units, split) * unit
    return triton.cdiv(V, v_per_split), v_per_split


def logits_lse(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    temperature: float,
    need_lse1: bool,
    store: bool,
    *,
    split: Optional[int] = None,
) -> Tuple[Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    """Logits and log-sum-exp of one row chunk.

    h [c, d], weight [V, d], bias [V] | None, one dtype (fp32 / bf16 / fp16), CUDA (or CPU under
    ``TRITON_INTERPRET=1``). Returns ``(buf, lse_T, lse_1)``:

    * buf   -- fp32 [c, V] raw logits l = h Wᵀ + b (temperature 1) when ``store``, else None;
    * lse_T -- fp32 [c] logsumexp(l / T);
    * lse_1 -- fp32 [c] logsumexp(l) when ``need_lse1``, else None.

    ``split`` (testing/tuning) forces the number of vocabulary splits; by default the launcher picks
    enough splits to fill the GPU even when c is small.
    """
    _check_inputs(h, weight, bias)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    c, d = h.shape
    V = weight.shape[0]
    dev = h.device
    f32 = torch.float32
    buf = torch.empty((c, V), device=dev, dtype=f32) if store else None
    if c == 0:
        empty = torch.empty((0,), device=dev, dtype=f32)
        return buf, empty, (empty.clone() if need_lse1 else None)

    inv_t = 1.0 / float(temperature)
    # At T = 1 the two log-sum-exps coincide: compute one.
    lse1_in_kernel = need_lse1 and inv_t != 1.0
    from_buf = store and dev.type == "cuda" and logits_mode("DISTILL_ENGINE_TRITON_LOGITS") == "cublas"
    if from_buf:
        # cuBLAS forms the whole fp32 buffer; the kernel only reads it for the log-sum-exp.
        mm_f32_into(buf, h, weight.t())
        if bias is not None:
            buf.add_(bias.float())

    split, v_per_split = _plan_splits(c, V, dev, split)
    part = torch.empty((4 if lse1_in_kernel else 2, split, c), device=dev, dtype=f32)   # (m_T, s_T, m_1, s_1)
    ptrs, strides = tile_args(h, weight, bias)
    buf_arg = buf if buf is not None else part               # dummy pointer when nothing is stored
    args = (*ptrs, buf_arg, part, c, V, d, v_per_split, inv_t, *strides, V)
    flags = dict(
        HAS_BIAS=bias is not None, STORE=store and not from_buf, FROM_BUF=from_buf,
        NEED_LSE1=lse1_in_kernel, DOT_MODE=dot_mode(h),
    )
    if interpreting(h):
        _loss_logits_lse_kernel[(triton.cdiv(c, _INTERP_TILE["BLOCK_N"]), split)](*args, **flags, **_INTERP_TILE)
    else:
        grid = lambda meta: (triton.cdiv(c, meta["BLOCK_N"]), split)  # noqa: E731
        cfgs = _CUDA_F32_CONFIGS if h.dtype == f32 else _CUDA_LP_CONFIGS
        if from_buf:
            _loss_logits_lse_kernel[grid](*args, **flags, **_CUDA_FROM_BUF)
        elif _autotune_enabled():
            (_lse_tuned_f32 if h.dtype == f32 else _lse_tuned_lp)[grid](*args, **flags)
        else:
            _loss_logits_lse_kernel[grid](*args, **flags, **cfgs[0])

    lse_T = combine_lse(part[0], part[1], dim=0)
    if not need_lse1:
        lse_1 = None
    elif lse1_in_kernel:
        lse_1 = combine_lse(part[2], part[3], dim=0)
    else:
        lse_1 = lse_T.clone()
    return buf, lse_T, lse_1


def buf_lse(buf: torch.Tensor, temperature: float) -> torch.Tensor:
    """logsumexp(buf / T) per row, fp32 [c], for a contiguous fp32 [c, V] buffer whose masked entries are -inf.

    The exact rest log-mass of the student (the chunk driver masks the teacher ids first): one streaming
    pass over the buffer (``_loss_buf_lse_kernel``), no GEMM.
    """
    if buf.dtype != torch.float32 or buf.dim() != 2 or not buf.is_contiguous():
        raise ValueError(f"buf must be a contiguous float32 [c, V] tensor, got {buf.dtype} {tuple(buf.shape)}")
    c, V = buf.shape
    out = torch.empty((c,), device=buf.device, dtype=torch.float32)
    if c == 0:
        return out
    interp = interpreting(buf)
    br, bc = (16, 64) if interp else (4, 1024)
    launch = {} if interp else dict(num_warps=4)
    _loss_buf_lse_kernel[(triton.cdiv(c, br),)](buf, out, c, V, 1.0 / float(temperature), V,
                                                 BLOCK_R=br, BLOCK_C=bc, **launch)
    return out


def _fp16_scale(s_q: torch.Tensor, s_1: Optional[torch.Tensor], sparse_coef: Optional[torch.Tensor]) -> float:
    """Power of two making |g| ≤ 1 before the fp16 cast.

    Per row |g_v| ≤ |s_q| + |s_1| + Σ_j |coef_j| (both softmaxes are ≤ 1).
    """
    amax = s_q.abs()
    if s_1 is not None:
        amax = amax + s_1.abs()
    if sparse_coef is not None and sparse_coef.numel():
        amax = amax + sparse_coef.to(torch.float32).abs().sum(dim=1)
    top = float(amax.max()) if amax.numel() else 0.0
    if not math.isfinite(top) or top <= 0.0:
        return 1.0
    return 2.0 ** (-math.ceil(math.log2(top)))


def _grad_from_buf(buf, dtype, stats, inv_t, g_scale, has_lse1, want_db):
    """``_loss_dense_grad_kernel`` over the stored logits: (g [c, V] -- buf itself for fp32, else a copy in
    ``dtype`` --, per-row-block db partial sums [row blocks, V] | None)."""
    c, V = buf.shape
    low = dtype != torch.float32
    interp = interpreting(buf)
    ew = _INTERP_EW if interp else _CUDA_EW
    g_lp = torch.empty((c, V), device=buf.device, dtype=dtype) if low else buf
    n_rb = triton.cdiv(c, ew["BLOCK_R"])
    dbp = torch.empty((n_rb, V), device=buf.device, dtype=torch.float32) if want_db else None
    launch = dict(BLOCK_R=ew["BLOCK_R"], BLOCK_C=ew["BLOCK_C"])
    if not interp:
        launch["num_warps"] = ew["num_warps"]
    _loss_dense_grad_kernel[(n_rb, triton.cdiv(V, ew["BLOCK_C"]))](
        buf, g_lp, dbp if want_db else buf, *stats, c, V, inv_t, g_scale, V, V,
        HAS_LSE1=has_lse1, WRITE_F32=not low, WRITE_LP=low, HAS_BIAS=want_db,
        RTNE_FIX=interp and dtype == torch.bfloat16, **launch,
    )
    return g_lp, dbp


def _grad_recompute(h, weight, bias, stats, inv_t, g_scale, has_lse1, want_db):
    """``_loss_recompute_grad_kernel``: the logits formed again tile by tile, g written in the input dtype;
    returns (g [c, V], db partial sums | None) like :func:`_grad_from_buf`."""
    c, V = h.shape[0], weight.shape[0]
    interp = interpreting(h)
    if interp:
        cfg = dict(_INTERP_TILE)
    else:
        cfg = dict(_CUDA_RECOMPUTE_F32 if h.dtype == torch.float32 else _CUDA_LP_CONFIGS[0])
    g_lp = torch.empty((c, V), device=h.device, dtype=h.dtype)
    n_rb = triton.cdiv(c, cfg["BLOCK_N"])
    dbp = torch.empty((n_rb, V), device=h.device, dtype=torch.float32) if want_db else None
    ptrs, strides = tile_args(h, weight, bias)
    _loss_recompute_grad_kernel[(n_rb, triton.cdiv(V, cfg["BLOCK_V"]))](
        *ptrs, g_lp, dbp if want_db else g_lp, *stats, c, V, h.shape[1], inv_t, g_scale, *strides, V,
        HAS_BIAS=bias is not None, HAS_LSE1=has_lse1, WANT_DB=want_db, DOT_MODE=dot_mode(h),
        RTNE_FIX=interp and h.dtype == torch.bfloat16, **cfg,
    )
    return g_lp, dbp


def _add_sparse(g_lp, buf, ids, coef, stats, inv_t, g_scale, has_lse1):
    """g[n, ids[n, j]] += coef[n, j] (scatter-add: repeated ids in a row add up), on the fp32 g or its
    input-dtype copy."""
    if g_lp.dtype == torch.float32:
        g_lp.scatter_add_(1, ids, coef)                      # the fp32 g (buf itself when given)
        return
    lse_T, lse_1, s_q, s_1 = stats
    # Only the m touched entries per row of the input-dtype copy change. Their new value is
    # dense + Σ(coef of equal ids) (repeated ids, e.g. a label that is also a teacher id, add
    # up; [c, m, m] is small), so every duplicate writes the same value: deterministic.
    same = (ids[:, :, None] == ids[:, None, :]).to(torch.float32)   # [c, m, m]
    coef_sum = torch.bmm(same, coef[:, :, None]).squeeze(2)        # [c, m]
    if buf is not None:
        # buf still holds the fp32 logits: the dense part at the ids, exactly as the kernel formed it
        l_S = buf.gather(1, ids)                                   # [c, m]
        dense_S = s_q[:, None] * torch.exp(l_S * inv_t - lse_T[:, None])
        if has_lse1:
            dense_S = dense_S + s_1[:, None] * torch.exp(l_S - lse_1[:, None])
        vals = (dense_S + coef_sum) * g_scale
    else:
        # no fp32 g to start from: read the dense part back from the rounded copy
        vals = g_lp.gather(1, ids).to(torch.float32) + coef_sum * g_scale
    g_lp.scatter_(1, ids, vals.to(g_lp.dtype))


def dense_grad(
    buf: Optional[torch.Tensor],
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    temperature: float,
    lse_T: torch.Tensor,
    lse_1: Optional[torch.Tensor],
    s_q: torch.Tensor,
    s_1: Optional[torch.Tensor],
    dW_acc: Optional[torch.Tensor],
    db_acc: Optional[torch.Tensor],
    sparse_ids: Optional[torch.Tensor] = None,
    sparse_coef: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gradient pass of one row chunk.

    Forms g = s_q[:, None]·exp(l/T − lse_T[:, None]) + s_1[:, None]·exp(l − lse_1[:, None]) (the s_1
    term only when both ``s_1`` and ``lse_1`` are given), plus ``sparse_coef`` [c, m] added at
    ``sparse_ids`` [c, m] (scatter-add: repeated ids in a row add up), returns dH = g @ weight as fp32
    [c, d] and accumulates dW_acc (fp32 [V, d]) += gᵀ @ h and db_acc (fp32 [V]) += Σ_rows g (each
    skipped when None).

    With ``buf`` (the fp32 logits from :func:`logits_lse`), ``_loss_dense_grad_kernel`` turns it into g in
    place for fp32 inputs; for bf16/fp16 inputs it writes g in the input dtype instead (so both GEMMs
    run on tensor cores in cuBLAS) and leaves ``buf`` holding the logits (it is scratch after this
    call either way). Without ``buf``, ``_loss_recompute_grad_kernel`` recomputes the logits tile by tile
    and writes g into a temporary [c, V] buffer in the input dtype; the GEMMs are the same.
    """
    _check_inputs(h, weight, bias)
    c, d = h.shape
    V = weight.shape[0]
    f32 = torch.float32
    if c == 0:
        return torch.zeros((0, d), device=h.device, dtype=f32)
    if buf is not None and (buf.shape != (c, V) or buf.dtype != f32 or not buf.is_contiguous()):
        raise ValueError(f"buf must be a contiguous float32 [{c}, {V}] tensor, got {buf.dtype} {tuple(buf.shape)}")
    has_lse1 = s_1 is not None and lse_1 is not None
    lse_T = lse_T.to(f32).contiguous()
    s_q = s_q.to(f32).contiguous()
    lse_1 = lse_1.to(f32).contiguous() if has_lse1 else None
    s_1 = s_1.to(f32).contiguous() if has_lse1 else None
    # without the s_1 term the kernels still get valid pointers (never read: HAS_LSE1 is False)
    stats = (lse_T, lse_T if lse_1 is None else lse_1, s_q, s_q if s_1 is None else s_1)
    inv_t = 1.0 / float(temperature)
    # fp16 has a small exponent range: scale g into [-1, 1] by a power of two and undo it on the
    # fp32 GEMM outputs. bf16 shares fp32's range, so it needs none (and skips the host sync).
    g_scale = (_fp16_scale(s_q, s_1, sparse_coef if sparse_ids is not None else None)
               if h.dtype == torch.float16 else 1.0)
    want_db = db_acc is not None
    if buf is not None:
        g_lp, dbp = _grad_from_buf(buf, h.dtype, stats, inv_t, g_scale, has_lse1, want_db)
    else:
        g_lp, dbp = _grad_recompute(h, weight, bias, stats, inv_t, g_scale, has_lse1, want_db)
    if sparse_ids is not None:
        ids, coef = sparse_ids.long(), sparse_coef.to(f32)   # [c, m]
        _add_sparse(g_lp, buf, ids, coef, stats, inv_t, g_scale, has_lse1)
        if want_db:
            db_acc.index_add_(0, ids.reshape(-1), coef.reshape(-1))

    unscale = 1.0 / g_scale
    dH = mm_f32(g_lp, weight, unscale)                       # [c, d]
    if dW_acc is not None:
        addmm_f32_(dW_acc, g_lp.t(), h, unscale)             # [V, d] += [V, c] @ [c, d]
    if want_db:
        db_acc.add_(dbp[0] if dbp.shape[0] == 1 else dbp.sum(dim=0))
    return dH
