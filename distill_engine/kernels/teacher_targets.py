"""Triton backend of ``teacher_targets``: fused tile GEMM + online log-sum-exp + per-split candidates.

Grid (row blocks, vocabulary splits). A program owns BM rows and one contiguous vocabulary split and
streams its BV-wide tiles; per tile it forms z = (h Wᵀ + b)·inv_t with an fp32-accumulating tile GEMM
over d, so no logits tensor exists anywhere. The tile GEMM (``_logits_tile``), the online log-sum-exp step
(``_online_lse``) and the host helpers (device check, dot mode, SM count, split merge, fp32-output GEMM) are
the ones the loss kernels use, in ``kernels/_tiles.py``.

``_tt_topk_kernel`` (method "topk"; with DO_TOPK=False it is pass 1 of "sample"):
    online log-sum-exp of the split:  m ← max(m, max_v z_v),  s ← s·e^{m_old − m} + Σ_v e^{z_v − m};
    candidate top-K of the split by threshold-guarded max-extraction: θ = the K-th best value so far;
    while some row of the block has a tile entry > θ, extract every row's largest such entry, put it in
    that row's worst candidate slot and recompute θ. After the first tile of a split this loop runs only
    a few times per tile (for random-order data ~K·ln(split/K) insertions per split in total).
    Output per (row, split): (m, s) and K candidates (z value, id). The merge picks the k best of the
    n_splits·K candidates (the CUDA warp kernel in csrc/cuda/topk_merge.cu when the extension was built
    with CUDA, else torch.topk on the small candidate tensor), and lse = log Σ_splits s·e^m.

``_tt_sample_kernel`` (pass 2 of "sample"): exact inverse-CDF sampling, tile by tile. Pass 1 gives lse and
    each split's mass P_s = s·e^{m − lse}; in torch (float64) each row's sorted uniforms u_j are assigned to
    the split whose cumulative interval holds them (draws [lo_s, hi_s) of the row), with the split's start
    C_s. The program walks its split with p_v = exp(z_v − lse), the inclusive in-split CDF F_v (fp32
    cumsum), and a per-row pointer j ∈ [lo_s, hi_s): while r_j = u_j − C_s < F_end(tile) for some row,
    draw j of that row is v0 + #{v in tile : F_v ≤ r_j} and its pointer advances. Draws the fp32 rounding
    leaves past the split's end go to the split's last id with p > 0. Draw ids are non-decreasing in j.

Precision: fp32 inputs use IEEE fp32 dots (no TF32); bf16/fp16 use tensor-core dots with fp32
accumulation (under the interpreter they are upcast to fp32 first: the interpreter's low-precision dot
is not faithful, and the upcast is exact).

``DISTILL_ENGINE_TT_LOGITS=cublas`` (read at every call): top-k takes the raw logits of each sub-chunk from
a cuBLAS GEMM into an fp32 buffer (≤ 2^26 elements) and the same kernel reads them (FROM_BUF) instead of
running its tile GEMM; for measuring the fused GEMM against cuBLAS.

``DISTILL_ENGINE_TT_GROUP_M`` (read at every call): row blocks per launch group of the top-k grid (default 8 on
CUDA; 0 = the plain row-block-major order), to compare grid orders in one run. ``DISTILL_ENGINE_TT_CONFIG``
overrides the tiles (see ``_cuda_config``).

k larger than ``MAX_KERNEL_K`` on this backend: the logits of a sub-chunk go to an fp32 buffer through
cuBLAS (``reference.teacher_targets.chunk_logits``) and torch.topk selects (memory bounded the same way).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _backend
from ..reference import teacher_targets as _torch_impl
from ._tiles import _logits_tile, _online_lse, check_device, combine_lse, device_sm_count, logits_mode, mm_f32_into
from ._tiles import dot_mode as _dot_mode

MAX_KERNEL_K = 256


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _block_split(pid_m, pid_s, C, V, SPLIT_LEN, BM: tl.constexpr):
    """(offs_m, row_ok, rows, v_lo, v_hi): the program's BM rows (``rows`` clamped to 0 past C, for unmasked
    loads) and its vocabulary split [v_lo, v_hi)."""
    offs_m = pid_m * BM + tl.arange(0, BM)
    row_ok = offs_m < C
    v_lo = pid_s * SPLIT_LEN
    return offs_m, row_ok, tl.where(row_ok, offs_m, 0), v_lo, tl.minimum(v_lo + SPLIT_LEN, V)


@triton.jit
def _tt_topk_kernel(
    h_ptr, w_ptr, b_ptr,
    pm_ptr, ps_ptr,          # [C, NSPLIT] fp32: split max / split Σ exp(z − max)
    cv_ptr, ci_ptr,          # [C, NSPLIT, KP] fp32 z values / int32 ids of the split's candidates
    buf_ptr,                 # FROM_BUF: fp32 [C, V] raw logits written by cuBLAS (row stride stride_buf)
    C, V, D, stride_h, stride_w, stride_buf, inv_t, SPLIT_LEN, NSPLIT, GROUP_M,
    K: tl.constexpr, KP: tl.constexpr,
    HAS_BIAS: tl.constexpr, DO_TOPK: tl.constexpr, FROM_BUF: tl.constexpr, DOT_MODE: tl.constexpr,
    BM: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
):
    """Per (row block, split): online lse of z over the split and (DO_TOPK) its top-K candidates.

    Candidate slots: K real slots start at −inf, KP − K padding slots sit at +inf so they are never the
    minimum θ. Entries equal to θ are not inserted (strict >): ties keep the earlier id.

    Grid: 1-D over (row block, split), in groups of GROUP_M row blocks that sweep all splits together (row
    block fastest inside a group), so the programs in flight share GROUP_M blocks of h (L2-resident) while
    each W tile is read by GROUP_M programs at once. GROUP_M ≥ the number of row blocks is the plain
    row-block-major order (every row block of split 0, then split 1, ...).
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(C, BM)
    per_group = GROUP_M * NSPLIT
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_s = (pid % per_group) // group_size
    offs_m, row_ok, rows, v_lo, v_hi = _block_split(pid_m, pid_s, C, V, SPLIT_LEN, BM)
    ar_v = tl.arange(0, BV)
    kk = tl.arange(0, KP)
    NEG = float("-inf")
    m_run = tl.full((BM,), NEG, tl.float32)
    s_run = tl.zeros((BM,), tl.float32)
    cand_v = tl.where(kk[None, :] < K, tl.full((BM, KP), NEG, tl.float32), float("inf"))  # [BM, KP]
    cand_i = tl.full((BM, KP), -1, tl.int32)
    theta = tl.full((BM,), NEG, tl.float32)
    for v0 in range(v_lo, v_hi, BV):
        offs_v = v0 + ar_v
        col_ok = offs_v < v_hi
        cols = tl.where(col_ok, offs_v, v_lo)
        if FROM_BUF:
            z = tl.load(buf_ptr + rows.to(tl.int64)[:, None] * stride_buf + cols[None, :])
            if HAS_BIAS:
                z += tl.load(b_ptr + cols).to(tl.float32)[None, :]
            z = z * inv_t
        else:
            # d is contiguous (the launcher checks): unit d and bias strides, folded at compile time
            z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, D, stride_h, 1, stride_w, 1, 1,
                             HAS_BIAS, DOT_MODE, BM, BV, BD) * inv_t
        z = tl.where(col_ok[None, :], z, NEG)  # [BM, BV]
        m_run, s_run = _online_lse(m_run, s_run, z)
        if DO_TOPK:
            x = tl.where(row_ok[:, None] & (z > theta[:, None]), z, NEG)
            pending = tl.max(tl.sum((x > NEG).to(tl.int32), axis=1), axis=0)
            while pending > 0:
                mx = tl.max(x, axis=1)  # [BM]
                pos = tl.min(tl.where(x == mx[:, None], ar_v[None, :], BV), axis=1)
                take = mx > theta
                worst = tl.min(tl.where(cand_v == theta[:, None], kk[None, :], KP), axis=1)
                repl = (kk[None, :] == worst[:, None]) & take[:, None]
                cand_v = tl.where(repl, mx[:, None], cand_v)
                cand_i = tl.where(repl, (v0 + pos)[:, None], cand_i)
                theta = tl.min(cand_v, axis=1)
                x = tl.where(ar_v[None, :] == pos[:, None], NEG, x)
                x = tl.where(x > theta[:, None], x, NEG)
                pending = tl.max(tl.sum((x > NEG).to(tl.int32), axis=1), axis=0)
    tl.store(pm_ptr + offs_m * NSPLIT + pid_s, m_run, mask=row_ok)
    tl.store(ps_ptr + offs_m * NSPLIT + pid_s, s_run, mask=row_ok)
    if DO_TOPK:
        real = kk[None, :] < K
        base = (offs_m.to(tl.int64) * NSPLIT + pid_s) * KP
        out_v = tl.where(real, cand_v, NEG)
        out_i = tl.where(real & (cand_v > NEG), cand_i, -1)
        tl.store(cv_ptr + base[:, None] + kk[None, :], out_v, mask=row_ok[:, None])
        tl.store(ci_ptr + base[:, None] + kk[None, :], out_i, mask=row_ok[:, None])


@triton.jit
def _tt_sample_kernel(
    h_ptr, w_ptr, b_ptr,
    lse_ptr,                 # [C] fp32 row log-sum-exp of z
    u_ptr,                   # [C, KD] fp64 sorted uniforms
    cs_ptr,                  # [C, NSPLIT] fp64 probability mass before each split
    lo_ptr, hi_ptr,          # [C, NSPLIT] int32 draw range of each split
    out_ptr,                 # [C, KD] int32 draw ids
    C, V, D, stride_h, stride_w, inv_t, SPLIT_LEN, NSPLIT, KD,
    HAS_BIAS: tl.constexpr, DOT_MODE: tl.constexpr,
    BM: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
):
    """Resolve the draws [lo, hi) of each row of the block inside this program's vocabulary split."""
    pid_s = tl.program_id(1)
    offs_m, row_ok, rows, v_lo, v_hi = _block_split(tl.program_id(0), pid_s, C, V, SPLIT_LEN, BM)
    ar_v = tl.arange(0, BV)
    lse = tl.load(lse_ptr + rows)
    c0 = tl.load(cs_ptr + rows * NSPLIT + pid_s)  # fp64
    jhi = tl.load(hi_ptr + rows * NSPLIT + pid_s)
    j = tl.load(lo_ptr + rows * NSPLIT + pid_s)
    j = tl.where(row_ok, j, jhi)  # rows past C: nothing to resolve
    u_row = u_ptr + rows.to(tl.int64) * KD
    o_row = out_ptr + rows.to(tl.int64) * KD
    running = tl.zeros((BM,), tl.float32)
    last_nz = tl.full((BM,), -1, tl.int32)
    for v0 in range(v_lo, v_hi, BV):
        offs_v = v0 + ar_v
        col_ok = offs_v < v_hi
        cols = tl.where(col_ok, offs_v, v_lo)
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, D, stride_h, 1, stride_w, 1, 1,
                         HAS_BIAS, DOT_MODE, BM, BV, BD) * inv_t
        p = tl.where(col_ok[None, :], tl.exp(z - lse[:, None]), 0.0)  # [BM, BV]
        incl = running[:, None] + tl.cumsum(p, axis=1)  # inclusive in-split CDF
        tile_end = tl.max(incl, axis=1)
        last_nz = tl.maximum(last_nz, tl.max(tl.where(p > 0, offs_v, -1), axis=1))
        live = j < jhi
        r = (tl.load(u_row + j, mask=live, other=2.0) - c0).to(tl.float32)
        pend = live & (r < tile_end)
        npend = tl.max(pend.to(tl.int32), axis=0)
        while npend > 0:
            idx = tl.sum((incl <= r[:, None]).to(tl.int32), axis=1)
            tl.store(o_row + j, v0 + idx, mask=pend)
            j = j + pend.to(tl.int32)
            live = j < jhi
            r = (tl.load(u_row + j, mask=live, other=2.0) - c0).to(tl.float32)
            pend = live & (r < tile_end)
            npend = tl.max(pend.to(tl.int32), axis=0)
        running = tile_end
    # draws the rounding left past the split's end: the split's last id with p > 0
    last_nz = tl.where(last_nz < 0, v_lo, last_nz)
    live = j < jhi
    nlive = tl.max(live.to(tl.int32), axis=0)
    while nlive > 0:
        tl.store(o_row + j, last_nz, mask=live)
        j = j + live.to(tl.int32)
        live = j < jhi
        nlive = tl.max(live.to(tl.int32), axis=0)


# ----------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------
# Interpreter: tiny tiles (fast under Python, and several tiles + splits at the test shapes).
_INTERP = dict(BM=16, BV=32, BD=16, split_tiles=2)


def _cuda_config(dtype: torch.dtype, KP: int, from_buf: bool = False) -> dict:
    """Heuristic CUDA tiles; DISTILL_ENGINE_TT_CONFIG="BM,BV,BD,num_warps,num_stages" overrides them.

    bf16/fp16: 64-row tiles on two warpgroups (wgmma on Hopper) for every k ≤ 256, 128 columns wide (64 at
    KP = 256). The candidate lists ([BM, KP] values + ids) share the register file with the [BM, BV]
    accumulator: at KP = 256 this reaches 255 registers per thread without a spill on sm_90a with Triton 3.6
    and 3.9 (the AOT check in ``_aot.py`` guards it). Narrower row
    blocks (16/32) would drop to Ampere-style mma.sync. ``from_buf`` (cuBLAS logits read from a buffer, no tile
    GEMM): 16×128 tiles on 4 warps, the widest that stays spill-free up to KP = 256.
    """
    env = os.environ.get("DISTILL_ENGINE_TT_CONFIG")
    if env:
        try:
            bm, bv, bd, nw, ns = (int(x) for x in env.split(","))
        except ValueError as exc:
            raise ValueError(f"DISTILL_ENGINE_TT_CONFIG must be 'BM,BV,BD,num_warps,num_stages', got {env!r}") from exc
        return dict(BM=bm, BV=bv, BD=bd, num_warps=nw, num_stages=ns)
    if from_buf:
        return dict(BM=16, BV=128, BD=16, num_warps=4, num_stages=2)
    if dtype == torch.float32:  # FMA dots, 2 stages; KP ≥ 128: 32-wide tiles on 8 warps (4 warps spilled 8–24 B)
        if KP >= 128:
            return dict(BM=32, BV=32, BD=32, num_warps=8, num_stages=2)
        return dict(BM=32, BV=64, BD=32, num_warps=4, num_stages=2)
    # KP = 256 on 64-wide tiles: 64×128 spilled 32 B under Triton 3.6
    return dict(BM=64, BV=64 if KP > 128 else 128, BD=64, num_warps=8, num_stages=3)


def _plan(h: torch.Tensor, V: int, KP: int, from_buf: bool = False):
    """(config, n_splits, split_len) for a chunk of h.shape[0] rows."""
    c = h.shape[0]
    if h.device.type != "cuda":
        cfg = dict(_INTERP)
        split_len = cfg.pop("split_tiles") * cfg["BV"]
        return cfg, triton.cdiv(V, split_len), split_len
    cfg = _cuda_config(h.dtype, KP, from_buf)
    row_blocks = triton.cdiv(c, cfg["BM"])
    tiles = triton.cdiv(V, cfg["BV"])
    # about four waves of programs over the SMs, at least 2 tiles per split
    n_splits = max(1, min(tiles // 2 or 1, -(-4 * device_sm_count(h.device) // row_blocks)))
    split_len = triton.cdiv(tiles, n_splits) * cfg["BV"]
    return cfg, triton.cdiv(V, split_len), split_len


def _group_m(dev: torch.device, n_m: int) -> int:
    """Row blocks per launch group of the top-k grid; DISTILL_ENGINE_TT_GROUP_M overrides (0: all, i.e. the plain
    row-block-major order). Under the interpreter 2, so the tests cross group boundaries."""
    env = os.environ.get("DISTILL_ENGINE_TT_GROUP_M")
    if env is not None:
        try:
            g = int(env)
        except ValueError:
            g = -1
        if g < 0:
            raise ValueError(f"DISTILL_ENGINE_TT_GROUP_M must be an integer >= 0 (0: row-block-major order), got {env!r}")
    else:
        g = 8 if dev.type == "cuda" else 2
    return max(1, n_m if g == 0 else min(g, n_m))


def _launch_meta(cfg: dict) -> dict:
    meta = dict(BM=cfg["BM"], BV=cfg["BV"], BD=cfg["BD"])
    if "num_warps" in cfg:
        meta["num_warps"] = cfg["num_warps"]
        meta["num_stages"] = cfg["num_stages"]
    return meta


def _combine_lse(pm: torch.Tensor, ps: torch.Tensor) -> torch.Tensor:
    """lse [c] from per-split (max, Σ exp(z − max)) [c, S]."""
    return combine_lse(pm, ps, dim=1)


def _split_pass(h, weight, bias, k: int, inv_t: float, do_topk: bool, buf: Optional[torch.Tensor] = None):
    """Launch _tt_topk_kernel over a chunk (logits from the fused tile GEMM, or read from ``buf`` [c, V]
    fp32 raw logits). Returns (pm, ps [c, S], cv [c, S·KP] | None, ci | None, S, split_len, cfg)."""
    c, D = h.shape
    V = weight.shape[0]
    KP = triton.next_power_of_2(max(k, 1)) if do_topk else 16
    cfg, S, split_len = _plan(h, V, KP, buf is not None)
    dev = h.device
    pm = torch.empty(c, S, dtype=torch.float32, device=dev)
    ps = torch.empty(c, S, dtype=torch.float32, device=dev)
    if do_topk:
        cv = torch.empty(c, S, KP, dtype=torch.float32, device=dev)
        ci = torch.empty(c, S, KP, dtype=torch.int32, device=dev)
    else:
        cv, ci = pm, pm  # unused
    n_m = triton.cdiv(c, cfg["BM"])
    group_m = _group_m(dev, n_m)
    _tt_topk_kernel[(n_m * S,)](
        h, weight, bias if bias is not None else h, pm, ps, cv, ci, buf if buf is not None else pm,
        c, V, D, h.stride(0), weight.stride(0), buf.stride(0) if buf is not None else 0, float(inv_t), split_len, S,
        group_m,
        K=min(k, split_len) if do_topk else 1, KP=KP, HAS_BIAS=bias is not None, DO_TOPK=do_topk,
        FROM_BUF=buf is not None, DOT_MODE=_dot_mode(h), **_launch_meta(cfg),
    )
    if do_topk:
        return pm, ps, cv.view(c, S * KP), ci.view(c, S * KP), S, split_len, cfg
    return pm, ps, None, None, S, split_len, cfg


def _check(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    check_device(h, "teacher_targets")
    for name, t in (("hidden", h), ("weight", weight), ("bias", bias)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension for the triton backend")


def merge_candidates(cv, ci, pm, ps, k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k best of the split candidates: (ids [c, k] int32, logprobs [c, k] fp32 sorted desc, lse [c])."""
    if cv.is_cuda and _backend.cuda_extension_has("tt_topk_merge"):
        return _backend.cpu_extension().tt_topk_merge(cv, ci, pm, ps, k)  # C++ checks dtypes/shapes/contiguity
    lse = _combine_lse(pm, ps)
    vals, pos = torch.topk(cv, k, dim=1, largest=True, sorted=True)  # [c, k]
    return ci.gather(1, pos), vals - lse[:, None], lse


# ----------------------------------------------------------------------------------------------
# the backend used by ops/teacher_targets.py
# ----------------------------------------------------------------------------------------------
def _logits_mode() -> str:
    return logits_mode("DISTILL_ENGINE_TT_LOGITS")


class TeacherTargetsTritonImpl:
    """The teacher_targets chunk contract (ops/teacher_targets.py) on the split-vocabulary Triton kernels."""

    needs_buffer = False

    @staticmethod
    def topk(h, weight, bias, k: int, inv_t: float, buf=None):
        _check(h, weight, bias)
        if k > MAX_KERNEL_K:
            return _topk_via_buffer(h, weight, bias, k, inv_t)
        if _logits_mode() == "cublas":  # cuBLAS logits into an fp32 buffer, the kernel reads them
            return _topk_cublas(h, weight, bias, k, inv_t)
        pm, ps, cv, ci, S, _, _ = _split_pass(h, weight, bias, k, inv_t, True)
        return merge_candidates(cv, ci, pm, ps, k)

    @staticmethod
    def sample(h, weight, bias, inv_t: float, u: torch.Tensor, buf=None):
        _check(h, weight, bias)
        c, D = h.shape
        V = weight.shape[0]
        kd = u.shape[1]
        pm, ps, _, _, S, split_len, cfg = _split_pass(h, weight, bias, 1, inv_t, False)
        lse = _combine_lse(pm, ps)  # [c]
        mass = ps.double() * torch.exp(pm.double() - lse.double()[:, None])  # [c, S] split probabilities
        c_incl = torch.cumsum(mass, dim=1)
        c_start = torch.cat([torch.zeros_like(c_incl[:, :1]), c_incl[:, :-1]], dim=1).contiguous()
        split_of = torch.searchsorted(c_incl, u, right=True).clamp_(max=S - 1)  # [c, kd], non-decreasing
        edges = torch.arange(S + 1, device=u.device, dtype=split_of.dtype).expand(c, S + 1).contiguous()
        bounds = torch.searchsorted(split_of, edges).to(torch.int32)  # [c, S+1]: #draws in splits < s
        lo = bounds[:, :S].contiguous()
        hi = bounds[:, 1:].contiguous()
        out = torch.full((c, kd), -1, dtype=torch.int32, device=u.device)
        grid = (triton.cdiv(c, cfg["BM"]), S)
        _tt_sample_kernel[grid](
            h, weight, bias if bias is not None else h, lse, u, c_start, lo, hi, out,
            c, V, D, h.stride(0), weight.stride(0), float(inv_t), split_len, S, kd,
            HAS_BIAS=bias is not None, DOT_MODE=_dot_mode(h), **_launch_meta(cfg),
        )
        return out.long(), lse


def _by_sub_chunks(h, weight, k: int, max_elems: int, chunk_fn):
    """Top-k of a chunk by sub-chunks of ≤ ``max_elems`` fp32 logits: ``chunk_fn(s, e, buf)`` returns
    (ids, logprobs, lse) of rows [s, e) using the shared fp32 buffer ``buf`` [rows, V]."""
    c, V = h.shape[0], weight.shape[0]
    rows = max(1, min(c, max_elems // V))
    buf = torch.empty(rows, V, dtype=torch.float32, device=h.device)
    ids = torch.empty(c, k, dtype=torch.int32, device=h.device)
    lps = torch.empty(c, k, dtype=torch.float32, device=h.device)
    lse = torch.empty(c, dtype=torch.float32, device=h.device)
    for s in range(0, c, rows):
        e = min(c, s + rows)
        ids[s:e], lps[s:e], lse[s:e] = chunk_fn(s, e, buf)
    return ids, lps, lse


def _topk_cublas(h, weight, bias, k: int, inv_t: float):
    """DISTILL_ENGINE_TT_LOGITS=cublas: per sub-chunk of ≤ 2^26 logits, cuBLAS GEMM + the candidate kernel."""
    def chunk(s, e, buf):
        z = mm_f32_into(buf[: e - s], h[s:e], weight.t())    # raw logits, fp32 [e − s, V]
        pm, ps, cv, ci, *_ = _split_pass(h[s:e], weight, bias, k, inv_t, True, buf=z)
        return merge_candidates(cv, ci, pm, ps, k)
    return _by_sub_chunks(h, weight, k, 1 << 26, chunk)


def _topk_via_buffer(h, weight, bias, k: int, inv_t: float):
    """k > MAX_KERNEL_K: cuBLAS logits into an fp32 buffer of ≤ 2^27 elements per sub-chunk, torch.topk."""
    return _by_sub_chunks(h, weight, k, 1 << 27,
                          lambda s, e, buf: _torch_impl.topk_chunk(h[s:e], weight, bias, k, inv_t, buf))
