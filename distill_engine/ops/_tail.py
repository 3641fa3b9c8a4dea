"""The exact tail bucket's vocabulary-side helpers (issue 15; docs/ARCHITECTURE.md, "The exact tail bucket").

The teacher ids of each row are masked to −inf in a chunk's fp32 logits buffer, so one log-sum-exp over it is
the log of the exact mass outside the ids (student: ``fused_distill_loss``; teacher: ``teacher_targets``) and
the loss's dense gradient pass forms exactly 0 at the ids.
"""
from __future__ import annotations

import torch


def mask_ids(ids_c: torch.Tensor):
    """Ids to mask out of a chunk's logits: (mids [c, k] int64, has [c] bool).

    Empty slots (-1) point at the row's first real id (so they mask nothing new and never collide with a real
    id), duplicates are harmless (they write the same value); rows without any id point at column 0 and
    write its own value back (see mask_buf).
    """
    slot = ids_c >= 0
    has = slot.any(1)
    first = ids_c.gather(1, slot.to(torch.uint8).argmax(1, keepdim=True))  # [c, 1] first real id (−1 if none)
    mids = torch.where(slot, ids_c, first).clamp(min=0).long()
    return mids, has


def repeated(ids_c: torch.Tensor) -> torch.Tensor:
    """[c, k] bool: True at every repeat of an id already present earlier in sorted order (one copy stays False)."""
    if ids_c.shape[1] < 2:
        return torch.zeros_like(ids_c, dtype=torch.bool)
    srt, perm = ids_c.sort(dim=1)
    rep = torch.zeros_like(srt, dtype=torch.bool)
    rep[:, 1:] = srt[:, 1:] == srt[:, :-1]
    return torch.zeros_like(rep).scatter(1, perm, rep)


def mask_buf(buf: torch.Tensor, mids: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
    """Set the teacher ids of every row of the fp32 logits buffer to −inf in place; returns the old values [c, k].

    With S masked, one log-sum-exp over the buffer is the student's exact rest mass (log space), and the
    dense gradient pass forms exactly 0 at S, so the S entries are written by the sparse pass alone (no
    cancellation between a huge dense term and its correction).
    """
    old = buf.gather(1, mids)  # [c, k]
    vals = torch.where(has[:, None], torch.full((), float("-inf"), device=buf.device), old)
    buf.scatter_(1, mids, vals)
    return old


def logits_and_rest(impl, h_c, weight, bias, T: float, need1: bool, ids_c):
    """The chunk's fp32 logits with the teacher ids masked to −inf, and the log-sum-exps the driver needs.

    Returns (buf [c, V], rest_lse [c] = logsumexp over V \\ S at T, lse_1 [c] | None (full, T = 1; at T = 1
    a placeholder that _chunk_terms replaces), z_S [c, k] raw logits at the ids).
    """
    mids, has = mask_ids(ids_c)
    if getattr(impl, "fused_rest", False):
        # the backend leaves S out of its log-sum-exps in the logits pass itself (C++): no second reduction
        ex = torch.where(has[:, None], mids, torch.full((), -1, dtype=mids.dtype, device=mids.device))
        buf, rest_lse, rest_1 = impl.logits_lse_excluding(h_c, weight, bias, T, need1 and T != 1.0, ex)
        z_S = mask_buf(buf, mids, has)
        lse_1 = None
        if need1:
            if T != 1.0:  # CE's full log-sum-exp: the rest part plus the exact logits at S (positives only)
                lse_S1 = torch.logsumexp(torch.where((ids_c >= 0) & ~repeated(ids_c), z_S.double(), float("-inf")), 1)
                lse_1 = torch.logaddexp(rest_1.double(), lse_S1)
            else:
                lse_1 = rest_lse  # replaced by the rebuilt full log-sum-exp in _chunk_terms
        return buf, rest_lse, lse_1, z_S
    buf, _, lse_1 = impl.logits_lse(h_c, weight, bias, T, need1, True)  # buf [c, V] fp32
    z_S = mask_buf(buf, mids, has)  # [c, k] raw logits at the ids; buf now −inf there
    rest_lse = impl.buf_lse(buf, T)  # [c] logsumexp over V \ S: the one extra reduction
    return buf, rest_lse, lse_1, z_S
