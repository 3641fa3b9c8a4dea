"""Example-level relation losses (embedding distillation) and the pooling of LM states into embeddings.

``relation_loss(student_emb [B, d_s], teacher_emb [B, d_t], kind=...)`` compares relations between the
examples of a batch, so the widths may differ and no projection is needed. With ĉ(x)_ij = cos(x_i, x_j):

* ``similarity``: per row i, KL(P_i ‖ Q_i) with P_i = softmax_{j≠i}(ĉ(t)_ij/τ), Q_i = softmax_{j≠i}(ĉ(s)_ij/τ)
  (the contrastive-distillation form); the row loss is that KL.
* ``similarity_mse``: (ĉ(s)_ij − ĉ(t)_ij)² over j ≠ i; the row loss is its mean over j.
* ``distance`` (RKD-D, Park et al. 2019): δ_ij = ‖x_i − x_j‖ / μ, μ the mean over pairs i ≠ j;
  huber(δ^S_ij − δ^T_ij) (smooth-L1, β = 1) over j ≠ i; the row loss is its mean over j.
* ``angle`` (RKD-A): ψ_ijk = ⟨e_ji, e_jk⟩, e_ji = (x_i − x_j)/‖x_i − x_j‖, over triplets with i ≠ j and
  k ≠ j (j the vertex; i = k gives ψ = 1 on both sides); huber(ψ^S − ψ^T); the row loss of vertex j is its mean over (i, k). Computed one chunk
  of vertices at a time under activation checkpointing, so memory is O(chunk·B·(B + d)) = O(B²) for a
  fixed chunk, never the O(B³) triplet tensor.

``mask`` [B] bool drops examples. ``reduction``: "mean" over kept rows | "sum" | "none" (per-row [B],
0 where dropped). Computed in float32 whatever the input dtype. ``gather_across_ranks=True`` builds the
relation over the global batch of every data-parallel rank (``torch.distributed`` all-gather); the
backward pass sums each row's gradient over the ranks' (identical) losses and returns it to the rank that
owns the row, so after data-parallel gradient averaging the parameters get exactly the gradient of the
global-batch loss. Ranks may hold different batch sizes.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import _backend
from .._validate import FLOAT_DTYPES, check_bool, check_choice, check_mask, check_positive, check_tensor

KINDS = ("similarity", "similarity_mse", "distance", "angle")
REDUCTIONS = ("mean", "sum", "none")
POOLINGS = ("mean", "last", "cls")
_EPS = 1e-12

__all__ = ["relation_loss", "pool_hidden", "gather_with_grad", "KINDS", "REDUCTIONS", "POOLINGS"]


# ----------------------------------------------------------------------------------------------
# pooling
# ----------------------------------------------------------------------------------------------
def pool_hidden(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *, pooling: str = "mean"):
    """[B, L, d] states -> [B, d] embeddings.

    ``mean``: average over positions where attention_mask is 1; ``last``: the last such position (right or
    left padding); ``cls``: the first such position. A row with no valid position pools to zeros.
    """
    check_choice("pooling", pooling, POOLINGS)
    check_tensor("hidden", hidden, ndim=3, dtypes=FLOAT_DTYPES)
    B, L, _ = hidden.shape
    if attention_mask is None:
        m = torch.ones(B, L, dtype=torch.bool, device=hidden.device)
    else:
        check_tensor("attention_mask", attention_mask, ndim=2, shape=(B, L), device=hidden.device)
        m = attention_mask.bool()
    if pooling == "mean":
        w = m.to(hidden.dtype)[..., None]  # [B, L, 1]
        return (hidden * w).sum(1) / w.sum(1).clamp_min(1)
    pos = torch.arange(L, device=hidden.device).expand(B, L)
    if pooling == "last":
        idx = torch.where(m, pos, -1).amax(1)  # [B]
    else:
        idx = torch.where(m, pos, L).amin(1)
    any_valid = m.any(1)
    idx = idx.clamp(0, L - 1)
    out = hidden[torch.arange(B, device=hidden.device), idx]  # [B, d]
    return out * any_valid[:, None].to(out.dtype)


# ----------------------------------------------------------------------------------------------
# all-gather with gradient
# ----------------------------------------------------------------------------------------------
class _GatherRows(torch.autograd.Function):
    """[b_r, d] on each rank -> [Σ b_r, d] in rank order; backward: all-reduce-sum, own slice."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        world = dist.get_world_size(group)
        n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n, group=group)
        sizes = [int(s) for s in sizes]
        width = max(sizes)
        pad = x.new_zeros((width,) + tuple(x.shape[1:]))
        pad[: x.shape[0]] = x
        parts = [torch.empty_like(pad) for _ in range(world)]
        dist.all_gather(parts, pad.contiguous(), group=group)
        ctx.sizes, ctx.rank, ctx.group, ctx.width = sizes, dist.get_rank(group), group, width
        return torch.cat([p[:s] for p, s in zip(parts, sizes)], 0)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)  # every rank's loss copy contributes to every row
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.sizes[ctx.rank]], None


def gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """All-gather rows across the data-parallel ranks (differentiable; identity when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x
    return _GatherRows.apply(x, group)


# ----------------------------------------------------------------------------------------------
# the losses (float32, autograd)
# ----------------------------------------------------------------------------------------------
def _cos(x):
    xn = F.normalize(x, dim=1, eps=_EPS)
    return xn @ xn.t()  # [B, B]


def _offdiag(n, device):
    return ~torch.eye(n, dtype=torch.bool, device=device)


def _rows_similarity(s, t, tau):
    n = s.shape[0]
    off = _offdiag(n, s.device)
    neg = torch.finfo(torch.float32).min
    logq = torch.log_softmax((_cos(s) / tau).masked_fill(~off, neg), 1)
    logp = torch.log_softmax((_cos(t) / tau).masked_fill(~off, neg), 1)
    return torch.where(off, logp.exp() * (logp - logq), torch.zeros_like(logp)).sum(1)  # [B]


def _rows_similarity_mse(s, t):
    n = s.shape[0]
    off = _offdiag(n, s.device).float()
    return ((_cos(s) - _cos(t)) ** 2 * off).sum(1) / (n - 1)


def _dist(x):
    sq = (x * x).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.t())).clamp_min(0)
    n = x.shape[0]
    off = _offdiag(n, x.device)
    # sqrt only off the diagonal, where its gradient is finite; diag stays exactly 0
    d = torch.where(off, torch.sqrt(torch.where(off, d2, torch.ones_like(d2)).clamp_min(_EPS)), torch.zeros_like(d2))
    return d / (d.sum() / (n * (n - 1))).clamp_min(_EPS)


def _rows_distance(s, t):
    n = s.shape[0]
    off = _offdiag(n, s.device).float()
    return (F.smooth_l1_loss(_dist(s), _dist(t), reduction="none") * off).sum(1) / (n - 1)


def _angle_chunk(s, t, j0: int, j1: int):
    """Row losses of vertices j0:j1: mean over (i, k), i ≠ j ≠ k, of huber(ψ^S_ijk − ψ^T_ijk)."""
    n = s.shape[0]
    idx = torch.arange(j0, j1, device=s.device)

    def psi(x):
        e = F.normalize(x[None, :, :] - x[j0:j1, None, :], dim=2, eps=_EPS)  # [c, B, d]: e_ji
        return e @ e.transpose(1, 2)  # [c, B, B]

    keep = torch.ones(j1 - j0, n, dtype=torch.bool, device=s.device)
    keep[torch.arange(j1 - j0, device=s.device), idx] = False  # i ≠ j
    pair = keep[:, :, None] & keep[:, None, :]  # [c, B, B]
    h = F.smooth_l1_loss(psi(s), psi(t), reduction="none") * pair
    return h.sum((1, 2)) / ((n - 1) ** 2)


def _rows_angle(s, t):
    n = s.shape[0]
    d = max(s.shape[1], t.shape[1])
    # vertices per chunk: the chunk's fp32 [c, B, d] / [c, B, B] tensors within the "relation_angle" budget
    chunk = _backend.chunk_rows("relation_angle", n, 4 * n * (d + 2 * n) * 4, s.device)
    out = []
    for j0 in range(0, n, chunk):
        j1 = min(n, j0 + chunk)
        if torch.is_grad_enabled() and (s.requires_grad or t.requires_grad):
            # recompute the [c, B, B] / [c, B, d] chunk tensors in backward: O(B²) memory overall
            out.append(checkpoint(_angle_chunk, s, t, j0, j1, use_reentrant=False))
        else:
            out.append(_angle_chunk(s, t, j0, j1))
    return torch.cat(out)


def relation_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, *, kind: str = "similarity",
                  temperature: float = 1.0, mask: Optional[torch.Tensor] = None, reduction: str = "mean",
                  gather_across_ranks: bool = False, group=None) -> torch.Tensor:
    """Relation-based distillation loss between student and teacher embeddings (see the module docstring).

    Args:
        student_emb: [B, d_s]; gradients flow to it.  teacher_emb: [B, d_t] (d_t may differ); a constant.
        kind: "similarity" | "similarity_mse" | "distance" | "angle".
        temperature: τ > 0 of the similarity softmaxes (used by kind="similarity" only).
        mask: optional [B] bool, False drops the example.
        reduction: "mean" over kept rows | "sum" | "none" (per-row [B] of this rank's rows, 0 where dropped).
        gather_across_ranks: build the relation over every rank's rows (torch.distributed must be initialised).

    Returns a float32 scalar (or [B]). Fewer than 2 kept rows (3 for angle) leave no relation: the loss is 0.0.
    """
    check_choice("kind", kind, KINDS)
    check_choice("reduction", reduction, REDUCTIONS)
    check_positive("temperature", temperature)
    check_tensor("student_emb", student_emb, ndim=2, dtypes=FLOAT_DTYPES)
    dev = student_emb.device
    check_tensor("teacher_emb", teacher_emb, ndim=2, dtypes=FLOAT_DTYPES, device=dev)
    B = student_emb.shape[0]
    if teacher_emb.shape[0] != B:
        raise ValueError(f"teacher_emb has {teacher_emb.shape[0]} rows but student_emb has {B}; pass the same examples")
    if mask is not None:
        check_mask(mask, (B,), dev)
    check_bool("gather_across_ranks", gather_across_ranks)
    t_local = teacher_emb.detach().float()
    for name, x in (("teacher_emb", t_local), ("student_emb", student_emb.detach())):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"relation_loss: {name} contains non-finite values "
                             f"(first at row {int((~torch.isfinite(x)).any(1).nonzero()[0, 0])})")
    keep = mask if mask is not None else torch.ones(B, dtype=torch.bool, device=dev)
    s, t, k = student_emb.float(), t_local, keep
    if gather_across_ranks:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("relation_loss: gather_across_ranks=True needs torch.distributed to be initialised "
                             "(launch with torchrun / deepspeed), or pass gather_across_ranks=False")
        start = 0
        if dist.get_world_size(group) > 1:
            sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(dist.get_world_size(group))]
            dist.all_gather(sizes, torch.tensor([B], dtype=torch.int64, device=dev), group=group)
            start = sum(int(x) for x in sizes[: dist.get_rank(group)])
        s = gather_with_grad(s, group)
        t = gather_with_grad(t, group)
        k = gather_with_grad(keep.to(torch.uint8), group).bool()
    else:
        start = 0
    idx = k.nonzero().squeeze(1)  # kept rows of the (global) batch
    n = idx.numel()
    rows = torch.zeros(k.shape[0], dtype=torch.float32, device=dev)
    if n >= (3 if kind == "angle" else 2):
        sk, tk = s.index_select(0, idx), t.index_select(0, idx)
        if kind == "similarity":
            r = _rows_similarity(sk, tk, float(temperature))
        elif kind == "similarity_mse":
            r = _rows_similarity_mse(sk, tk)
        elif kind == "distance":
            r = _rows_distance(sk, tk)
        else:
            r = _rows_angle(sk, tk)
        rows = rows.index_put((idx,), r)
    else:
        rows = rows + 0.0 * s.sum()  # keeps the graph (and a zero gradient) when nothing is related
    if reduction == "none":
        return rows[start: start + B]
    total = rows.sum()
    return total / n if (reduction == "mean" and n > 0) else total
