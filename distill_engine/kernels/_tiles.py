"""Shared Triton building blocks of the vocabulary-streaming kernels (loss, logprobs_at, teacher targets,
projection), and the host-side helpers their launchers share.

Device (``@triton.jit``, inlined into the kernels that call them; named ``_<what>``):

* :func:`_logits_tile` -- one [BN, BV] tile of h Wᵀ + b: a tile GEMM over d with fp32 accumulation, in the
  precision mode ``DOT_MODE`` (see :func:`dot_mode`). Used by ``distill_loss`` (forward and buffer-free
  gradient), ``teacher_targets`` (top-k and sampling) and ``projection_loss`` (y = h Pᵀ + b is the same
  GEMM shape with d_t in place of V).
* :func:`_online_lse` -- one step of the streaming log-sum-exp over vocabulary tiles.
* :func:`_rtne_bf16` -- round-to-nearest-even fp32 -> bf16 for the interpreter, whose cast truncates.

Host:

* :func:`check_device`, :func:`interpreting` -- the CUDA-or-interpreter rule of every Triton launcher;
* :func:`dot_mode`, :func:`sm_count` -- the dot precision mode and the SM count the split planners use;
* :func:`combine_lse` -- merge per-split (max, sum) pairs into one log-sum-exp;
* :func:`tile_args`, :func:`logits_mode`, :func:`autotune_configs` -- launch arguments, the logits-source
  switch and autotuner configs;
* the fp32-output GEMMs for bf16/fp16 operands (:func:`mm_f32`, :func:`mm_f32_into`, :func:`addmm_f32_`)
  with one probe, :func:`f32_out_gemm_ok`, and a one-time RuntimeWarning naming the fallback path.
  ``DISTILL_ENGINE_GEMM_F32_OUT=0`` (read at every call) forces the fallback, to compare the two paths.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch
import triton
import triton.language as tl

from .._backend import triton_interpret

# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr,
    offs_n, offs_v, D,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_b,
    HAS_BIAS: tl.constexpr, DOT_MODE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """acc[i, j] = Σ_d h[offs_n[i], d] · W[offs_v[j], d] + b[offs_v[j]]  (fp32 accumulation).

    ``offs_n``/``offs_v`` must already be clamped into range (the callers wrap or clamp them), so only the
    d edge needs a mask; out-of-range rows/columns compute harmless duplicates that the callers mask out of
    every store and reduction. DOT_MODE 1: fp32 inputs, IEEE fp32 products (no TF32); 0: bf16/fp16 on
    tensor cores, fp32 accumulation; 2: bf16/fp16 under the interpreter, upcast first (its low-precision
    dot is wrong; the upcast is exact, so the products equal the tensor-core ones).
    """
    offs_d = tl.arange(0, BLOCK_D)
    # int64 row offsets: c·d and V·d can exceed 2^31 elements.
    h_ptrs = h_ptr + offs_n.to(tl.int64)[:, None] * stride_hn + offs_d[None, :] * stride_hd   # [BN, BD]
    w_ptrs = w_ptr + offs_d[:, None] * stride_wd + offs_v.to(tl.int64)[None, :] * stride_wv   # [BD, BV]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        mask_d = offs_d < D - d0
        hh = tl.load(h_ptrs, mask=mask_d[None, :], other=0.0)
        ww = tl.load(w_ptrs, mask=mask_d[:, None], other=0.0)
        if DOT_MODE == 1:
            acc = tl.dot(hh, ww, acc, input_precision="ieee")
        elif DOT_MODE == 2:
            acc = tl.dot(hh.to(tl.float32), ww.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(hh, ww, acc)
        h_ptrs += BLOCK_D * stride_hd
        w_ptrs += BLOCK_D * stride_wd
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_v * stride_b).to(tl.float32)   # [BV]
        acc += bias[None, :]
    return acc


@triton.jit
def _online_lse(m, s, z):
    """One vocabulary tile of the streaming log-sum-exp: the running pair (m, s) [BN] after tile z [BN, BV].

        m' = max(m, max_j z_j),   s' = s · exp(m − m') + Σ_j exp(z_j − m'),   lse = m + log s at the end

    Masked columns carry z = −inf (zero mass). The shift is guarded: while a row has seen only −inf
    (m' = −inf) it shifts by 0 instead, so exp(−inf − 0) = 0 keeps s = 0 and no −inf − (−inf) = NaN is
    formed; whenever m' is finite the guard is the identity (bit-identical to the plain update).
    """
    m_new = tl.maximum(m, tl.max(z, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s_new = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
    return m_new, s_new


@triton.jit
def _rtne_bf16(x):
    """Round fp32 to the nearest bf16 value (ties to even), kept in fp32.

    Only for the interpreter, whose fp32 -> bf16 cast truncates (compiled Triton rounds to nearest
    even already): add half an ulp of bf16 (0x7FFF, +1 when the kept lsb is odd) to the bits and
    clear the 16 dropped bits; the truncating cast that follows is then exact. x is finite here.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


# ----------------------------------------------------------------------------------------------
# host helpers
# ----------------------------------------------------------------------------------------------


def interpreting(t: torch.Tensor) -> bool:
    """Whether a launch on t's device runs under the interpreter (CPU tensors, TRITON_INTERPRET=1)."""
    return t.device.type != "cuda"


def check_device(t: torch.Tensor, op: str) -> None:
    """The Triton backends run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the tests)."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and triton_interpret()):
        return
    raise ValueError(f"{op}: backend='triton' needs CUDA tensors (got {t.device}); for CPU tensors set "
                     "TRITON_INTERPRET=1 before importing triton, or use backend='cpu' / 'torch'")


def dot_mode(h: torch.Tensor) -> int:
    """DOT_MODE of :func:`_logits_tile`: 1 IEEE fp32 dot (fp32 inputs); 0 native tensor-core dot (bf16/fp16
    on CUDA); 2 bf16/fp16 upcast to fp32 before an IEEE dot -- only under the interpreter, whose
    low-precision tl.dot returns garbage (Triton 3.9)."""
    if h.dtype == torch.float32:
        return 1
    return 0 if h.device.type == "cuda" else 2


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_sm_count(dev: torch.device) -> int:
    return sm_count(dev.index if dev.index is not None else torch.cuda.current_device())


def tile_args(h: torch.Tensor, weight: torch.Tensor, bias):
    """((h, W, b), (stride_hn, stride_hd, stride_wv, stride_wd, stride_b)) as :func:`_logits_tile`'s callers
    take them; b is a dummy pointer (h) when HAS_BIAS is False."""
    return (h, weight, bias if bias is not None else h), (
        h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), bias.stride(0) if bias is not None else 0)


def logits_mode(env: str) -> str:
    """The logits source a launcher's ``env`` variable selects (read at every call): ``triton`` (the fused
    tile GEMM) or ``cublas`` (a cuBLAS GEMM into an fp32 buffer that the same kernel reads, FROM_BUF)."""
    mode = os.environ.get(env, "triton")
    if mode not in ("triton", "cublas"):
        raise ValueError(f"{env} must be 'triton' or 'cublas', got {mode!r}")
    return mode


def autotune_configs(cfgs):
    """``triton.Config``s of config dicts (BLOCK_* meta-parameters + num_warps/num_stages)."""
    return [triton.Config({k: v for k, v in c.items() if k.startswith("BLOCK_")},
                          num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in cfgs]


def combine_lse(pm: torch.Tensor, ps: torch.Tensor, dim: int) -> torch.Tensor:
    """Merge per-split (max m_s, Σ exp(z − m_s)) pairs along ``dim`` into logsumexp, fp32:

        lse = M + log Σ_s ps_s · exp(pm_s − M),   M = max_s pm_s

    M is finite (every split holds at least one column). Summed in float64 (a few splits per row: cheap)
    so the merge adds no rounding beyond the final fp32 cast.
    """
    M = pm.amax(dim=dim, keepdim=True)
    total = (ps.double() * torch.exp((pm - M).double())).sum(dim=dim)
    return (M.squeeze(dim).double() + total.log()).float()


# ----------------------------------------------------------------------------------------------
# fp32-output GEMMs for bf16/fp16 operands
# ----------------------------------------------------------------------------------------------

_FALLBACK_PATH = ("the {dtype} GEMMs with fp32 results (the loss's gradient GEMMs, the cuBLAS logits buffers) fall "
                  "back to a {dtype} output upcast or added into the fp32 accumulators (slower: one extra {dtype} "
                  "temporary per chunk, and each chunk's product is rounded to {dtype} once)")


def _probe_f32_out_gemm(dev: torch.device, dtype: torch.dtype):
    """None when mm/addmm(..., out_dtype=torch.float32) work for ``dtype`` on ``dev`` (transposed operand,
    alpha and in-place accumulation into ``out`` included), else why not."""
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(48, 32, generator=gen).to(dev, dtype)
        a_t = a.t().contiguous().t()                           # same values, transposed layout
        b = torch.randn(32, 40, generator=gen).to(dev, dtype)
        ref = a.float() @ b.float()
        out = torch.mm(a, b, out_dtype=torch.float32)
        into = torch.empty(48, 40, device=dev)
        torch.mm(a_t, b, out_dtype=torch.float32, out=into)
        acc = torch.ones(48, 40, device=dev)
        torch.addmm(acc, a_t, b, alpha=0.5, out_dtype=torch.float32, out=acc)
        ok = (
            out.dtype == torch.float32
            and torch.allclose(out, ref, rtol=1e-3, atol=1e-3)
            and torch.allclose(into, ref, rtol=1e-3, atol=1e-3)
            and torch.allclose(acc, 0.5 * ref + 1, rtol=1e-3, atol=1e-3)
        )
        return None if ok else "it ran but returned wrong values"
    except Exception as exc:  # missing overload / unsupported backend or dtype: reported by the caller
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"


@functools.lru_cache(maxsize=None)
def f32_out_gemm_ok_cached(device_str: str, dtype: torch.dtype) -> bool:
    """Probe (once per device and dtype) and say so, once, when the fast path is unavailable."""
    why = _probe_f32_out_gemm(torch.device(device_str), dtype)
    if why is not None:
        warnings.warn(f"distill_engine: torch.mm/addmm(..., out_dtype=torch.float32) is unavailable for {dtype} on "
                      f"{device_str} ({why}); " + _FALLBACK_PATH.format(dtype=dtype), RuntimeWarning, stacklevel=3)
        return False
    return True


@functools.lru_cache(maxsize=None)
def warn_forced_fallback(dtype: torch.dtype) -> None:
    warnings.warn("distill_engine: DISTILL_ENGINE_GEMM_F32_OUT=0: fp32-output GEMMs disabled; "
                  + _FALLBACK_PATH.format(dtype=dtype), RuntimeWarning, stacklevel=4)


def f32_out_gemm_ok(t: torch.Tensor) -> bool:
    """Whether ``torch.mm/addmm(..., out_dtype=torch.float32)`` works here for t's dtype (and accumulates in
    place into an fp32 ``out``): dW then accumulates in cuBLAS (beta = 1, fp32 C) with no temporary.

    The dtype overloads exist only in recent torch and only on CUDA; CPU tensors (interpreter tests) never
    take this path.
    """
    if not t.is_cuda:
        return False
    if os.environ.get("DISTILL_ENGINE_GEMM_F32_OUT", "1") == "0":  # read at every call: benchmarks flip it
        warn_forced_fallback(t.dtype)
        return False
    return f32_out_gemm_ok_cached(str(t.device), t.dtype)


def mm_f32(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """fp32 [m, n] = scale · (a @ b) for operands in the input dtype."""
    if a.dtype == torch.float32:
        out = torch.mm(a, b)
    elif f32_out_gemm_ok(a):
        out = torch.mm(a, b, out_dtype=torch.float32)
    elif a.is_cuda:
        out = torch.mm(a, b).float()
    else:  # CPU (interpreter tests): accumulate the rounded operands in fp32
        out = torch.mm(a.float(), b.float())
    if scale != 1.0:
        out.mul_(scale)
    return out


def mm_f32_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out (fp32) = a @ b, written straight into ``out`` when the fp32-output GEMM exists; returns out."""
    if a.dtype == torch.float32:
        torch.mm(a, b, out=out)
    elif f32_out_gemm_ok(a):
        torch.mm(a, b, out_dtype=torch.float32, out=out)
    else:
        out.copy_(mm_f32(a, b))
    return out


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> None:
    """acc (fp32) += scale · (a @ b) without an fp32 copy of the operands on CUDA."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b, alpha=scale)
    elif f32_out_gemm_ok(a):
        torch.addmm(acc, a, b, alpha=scale, out_dtype=torch.float32, out=acc)
    elif a.is_cuda:
        acc.add_(torch.mm(a, b), alpha=scale)
    else:
        acc.addmm_(a.float(), b.float(), alpha=scale)
