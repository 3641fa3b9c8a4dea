"""Triton kernels of token_relation_loss (the ``triton`` backend); math in ``reference/token_relation.py``.

One program per (query tile, batch row · head) in the forward and row-side backward, one per
(key tile, batch row · head) in the column-side backward. Score tiles a^S = S_q S_kᵀ/√d_hs and
a^T = T_q T_kᵀ/√d_ht are formed in registers and never written:

1. ``_relation_fwd_kernel``: online softmax over key tiles for both matrices at once; per row it carries
   (m^T, l^T, acc = Σ p^T (a^T − a^S)) and (m^S, l^S) and writes kl = acc/l^T + lse^S − lse^T and both lses.
2. ``_relation_bwd_kernel`` with COL False (row side): recomputes P = exp(a^T − lse^T), Q = exp(a^S − lse^S)
   per tile from the saved lses, G^S = g(Q − P), G^T = g P (a^T − a^S − c) and accumulates
   dS_q = G^S S_k/√d_hs (dT_q likewise).
3. ``_relation_bwd_kernel`` with COL True (column side): the same tiles walked per key tile,
   dS_k += G^Sᵀ S_q/√d_hs (dT_k likewise), added onto the row-side result (same stream: the row pass has
   finished).

The passes share their set-up through jit helpers: ``_head`` (the (batch row, head) base pointers),
``_query_tiles`` (a query tile of both models + its masks), ``_key_ok`` (the key mask), ``_keys_end``,
``_scores`` (both score tiles of a [BQ, BK] tile), ``_valid`` (padding + causal mask) and, in the backward,
``_row_stats``, ``_tile_grads`` (the saved row statistics and G^S, G^T of one tile) and ``_store_grad``.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .._backend import triton_interpret

_NEG = tl.constexpr(-1e30)  # a constexpr: compiled kernels may read no other globals


@triton.jit
def _head(S_ptr, T_ptr, bh, H, ds, dt, s_sb, s_sd, t_sb, t_sd):
    """(b, h, S_b, T_b): batch row, head and the base pointers of this head's columns in S and T."""
    b = bh // H
    h = bh % H
    return b, h, S_ptr + b * s_sb + h * ds * s_sd, T_ptr + b * t_sb + h * dt * t_sd


@triton.jit
def _key_ok(M_ptr, b, L, offs):
    """(in range, in range and not padding) of the positions ``offs`` of batch row b."""
    ok_in = offs < L
    return ok_in, ok_in & (tl.load(M_ptr + b * L + offs, mask=ok_in, other=0) != 0)


@triton.jit
def _query_tiles(S_b, T_b, M_ptr, b, L, offs_q, ds, dt, s_sl, s_sd, t_sl, t_sd,
                 BDS: tl.constexpr, BDT: tl.constexpr, UPCAST: tl.constexpr):
    """(sq [BQ, BDS], tq [BQ, BDT], q_in, q_ok): the query rows of both models (fp32 when UPCAST) + masks."""
    q_in, q_ok = _key_ok(M_ptr, b, L, offs_q)
    offs_ds = tl.arange(0, BDS)
    offs_dt = tl.arange(0, BDT)
    sq = tl.load(S_b + offs_q[:, None] * s_sl + offs_ds[None, :] * s_sd,
                 mask=q_in[:, None] & (offs_ds[None, :] < ds), other=0.0)  # [BQ, BDS]
    tq = tl.load(T_b + offs_q[:, None] * t_sl + offs_dt[None, :] * t_sd,
                 mask=q_in[:, None] & (offs_dt[None, :] < dt), other=0.0)  # [BQ, BDT]
    if UPCAST:  # the interpreter multiplies 16-bit floats wrongly: upcast (exact)
        sq = sq.to(tl.float32)
        tq = tq.to(tl.float32)
    return sq, tq, q_in, q_ok


@triton.jit
def _scores(S_ptr, T_ptr, row0, offs_q, offs_k, ds, dt, q_ok, k_ok,
            s_sl, s_sd, t_sl, t_sd, sq, tq, c_s, c_t,
            BDS: tl.constexpr, BDT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """(a^S, a^T, S_k, T_k) of one [BQ, BK] tile; sq/tq are the loaded query tiles [BQ, BD*]."""
    offs_ds = tl.arange(0, BDS)
    offs_dt = tl.arange(0, BDT)
    sk = tl.load(S_ptr + row0 + offs_k[:, None] * s_sl + offs_ds[None, :] * s_sd,
                 mask=k_ok[:, None] & (offs_ds[None, :] < ds), other=0.0)  # [BK, BDS]
    tk = tl.load(T_ptr + offs_k[:, None] * t_sl + offs_dt[None, :] * t_sd,
                 mask=k_ok[:, None] & (offs_dt[None, :] < dt), other=0.0)  # [BK, BDT]
    if UPCAST:
        sk = sk.to(tl.float32)
        tk = tk.to(tl.float32)
    a_s = tl.dot(sq, tl.trans(sk), input_precision=PREC) * c_s  # [BQ, BK]
    a_t = tl.dot(tq, tl.trans(tk), input_precision=PREC) * c_t
    return a_s, a_t, sk, tk


@triton.jit
def _keys_end(pid_q, L, BQ: tl.constexpr, CAUSAL: tl.constexpr):
    """End of the keys query tile pid_q attends to: L, or the end of the tile itself when causal."""
    hi = L
    if CAUSAL:
        hi = tl.minimum((pid_q + 1) * BQ, L)
    return hi


@triton.jit
def _valid(q_ok, k_ok, offs_q, offs_k, CAUSAL: tl.constexpr):
    """[BQ, BK] pairs that count: both positions real, and key ≤ query when causal."""
    valid = q_ok[:, None] & k_ok[None, :]
    if CAUSAL:
        valid = valid & (offs_k[None, :] <= offs_q[:, None])
    return valid


@triton.jit
def _relation_fwd_kernel(S_ptr, T_ptr, M_ptr, kl_ptr, lses_ptr, lset_ptr,
                         L, H, ds, dt, s_sb, s_sl, s_sd, t_sb, t_sl, t_sd, c_s, c_t,
                         CAUSAL: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, BDS: tl.constexpr,
                         BDT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """kl_i = Σ_j P_ij (a^T_ij − a^S_ij) + lse^S_i − lse^T_i over valid keys j (online softmax).

    Per key tile, with both running maxima m^T, m^S and sums l^T, l^S (masked entries exp(-1e30) = 0):
    m' = max(m, max_j a_j), l ← l·e^{m − m'} + Σ_j e^{a_j − m'},
    acc ← acc·e^{m^T − m^T'} + Σ_j p^T_j (a^T_j − a^S_j).
    """
    pid_q = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, S_b, T_b = _head(S_ptr, T_ptr, bh, H, ds, dt, s_sb, s_sd, t_sb, t_sd)
    offs_q = pid_q * BQ + tl.arange(0, BQ)
    sq, tq, q_in, q_ok = _query_tiles(S_b, T_b, M_ptr, b, L, offs_q, ds, dt, s_sl, s_sd, t_sl, t_sd,
                                      BDS, BDT, UPCAST)
    m_t = tl.full((BQ,), _NEG, tl.float32)
    m_s = tl.full((BQ,), _NEG, tl.float32)
    l_t = tl.zeros((BQ,), tl.float32)
    l_s = tl.zeros((BQ,), tl.float32)
    acc = tl.zeros((BQ,), tl.float32)
    hi = _keys_end(pid_q, L, BQ, CAUSAL)
    for k0 in range(0, hi, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_in, k_ok = _key_ok(M_ptr, b, L, offs_k)
        a_s, a_t, sk, tk = _scores(S_b, T_b, 0, offs_q, offs_k, ds, dt, q_in, k_in, s_sl, s_sd, t_sl, t_sd,
                                   sq, tq, c_s, c_t, BDS, BDT, UPCAST, PREC)
        valid = _valid(q_ok, k_ok, offs_q, offs_k, CAUSAL)
        mt_new = tl.maximum(m_t, tl.max(tl.where(valid, a_t, _NEG), 1))
        ms_new = tl.maximum(m_s, tl.max(tl.where(valid, a_s, _NEG), 1))
        # exp of a where-ed argument: masked entries are exp(-1e30) = 0 and never overflow
        p_t = tl.exp(tl.where(valid, a_t - mt_new[:, None], _NEG))
        p_s = tl.exp(tl.where(valid, a_s - ms_new[:, None], _NEG))
        al_t = tl.exp(m_t - mt_new)
        al_s = tl.exp(m_s - ms_new)
        l_t = l_t * al_t + tl.sum(p_t, 1)
        acc = acc * al_t + tl.sum(p_t * (a_t - a_s), 1)
        l_s = l_s * al_s + tl.sum(p_s, 1)
        m_t = mt_new
        m_s = ms_new
    has = q_ok & (l_t > 0)
    lt_safe = tl.where(has, l_t, 1.0)
    ls_safe = tl.where(has, l_s, 1.0)
    lse_t = m_t + tl.log(lt_safe)
    lse_s = m_s + tl.log(ls_safe)
    kl = tl.where(has, acc / lt_safe + lse_s - lse_t, 0.0)
    out = bh * L + offs_q
    tl.store(kl_ptr + out, kl, mask=q_in)
    tl.store(lses_ptr + out, tl.where(has, lse_s, 0.0), mask=q_in)
    tl.store(lset_ptr + out, tl.where(has, lse_t, 0.0), mask=q_in)


@triton.jit
def _row_stats(lses_ptr, lset_ptr, c_ptr, g_ptr, row, q_in):
    """(lse^S, lse^T, c, g) [BQ] saved by the forward / given by the op for the rows ``row``."""
    return (tl.load(lses_ptr + row, mask=q_in, other=0.0), tl.load(lset_ptr + row, mask=q_in, other=0.0),
            tl.load(c_ptr + row, mask=q_in, other=0.0), tl.load(g_ptr + row, mask=q_in, other=0.0))


@triton.jit
def _tile_grads(S_b, T_b, offs_q, offs_k, q_in, k_in, q_ok, k_ok, ds, dt, s_sl, s_sd, t_sl, t_sd,
                sq, tq, c_s, c_t, lse_s, lse_t, c, g,
                CAUSAL: tl.constexpr, BDS: tl.constexpr, BDT: tl.constexpr, UPCAST: tl.constexpr,
                PREC: tl.constexpr):
    """(G^S, G^T, S_k, T_k) of one [BQ, BK] tile: P = exp(a^T − lse^T), Q = exp(a^S − lse^S) over the valid
    pairs (0 elsewhere), G^S = g(Q − P), G^T = g P (a^T − a^S − c) with [BQ] row statistics."""
    a_s, a_t, sk, tk = _scores(S_b, T_b, 0, offs_q, offs_k, ds, dt, q_in, k_in, s_sl, s_sd, t_sl, t_sd,
                               sq, tq, c_s, c_t, BDS, BDT, UPCAST, PREC)
    valid = _valid(q_ok, k_ok, offs_q, offs_k, CAUSAL)
    p = tl.exp(tl.where(valid, a_t - lse_t[:, None], _NEG))
    q = tl.exp(tl.where(valid, a_s - lse_s[:, None], _NEG))
    gs = g[:, None] * (q - p)
    gt = g[:, None] * p * (a_t - a_s - c[:, None])
    return gs, gt, sk, tk


@triton.jit
def _store_grad(ptr, b, h, L, d, d_row, offs, ok_in, acc, scale, BD: tl.constexpr, ACCUMULATE: tl.constexpr):
    """grad[b, offs, h·d : (h+1)·d] (=, or += when ACCUMULATE) acc · scale; grad is fp32 [B, L, d_row]."""
    offs_d = tl.arange(0, BD)
    ptrs = ptr + b * L * d_row + offs[:, None] * d_row + h * d + offs_d[None, :]
    ok = ok_in[:, None] & (offs_d[None, :] < d)
    val = acc * scale
    if ACCUMULATE:
        val += tl.load(ptrs, mask=ok, other=0.0)
    tl.store(ptrs, val, mask=ok)


@triton.jit
def _relation_bwd_kernel(S_ptr, T_ptr, M_ptr, lses_ptr, lset_ptr, c_ptr, g_ptr, dS_ptr, dT_ptr,
                         L, H, ds, dt, s_sb, s_sl, s_sd, t_sb, t_sl, t_sd, c_s, c_t, d_ss, d_ts,
                         COL: tl.constexpr, CAUSAL: tl.constexpr, NEED_S: tl.constexpr, NEED_T: tl.constexpr,
                         BQ: tl.constexpr, BK: tl.constexpr, BDS: tl.constexpr, BDT: tl.constexpr,
                         UPCAST: tl.constexpr, PREC: tl.constexpr):
    """One side of the backward; the same G^S, G^T tiles (``_tile_grads``) walked two ways.

    Row side (COL False, program = query tile):  dS_q = Σ_k G^S_qk S_k /√d_hs, dT_q = Σ_k G^T_qk T_k /√d_ht
    (written, fp32). Column side (COL True, program = key tile, launched after the row side):
    dS_k += Σ_q G^S_qkᵀ S_q /√d_hs, dT_k += Σ_q G^T_qkᵀ T_q /√d_ht (read-modify-write onto the row side).
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b, h, S_b, T_b = _head(S_ptr, T_ptr, bh, H, ds, dt, s_sb, s_sd, t_sb, t_sd)
    if COL:
        offs_k = pid * BK + tl.arange(0, BK)
        k_in, k_ok = _key_ok(M_ptr, b, L, offs_k)
        d_s = tl.zeros((BK, BDS), tl.float32)
        d_t = tl.zeros((BK, BDT), tl.float32)
        lo = 0
        if CAUSAL:
            lo = (pid * BK // BQ) * BQ  # queries before the key tile see none of its keys
        for q0 in range(lo, L, BQ):
            offs_q = q0 + tl.arange(0, BQ)
            sq, tq, q_in, q_ok = _query_tiles(S_b, T_b, M_ptr, b, L, offs_q, ds, dt, s_sl, s_sd, t_sl, t_sd,
                                              BDS, BDT, UPCAST)
            lse_s, lse_t, c, g = _row_stats(lses_ptr, lset_ptr, c_ptr, g_ptr, bh * L + offs_q, q_in)
            gs, gt, sk, tk = _tile_grads(S_b, T_b, offs_q, offs_k, q_in, k_in, q_ok, k_ok, ds, dt, s_sl, s_sd,
                                         t_sl, t_sd, sq, tq, c_s, c_t, lse_s, lse_t, c, g,
                                         CAUSAL, BDS, BDT, UPCAST, PREC)
            if NEED_S:
                d_s = tl.dot(tl.trans(gs).to(sq.dtype), sq, d_s, input_precision=PREC)
            if NEED_T:
                d_t = tl.dot(tl.trans(gt).to(tq.dtype), tq, d_t, input_precision=PREC)
        offs_own, own_in = offs_k, k_in
    else:
        offs_q = pid * BQ + tl.arange(0, BQ)
        sq, tq, q_in, q_ok = _query_tiles(S_b, T_b, M_ptr, b, L, offs_q, ds, dt, s_sl, s_sd, t_sl, t_sd,
                                          BDS, BDT, UPCAST)
        lse_s, lse_t, c, g = _row_stats(lses_ptr, lset_ptr, c_ptr, g_ptr, bh * L + offs_q, q_in)
        d_s = tl.zeros((BQ, BDS), tl.float32)
        d_t = tl.zeros((BQ, BDT), tl.float32)
        hi = _keys_end(pid, L, BQ, CAUSAL)
        for k0 in range(0, hi, BK):
            offs_k = k0 + tl.arange(0, BK)
            k_in, k_ok = _key_ok(M_ptr, b, L, offs_k)
            gs, gt, sk, tk = _tile_grads(S_b, T_b, offs_q, offs_k, q_in, k_in, q_ok, k_ok, ds, dt, s_sl, s_sd,
                                         t_sl, t_sd, sq, tq, c_s, c_t, lse_s, lse_t, c, g,
                                         CAUSAL, BDS, BDT, UPCAST, PREC)
            if NEED_S:
                d_s = tl.dot(gs.to(sk.dtype), sk, d_s, input_precision=PREC)
            if NEED_T:
                d_t = tl.dot(gt.to(tk.dtype), tk, d_t, input_precision=PREC)
        offs_own, own_in = offs_q, q_in
    if NEED_S:
        _store_grad(dS_ptr, b, h, L, ds, d_ss, offs_own, own_in, d_s, c_s, BDS, COL)
    if NEED_T:
        _store_grad(dT_ptr, b, h, L, dt, d_ts, offs_own, own_in, d_t, c_t, BDT, COL)


def _config(S, ds, dt):
    """(BQ, BK, BDS, BDT, num_warps, UPCAST, precision)."""
    # fp32 operands at 64×64 tiles spill tens of KB per thread on sm_90a (the AOT check): 32×32 there
    default = "16" if triton_interpret() else ("32" if S.dtype == torch.float32 else "64")
    tile = int(os.environ.get("DISTILL_ENGINE_RELATION_TILE", default))
    bds = max(16, triton.next_power_of_2(ds))
    bdt = max(16, triton.next_power_of_2(dt))
    upcast = triton_interpret() and S.dtype != torch.float32
    return tile, tile, bds, bdt, 4, upcast, "ieee"


def _common(S, T, heads):
    B, L, d_s = S.shape
    ds, dt = d_s // heads, T.shape[2] // heads
    return B, L, ds, dt, 1.0 / math.sqrt(ds), 1.0 / math.sqrt(dt)


def forward(S, T, heads: int, mask, causal: bool):
    B, L, ds, dt, c_s, c_t = _common(S, T, heads)
    BQ, BK, BDS, BDT, warps, upcast, prec = _config(S, ds, dt)
    m8 = mask.to(torch.uint8).contiguous()  # [B, L]
    kl = torch.empty(B, heads, L, dtype=torch.float32, device=S.device)
    lse_s = torch.empty_like(kl)
    lse_t = torch.empty_like(kl)
    grid = (triton.cdiv(L, BQ), B * heads)
    _relation_fwd_kernel[grid](S, T, m8, kl, lse_s, lse_t, L, heads, ds, dt, *S.stride(), *T.stride(), c_s, c_t,
                               CAUSAL=causal, BQ=BQ, BK=BK, BDS=BDS, BDT=BDT, UPCAST=upcast, PREC=prec, num_warps=warps)
    return kl, lse_s, lse_t


def backward(S, T, heads: int, mask, causal: bool, lse_s, lse_t, c, g, need_s: bool, need_t: bool):
    B, L, ds, dt, c_s, c_t = _common(S, T, heads)
    BQ, BK, BDS, BDT, warps, upcast, prec = _config(S, ds, dt)
    m8 = mask.to(torch.uint8).contiguous()
    dS = torch.empty(B, L, S.shape[2], dtype=torch.float32, device=S.device) if need_s else None
    dT = torch.empty(B, L, T.shape[2], dtype=torch.float32, device=S.device) if need_t else None
    dummy = lse_s
    args = (S, T, m8, lse_s.contiguous(), lse_t.contiguous(), c.contiguous(), g.contiguous(),
            dS if need_s else dummy, dT if need_t else dummy,
            L, heads, ds, dt, *S.stride(), *T.stride(), c_s, c_t, S.shape[2], T.shape[2])
    meta = dict(CAUSAL=causal, NEED_S=need_s, NEED_T=need_t, BQ=BQ, BK=BK, BDS=BDS, BDT=BDT, UPCAST=upcast,
                PREC=prec, num_warps=warps)
    _relation_bwd_kernel[(triton.cdiv(L, BQ), B * heads)](*args, COL=False, **meta)
    _relation_bwd_kernel[(triton.cdiv(L, BK), B * heads)](*args, COL=True, **meta)
    return dS, dT
