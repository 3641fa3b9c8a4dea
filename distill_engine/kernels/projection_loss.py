"""Triton kernels for the projection loss (the ``triton`` backend of ``fused_projection_loss``).

One row chunk at a time (``ops/projection_loss.py`` drives the chunks):

1. ``_proj_fwd_kernel``: a tile GEMM y = h Pᵀ + b over d_s with fp32 accumulation (the shared
   ``_tiles._logits_tile``), whose epilogue reduces the [BLOCK_M, BLOCK_N] tile straight to per-row partial
   sums (one slot per d_t tile, summed in a fixed order afterwards so the result is deterministic). mse also
   writes its gradient tile g = s·2(y − t)/d_t (it needs no whole-row statistic); cosine writes the fp32 y
   tile when a gradient is wanted, because its gradient needs the whole-row dot products first.
2. ``_proj_cosine_grad_kernel``: g = α·y + β·t per element, from the per-row coefficients.
3. dh = g P, dW += gᵀ h, db += Σ g as library GEMMs on the chunk's g buffer.

The [N, d_t] projection is never written: at most one [chunk, d_t] buffer (fp32 y / g, plus g in the
input dtype for a low-precision cosine) is alive.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._backend import triton_interpret
from ._tiles import _logits_tile, dot_mode

_MSE, _COSINE = 0, 1
_NSTAT = 4  # per-row partial sums: mse (Σr², 0, 0, Σt·0) | cosine (Σy·t, Σy², Σt², Σt·0)


@triton.jit
def _proj_fwd_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, scale_ptr, part_ptr, out_ptr,
    M, D_T, D_S,
    stride_hm, stride_hk, stride_wn, stride_wk, stride_b, stride_tm, stride_tn, stride_om, stride_on,
    grad_coef,
    KIND: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Projected tile and its per-row partial reductions.

    y[m, n] = Σ_k h[m, k]·P[n, k] + b[n]   (fp32 accumulation over d_s: the shared ``_logits_tile`` with d_t
                                           in place of V; DOT_MODE as there, see ``_tiles.dot_mode``)
    KIND 0 (mse):    part[j, 0, m] = Σ_{n in tile j} (y − t)²;  WRITE: out = grad_coef·scale[m]·(y − t)
                     (grad_coef = 2/d_t, so out is the row-scaled gradient dL/dy in out's dtype)
    KIND 1 (cosine): part[j, 0..2, m] = Σ y·t, Σ y², Σ t²;      WRITE: out = y (fp32)
    part[j, 3, m] = Σ t·0, which is NaN exactly when the teacher tile holds a non-finite value.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(D_T, BLOCK_N)
    # Grouped launch order: GROUP_M row blocks sweep the d_t tiles together, so P tiles stay in L2.
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < D_T

    # rows/columns wrapped into range: the duplicates they compute are masked out of every store and sum
    y = _logits_tile(
        h_ptr, w_ptr, b_ptr, offs_m % M, offs_n % D_T, D_S,
        stride_hm, stride_hk, stride_wn, stride_wk, stride_b,
        HAS_BIAS, DOT_MODE, BLOCK_M, BLOCK_N, BLOCK_K,
    )                                                      # [BM, BN] fp32
    tile_ok = m_ok[:, None] & n_ok[None, :]
    t = tl.load(t_ptr + offs_m[:, None] * stride_tm + offs_n[None, :] * stride_tn,
                mask=tile_ok, other=0.0).to(tl.float32)  # [BM, BN]
    y = tl.where(tile_ok, y, 0.0)

    part = part_ptr + pid_n * (4 * M) + offs_m  # [BM] slot of this d_t tile
    tl.store(part + 3 * M, tl.sum(t * 0.0, axis=1), mask=m_ok)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if KIND == 0:
        r = y - t
        tl.store(part, tl.sum(r * r, axis=1), mask=m_ok)
        if WRITE:
            s = tl.load(scale_ptr + offs_m, mask=m_ok, other=0.0)  # [BM]
            g = r * (s * grad_coef)[:, None]
            tl.store(out_ptrs, g.to(out_ptr.dtype.element_ty), mask=tile_ok)
    else:
        tl.store(part, tl.sum(y * t, axis=1), mask=m_ok)
        tl.store(part + M, tl.sum(y * y, axis=1), mask=m_ok)
        tl.store(part + 2 * M, tl.sum(t * t, axis=1), mask=m_ok)
        if WRITE:
            tl.store(out_ptrs, y, mask=tile_ok)


@triton.jit
def _proj_cosine_grad_kernel(
    y_ptr, t_ptr, alpha_ptr, beta_ptr, g_ptr,
    M, D_T,
    stride_ym, stride_tm, stride_gm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Cosine gradient tile: g[m, n] = α[m]·y[m, n] + β[m]·t[m, n].

    With s the row scale: α = s·cos/||y||², β = −s/(||y|| ||t||), i.e. g = s·(cos·y/||y||² − t/(||y|| ||t||))
    = s·dL/dy; α = β = 0 on zero-norm rows. g may alias y (fp32): each element is read and written by
    the same program.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    ok = m_ok[:, None] & (offs_n[None, :] < D_T)
    y = tl.load(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], mask=ok, other=0.0)
    t = tl.load(t_ptr + offs_m[:, None] * stride_tm + offs_n[None, :], mask=ok, other=0.0).to(tl.float32)
    alpha = tl.load(alpha_ptr + offs_m, mask=m_ok, other=0.0)
    beta = tl.load(beta_ptr + offs_m, mask=m_ok, other=0.0)
    g = alpha[:, None] * y + beta[:, None] * t
    tl.store(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :], g.to(g_ptr.dtype.element_ty), mask=ok)


def _fwd_config(dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)."""
    if triton_interpret():
        return 16, 32, 16, 4, 4, 1  # the interpreter runs numpy per program: small tiles, few of them
    if dtype == torch.float32:
        # BLOCK_K 16: at 32 Triton 3.6 spilled 8 B in the cosine/no-bias variants at its 128-register cap (3.9: 0)
        return 64, 64, 16, 8, 4, 3
    return 128, 128, 64, 8, 8, 3


def prepare(weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """The Triton path computes in the input dtype (fp32 accumulation): no copies."""
    return weight.contiguous(), (None if bias is None else bias.contiguous())


def projection_chunk(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], t: torch.Tensor,
                     kind: str, zero_norm_sq: float, row_scale: Optional[torch.Tensor],
                     dW_acc: Optional[torch.Tensor], db_acc: Optional[torch.Tensor],
                     dh_out: Optional[torch.Tensor]):
    """The chunk contract of ``ops/projection_loss.py`` (see ``reference.projection_loss.projection_chunk``).

    h [c, d_s], weight [d_t, d_s], t [c, d_t] share one dtype; bias [d_t] | None.
    Returns (loss [c] fp32, nonfinite_teacher [c] bool).
    """
    c, d_s = h.shape
    d_t = weight.shape[0]
    dev = h.device
    grad = row_scale is not None
    k_id = _MSE if kind == "mse" else _COSINE
    BM, BN, BK, GM, warps, stages = _fwd_config(h.dtype)
    n_tiles = triton.cdiv(d_t, BN)
    part = torch.empty(n_tiles, _NSTAT, c, device=dev, dtype=torch.float32)  # [tiles, 4, c]
    # mse writes g in the GEMM dtype directly; cosine writes fp32 y and turns it into g afterwards.
    buf = None
    if grad:
        buf = torch.empty(c, d_t, device=dev, dtype=h.dtype if k_id == _MSE else torch.float32)
    dummy = part  # any valid pointer for arguments a constexpr branch never reads
    scale = row_scale.contiguous() if grad else dummy
    out = buf if grad else dummy
    grid = (triton.cdiv(c, BM) * n_tiles,)
    _proj_fwd_kernel[grid](
        h, weight, bias if bias is not None else dummy, t, scale, part, out,
        c, d_t, d_s,
        h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), bias.stride(0) if bias is not None else 0,
        t.stride(0), t.stride(1),
        out.stride(0) if grad else 0, out.stride(1) if grad else 0,
        2.0 / d_t,
        # fp32: IEEE dots (no TF32), so results match at 1e-5; bf16/fp16: tensor cores (upcast under the interpreter)
        KIND=k_id, HAS_BIAS=bias is not None, WRITE=grad, DOT_MODE=dot_mode(h),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=GM, num_warps=warps, num_stages=stages,
    )
    stats = part.sum(0)  # [4, c], summed over d_t tiles in a fixed order
    bad_t = torch.isnan(stats[3])
    if k_id == _MSE:
        loss = stats[0] / d_t
        g = buf
    else:
        dot, yy, tt = stats[0], stats[1], stats[2]
        zero = (yy <= zero_norm_sq) | (tt <= zero_norm_sq)
        inv_y = torch.where(zero, torch.zeros_like(yy), torch.rsqrt(yy.clamp_min(zero_norm_sq)))
        inv_t = torch.where(zero, torch.zeros_like(tt), torch.rsqrt(tt.clamp_min(zero_norm_sq)))
        cos = dot * inv_y * inv_t
        loss = 1.0 - cos
        g = None
        if grad:
            alpha = (row_scale * cos * inv_y * inv_y).contiguous()
            beta = (-row_scale * inv_y * inv_t).contiguous()
            g = buf if h.dtype == torch.float32 else torch.empty(c, d_t, device=dev, dtype=h.dtype)
            GBM, GBN = (16, 64) if triton_interpret() else (32, 256)
            _proj_cosine_grad_kernel[(triton.cdiv(c, GBM), triton.cdiv(d_t, GBN))](
                buf, t, alpha, beta, g, c, d_t, buf.stride(0), t.stride(0), g.stride(0),
                BLOCK_M=GBM, BLOCK_N=GBN, num_warps=4,
            )
            del buf
    if grad:
        # g is in the input dtype: the products run on tensor cores with fp32 accumulation.
        if dh_out is not None:
            if dh_out.dtype == g.dtype:
                torch.mm(g, weight, out=dh_out)
            else:
                dh_out.copy_(g @ weight)
        if dW_acc is not None:
            if g.dtype == torch.float32:
                dW_acc.addmm_(g.t(), h)
            else:
                dW_acc.add_(g.t() @ h)
        if db_acc is not None:
            db_acc.add_(g.sum(0, dtype=torch.float32))
    return loss, bad_t
