"""Token-level relation loss (MiniLM v2 self-attention relations): chunked PyTorch backend and the
float64 dense oracle.

Per batch row b and relation head h (X_h = the h-th of ``H`` equal column slices of X, width d_h):

    a^S = S_h S_hᵀ / √d_hs,   a^T = T_h T_hᵀ / √d_ht                              # [L, L]
    valid(i, j) = mask[i] ∧ mask[j] ∧ (j ≤ i if causal)
    P_i = softmax_{valid j}(a^T_i·),  Q_i = softmax_{valid j}(a^S_i·)
    KL_i = Σ_j P_ij (log P_ij − log Q_ij) = c_i + lse^S_i − lse^T_i,   c_i = Σ_j P_ij (a^T_ij − a^S_ij)

Gradients with g_i the upstream weight of row i (zero on padded rows):

    ∂/∂a^S_ij = g_i (Q_ij − P_ij)                    =: G^S_ij
    ∂/∂a^T_ij = g_i P_ij (a^T_ij − a^S_ij − c_i)      =: G^T_ij
    dS_h = (G^S + G^Sᵀ) S_h / √d_hs,   dT_h = (G^T + G^Tᵀ) T_h / √d_ht

Backend contract (``reference``, ``kernels.token_relation`` and the C++ ``_C.token_relation_*``):

    forward(S [B, L, d_s], T [B, L, d_t], heads, mask [B, L] bool, causal)
        -> (kl [B, H, L] fp32 (0 on padded rows), lse_s [B, H, L] fp32, lse_t [B, H, L] fp32)
    backward(S, T, heads, mask, causal, lse_s, lse_t, c [B, H, L] fp32, g [B, H, L] fp32, need_s, need_t)
        -> (dS [B, L, d_s] fp32 | None, dT [B, L, d_t] fp32 | None)

This backend walks query chunks: one [H, chunk, L] strip per score matrix is alive at a time, never the
[H, L, L] matrix (the Triton and C++ backends go further and tile the keys with an online softmax).
"""
from __future__ import annotations

import math

import torch

from .. import _backend

_NEG = -1e30  # finite "minus infinity": keeps 0·(−inf) NaNs out of masked entries


def _chunk(L: int, heads: int, device: torch.device) -> int:
    """Query rows per chunk: the six fp32 [H, chunk, L] strips within the "token_relation" budget of
    ``_backend.chunk_rows``."""
    return _backend.chunk_rows("token_relation", L, 4 * heads * max(L, 1) * 6, device)


def _heads(X: torch.Tensor, heads: int) -> torch.Tensor:
    """[L, d] -> [H, L, d_h] fp32 (a view before the cast)."""
    L, d = X.shape
    return X.reshape(L, heads, d // heads).transpose(0, 1).float()


def _strip(Sh, Th, m, q0, q1, causal):
    """Scores of query rows q0:q1 against keys 0:kn (kn = q1 when causal: later keys are never visible):
    (aS, aT, valid, kn) with aS, aT [H, c, kn] and valid [c, kn]."""
    cS = 1.0 / math.sqrt(Sh.shape[-1])
    cT = 1.0 / math.sqrt(Th.shape[-1])
    kn = q1 if causal else Sh.shape[1]
    aS = torch.matmul(Sh[:, q0:q1], Sh[:, :kn].transpose(1, 2)).mul_(cS)  # [H, c, kn]
    aT = torch.matmul(Th[:, q0:q1], Th[:, :kn].transpose(1, 2)).mul_(cT)  # [H, c, kn]
    valid = m[q0:q1, None] & m[None, :kn]  # [c, kn]
    if causal:
        rows = torch.arange(q0, q1, device=m.device)
        valid = valid & (torch.arange(kn, device=m.device)[None, :] <= rows[:, None])
    invalid = ~valid
    aS.masked_fill_(invalid, _NEG)
    aT.masked_fill_(invalid, _NEG)
    return aS, aT, valid, kn


def forward(S, T, heads: int, mask, causal: bool):
    B, L, _ = S.shape
    dev = S.device
    kl = torch.zeros(B, heads, L, dtype=torch.float32, device=dev)
    lse_s = torch.zeros_like(kl)
    lse_t = torch.zeros_like(kl)
    ch = _chunk(L, heads, S.device)
    for b in range(B):
        Sh, Th, m = _heads(S[b], heads), _heads(T[b], heads), mask[b]
        for q0 in range(0, L, ch):
            q1 = min(q0 + ch, L)
            aS, aT, valid, _ = _strip(Sh, Th, m, q0, q1, causal)
            ls = torch.logsumexp(aS, dim=-1)  # [H, c]
            lt = torch.logsumexp(aT, dim=-1)
            P = torch.exp(aT - lt[..., None]) * valid  # [H, c, L]
            c = (P * (aT - aS)).sum(-1)  # [H, c]
            row = m[q0:q1]
            kl[b, :, q0:q1] = torch.where(row, c + ls - lt, 0.0)
            lse_s[b, :, q0:q1] = ls
            lse_t[b, :, q0:q1] = lt
    return kl, lse_s, lse_t


def backward(S, T, heads: int, mask, causal: bool, lse_s, lse_t, c, g, need_s: bool, need_t: bool):
    B, L, d_s = S.shape
    d_t = T.shape[-1]
    dev = S.device
    dS = torch.zeros(B, L, d_s, dtype=torch.float32, device=dev) if need_s else None
    dT = torch.zeros(B, L, d_t, dtype=torch.float32, device=dev) if need_t else None
    ch = _chunk(L, heads, S.device)
    for b in range(B):
        Sh, Th, m = _heads(S[b], heads), _heads(T[b], heads), mask[b]
        cS = 1.0 / math.sqrt(Sh.shape[-1])
        cT = 1.0 / math.sqrt(Th.shape[-1])
        dSh = torch.zeros_like(Sh) if need_s else None  # [H, L, d_hs]
        dTh = torch.zeros_like(Th) if need_t else None
        for q0 in range(0, L, ch):
            q1 = min(q0 + ch, L)
            aS, aT, valid, kn = _strip(Sh, Th, m, q0, q1, causal)
            gr = g[b, :, q0:q1, None]  # [H, c, 1]
            P = torch.exp(aT - lse_t[b, :, q0:q1, None]) * valid
            if need_s:
                Q = torch.exp(aS - lse_s[b, :, q0:q1, None]) * valid
                G = (Q - P) * gr  # [H, c, L]
                dSh[:, q0:q1] += torch.matmul(G, Sh[:, :kn]) * cS  # row side
                dSh[:, :kn] += torch.matmul(G.transpose(1, 2), Sh[:, q0:q1]) * cS  # column side
            if need_t:
                G = P * (aT - aS - c[b, :, q0:q1, None]) * gr
                dTh[:, q0:q1] += torch.matmul(G, Th[:, :kn]) * cT
                dTh[:, :kn] += torch.matmul(G.transpose(1, 2), Th[:, q0:q1]) * cT
        if need_s:
            dS[b] = dSh.transpose(0, 1).reshape(L, d_s)
        if need_t:
            dT[b] = dTh.transpose(0, 1).reshape(L, d_t)
    return dS, dT


# ----------------------------------------------------------------------------------------------
# float64 dense oracle (tests only: materialises [B, H, L, L])
# ----------------------------------------------------------------------------------------------
def dense_token_relation_loss(student_states, teacher_states, *, relation_heads: int, mask=None,
                              causal: bool = True, reduction: str = "mean") -> torch.Tensor:
    """The issue's definition on full float64 matrices; differentiate with autograd (both inputs).

    Returns a float64 scalar (mean over valid rows and heads / sum) or [B, L] (none: head-mean per row,
    0 on padded rows).
    """
    S = student_states.double()
    T = teacher_states.double()
    B, L, d_s = S.shape
    H = relation_heads
    Sh = S.reshape(B, L, H, d_s // H).transpose(1, 2)  # [B, H, L, d_hs]
    Th = T.reshape(B, L, H, T.shape[-1] // H).transpose(1, 2)
    aS = Sh @ Sh.transpose(-1, -2) / math.sqrt(Sh.shape[-1])  # [B, H, L, L]
    aT = Th @ Th.transpose(-1, -2) / math.sqrt(Th.shape[-1])
    m = torch.ones(B, L, dtype=torch.bool, device=S.device) if mask is None else mask.to(S.device)
    valid = m[:, None, :, None] & m[:, None, None, :]  # [B, 1, L, L]
    if causal:
        valid = valid & torch.ones(L, L, dtype=torch.bool, device=S.device).tril()
    logP = torch.log_softmax(aT.masked_fill(~valid, _NEG), dim=-1)
    logQ = torch.log_softmax(aS.masked_fill(~valid, _NEG), dim=-1)
    kl = torch.where(valid, logP.exp() * (logP - logQ), torch.zeros_like(logP)).sum(-1)  # [B, H, L]
    kl = torch.where(m[:, None, :], kl, torch.zeros_like(kl))
    if reduction == "none":
        return kl.mean(1)
    if reduction == "sum":
        return kl.sum()
    n = int(m.sum()) * H
    return kl.sum() / n if n > 0 else kl.sum() * 0.0


def naive_token_relation_loss(student_states, teacher_states, *, relation_heads: int, mask=None,
                              causal: bool = True) -> torch.Tensor:
    """The materialised [B, H, L, L] path in the input precision (the benchmark's baseline; mean reduction)."""
    B, L, d_s = student_states.shape
    H = relation_heads
    Sh = student_states.reshape(B, L, H, d_s // H).transpose(1, 2)
    Th = teacher_states.reshape(B, L, H, teacher_states.shape[-1] // H).transpose(1, 2)
    aS = torch.matmul(Sh, Sh.transpose(-1, -2)) / math.sqrt(Sh.shape[-1])
    aT = torch.matmul(Th, Th.transpose(-1, -2)) / math.sqrt(Th.shape[-1])
    m = torch.ones(B, L, dtype=torch.bool, device=aS.device) if mask is None else mask
    valid = m[:, None, :, None] & m[:, None, None, :]
    if causal:
        valid = valid & torch.ones(L, L, dtype=torch.bool, device=aS.device).tril()
    logP = torch.log_softmax(aT.masked_fill(~valid, _NEG), dim=-1)
    logQ = torch.log_softmax(aS.masked_fill(~valid, _NEG), dim=-1)
    kl = (logP.exp() * (logP - logQ)).masked_fill(~valid, 0.0).sum(-1)  # [B, H, L]
    kl = kl.masked_fill(~m[:, None, :], 0.0)
    return kl.sum() / (m.sum() * H).clamp_min(1)
