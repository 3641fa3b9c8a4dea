"""float64 dense oracle of the example-level relation losses (tests only; see ops/relation.py).

Written from the definitions with explicit pairwise / triplet tensors ([B, B, d] and [B, B, B, d]), a
different route from the op's Gram-matrix and chunked forms.
"""
from __future__ import annotations

import torch


def _huber(x):
    a = x.abs()
    return torch.where(a < 1, 0.5 * x * x, a - 0.5)


def _unit(v):
    n2 = (v * v).sum(-1, keepdim=True)
    nz = n2 > 0
    n = torch.sqrt(torch.where(nz, n2, torch.ones_like(n2)))  # safe sqrt: finite gradient at 0
    return torch.where(nz, v / n, torch.zeros_like(v))


def _rows(s, t, kind, temperature):
    n = s.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    if kind in ("similarity", "similarity_mse"):
        cs = (_unit(s)[:, None, :] * _unit(s)[None, :, :]).sum(-1)
        ct = (_unit(t)[:, None, :] * _unit(t)[None, :, :]).sum(-1)
        if kind == "similarity_mse":
            return torch.where(off, (cs - ct) ** 2, torch.zeros_like(cs)).sum(1) / (n - 1)
        rows = []
        for i in range(n):
            j = off[i]
            lp = torch.log_softmax(ct[i, j] / temperature, 0)
            lq = torch.log_softmax(cs[i, j] / temperature, 0)
            rows.append((lp.exp() * (lp - lq)).sum())
        return torch.stack(rows)
    if kind == "distance":
        def nd(x):
            diff = x[:, None, :] - x[None, :, :]
            d = torch.where(off, torch.sqrt(torch.where(off, (diff * diff).sum(-1), torch.ones(n, n, dtype=x.dtype))),
                            torch.zeros(n, n, dtype=x.dtype))
            return d / (d.sum() / (n * (n - 1)))
        return torch.where(off, _huber(nd(s) - nd(t)), torch.zeros(n, n, dtype=s.dtype)).sum(1) / (n - 1)
    # angle: psi[j, i, k] = <e_ji, e_jk>
    def psi(x):
        e = _unit(x[None, :, :] - x[:, None, :])  # [j, i, d]
        return (e[:, :, None, :] * e[:, None, :, :]).sum(-1)  # [j, i, k]
    keep = off[:, :, None] & off[:, None, :]  # i != j and k != j
    h = torch.where(keep, _huber(psi(s) - psi(t)), torch.zeros(n, n, n, dtype=s.dtype))
    return h.sum((1, 2)) / (n - 1) ** 2


def dense_relation_loss(student_emb, teacher_emb, *, kind="similarity", temperature=1.0, mask=None,
                        reduction="mean"):
    s = student_emb.double()
    t = teacher_emb.detach().double()
    B = s.shape[0]
    keep = torch.ones(B, dtype=torch.bool) if mask is None else mask.cpu()
    idx = keep.nonzero().squeeze(1)
    n = idx.numel()
    rows = torch.zeros(B, dtype=torch.float64)
    if n >= (3 if kind == "angle" else 2):
        rows = rows.index_put((idx,), _rows(s[idx], t[idx], kind, temperature))
    if reduction == "none":
        return rows
    return rows.sum() / n if (reduction == "mean" and n > 0) else rows.sum()
