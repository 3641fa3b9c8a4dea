"""Exact per-token comparison of a teacher and a student from their final hidden states.

No [N, V] tensor is formed. Rows are taken ``chunk_rows`` at a time and the vocabulary ``vocab_tile``
columns at a time; the largest buffers alive are three fp32 tiles of [chunk_rows, vocab_tile]
(teacher logits, student logits, and the teacher's exponentials), each ≤ 16 MB by default.

Math, for one row with teacher logits t and student logits s (both at temperature 1) over V entries,
lse_t = log Σ_v exp(t_v), lse_s = log Σ_v exp(s_v), p = softmax(t), q = softmax(s):

* forward KL(p‖q) = Σ_v p_v (log p_v − log q_v) = Σ_v p_v (t_v − s_v) − lse_t + lse_s.
  The expectation E_p[t − s] is accumulated online across vocabulary tiles with the same running
  maximum m as the teacher's log-sum-exp:  A ← A·e^{m−m'} + Σ_tile e^{t−m'}(t − s),
  S ← S·e^{m−m'} + Σ_tile e^{t−m'};  E_p[t − s] = A / S.  Exact — no top-k truncation.
* negative log-likelihood of the label y: lse − logit_y, with logit_y = h·W_y (+ b_y) computed from
  the gathered row of W (a [chunk, d] product, not a vocabulary pass).
* top-1 agreement: argmax t == argmax s.  top-5 agreement: argmax t ∈ the student's 5 most probable
  ids. Both from a running top-k merged tile by tile.

Accumulators are float64; the tile GEMMs run in float32 (bf16/fp16 weights are upcast tile by tile).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .._validate import check_tensor, FLOAT_DTYPES, INDEX_DTYPES

# One fp32 [chunk, tile] buffer per model stays at or below this many elements (16 MB).
_TILE_ELEMS = 1 << 22


@dataclass(frozen=True)
class TokenMetrics:
    """Per-row metrics, each a float64 (or bool) tensor of shape [N]."""

    teacher_nll: torch.Tensor  # [N] −log p_teacher(label)
    student_nll: torch.Tensor  # [N] −log q_student(label)
    kl: torch.Tensor           # [N] exact KL(teacher ‖ student) over the full vocabulary
    top1: torch.Tensor         # [N] bool: argmax teacher == argmax student
    topk: torch.Tensor         # [N] bool: argmax teacher ∈ student's top-`top` ids


def _tile_sizes(n: int, v: int, chunk_rows: Optional[int], vocab_tile: Optional[int]):
    tile = v if vocab_tile is None else max(1, min(int(vocab_tile), v))
    if vocab_tile is None and v > 32768:
        tile = 32768
    rows = max(1, _TILE_ELEMS // tile) if chunk_rows is None else max(1, int(chunk_rows))
    return min(rows, max(n, 1)), tile


def _tile_logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], v0: int, v1: int,
                 transform=None) -> torch.Tensor:
    # [c, d] @ [d, v1-v0] -> [c, v1-v0] in float32; transform = the family's (logit_scale, softcap) (issue 12)
    wt = w[v0:v1].to(torch.float32)
    z = h @ wt.t() if b is None else torch.addmm(b[v0:v1].to(torch.float32), h, wt.t())
    if transform is not None and (transform[0] is not None or transform[1] is not None):
        from ..ops.logit_transform import transform_

        transform_(z, 1.0 if transform[0] is None else float(transform[0]), transform[1])
    return z


def _transform_f64(z: torch.Tensor, transform) -> torch.Tensor:
    """The family's (logit_scale, softcap) on float64 label logits (out of place)."""
    if transform is None:
        return z
    s, c = transform
    if s is not None:
        z = z * float(s)
    if c is not None:
        z = float(c) * torch.tanh(z / float(c))
    return z


def _merge_topk(vals: Optional[torch.Tensor], ids: Optional[torch.Tensor], tile: torch.Tensor, v0: int, k: int):
    kk = min(k, tile.shape[1])
    tv, ti = torch.topk(tile, kk, dim=1)  # [c, kk]
    ti = ti + v0
    if vals is None:
        return tv, ti
    cat_v = torch.cat([vals, tv], dim=1)
    cat_i = torch.cat([ids, ti], dim=1)
    kk = min(k, cat_v.shape[1])
    best_v, pos = torch.topk(cat_v, kk, dim=1)
    return best_v, torch.gather(cat_i, 1, pos)


def _check_metric_inputs(teacher_hidden, teacher_weight, student_hidden, student_weight, labels, teacher_bias,
                         student_bias, top) -> int:
    """Validate :func:`token_metrics`' arguments (one-line ValueErrors naming the argument); returns V."""
    check_tensor("teacher_hidden", teacher_hidden, ndim=2, dtypes=FLOAT_DTYPES)
    n = teacher_hidden.shape[0]
    device = teacher_hidden.device
    check_tensor("teacher_weight", teacher_weight, ndim=2, dtypes=FLOAT_DTYPES, shape=(None, teacher_hidden.shape[1]), device=device)
    v = teacher_weight.shape[0]
    check_tensor("student_hidden", student_hidden, ndim=2, dtypes=FLOAT_DTYPES, shape=(n, None), device=device)
    check_tensor("student_weight", student_weight, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    if student_weight.shape[0] != v:
        raise ValueError(
            f"student_weight has {student_weight.shape[0]} vocabulary rows but teacher_weight has {v}: teacher and "
            f"student must share one tokenizer and vocabulary to be compared token by token"
        )
    check_tensor("student_weight", student_weight, shape=(v, student_hidden.shape[1]))
    check_tensor("labels", labels, ndim=1, dtypes=INDEX_DTYPES, shape=(n,), device=device)
    if teacher_bias is not None:
        check_tensor("teacher_bias", teacher_bias, ndim=1, shape=(v,), device=device)
    if student_bias is not None:
        check_tensor("student_bias", student_bias, ndim=1, shape=(v,), device=device)
    if not isinstance(top, int) or top < 1 or top > v:
        raise ValueError(f"top must be an int in [1, {v}], got {top!r}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= v):
        raise ValueError(f"labels must lie in [0, {v}); drop ignored positions before calling token_metrics")
    return v


def _vocab_pass(ht: torch.Tensor, hs: torch.Tensor, teacher, student, v: int, tile: int, top: int):
    """One pass over the vocabulary tiles for a chunk of c rows (``teacher``/``student``: (weight, bias,
    transform)). Returns lse_t [c], lse_s [c], E_p[t − s] [c] (float64), the teacher's argmax [c] and the
    student's ``top`` most probable ids [c, top] — the online recurrences of the module docstring."""
    f64, c, device = torch.float64, ht.shape[0], ht.device
    mt = torch.full((c,), -float("inf"), dtype=f64, device=device)  # running max, teacher
    st = torch.zeros(c, dtype=f64, device=device)                   # Σ e^{t−m}
    at = torch.zeros(c, dtype=f64, device=device)                   # Σ e^{t−m} (t − s)
    ms = torch.full((c,), -float("inf"), dtype=f64, device=device)
    ss = torch.zeros(c, dtype=f64, device=device)
    t_top_v = t_top_i = s_top_v = s_top_i = None
    for v0 in range(0, v, tile):
        v1 = min(v, v0 + tile)
        zt = _tile_logits(ht, teacher[0], teacher[1], v0, v1, teacher[2])  # [c, tile] fp32
        zs = _tile_logits(hs, student[0], student[1], v0, v1, student[2])  # [c, tile] fp32
        t_top_v, t_top_i = _merge_topk(t_top_v, t_top_i, zt, v0, 1)
        s_top_v, s_top_i = _merge_topk(s_top_v, s_top_i, zs, v0, top)

        new_mt = torch.maximum(mt, zt.max(dim=1).values.to(f64))
        scale = torch.exp(mt - new_mt)  # e^{-inf} = 0 on the first tile
        e = torch.exp(zt - new_mt.to(torch.float32)[:, None])  # [c, tile] the third and last buffer
        st = st * scale + e.sum(dim=1, dtype=f64)
        zt.sub_(zs).mul_(e)  # zt now holds e^{t−m} (t − s)
        at = at * scale + zt.sum(dim=1, dtype=f64)
        mt = new_mt
        del e, zt

        new_ms = torch.maximum(ms, zs.max(dim=1).values.to(f64))
        zs.sub_(new_ms.to(torch.float32)[:, None]).exp_()
        ss = ss * torch.exp(ms - new_ms) + zs.sum(dim=1, dtype=f64)
        ms = new_ms
        del zs
    return mt + torch.log(st), ms + torch.log(ss), at / st, t_top_i[:, 0], s_top_i


def _label_logit(h: torch.Tensor, y: torch.Tensor, head) -> torch.Tensor:
    """[c] float64 logit of each row's label: h · W_y (+ b_y), a [c, d] product, then the family's transform."""
    weight, bias, transform = head
    z = (h.to(torch.float64) * weight[y].to(torch.float64)).sum(dim=1)
    if bias is not None:
        z = z + bias[y].to(torch.float64)
    return _transform_f64(z, transform)


@torch.no_grad()
def token_metrics(
    teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
    student_hidden: torch.Tensor, student_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_bias: Optional[torch.Tensor] = None, student_bias: Optional[torch.Tensor] = None,
    top: int = 5,
    chunk_rows: Optional[int] = None,
    vocab_tile: Optional[int] = None,
    teacher_transform=None,
    student_transform=None,
) -> TokenMetrics:
    """Exact teacher/student comparison for N rows (see the module docstring for the math).

    teacher_hidden [N, d_t], teacher_weight [V, d_t], student_hidden [N, d_s], student_weight [V, d_s],
    labels [N] in [0, V) (drop ignored positions before calling). ``teacher_transform`` /
    ``student_transform``: (logit_scale, softcap) of each model's family (trainer/families.logit_transform).
    """
    v = _check_metric_inputs(teacher_hidden, teacher_weight, student_hidden, student_weight, labels,
                             teacher_bias, student_bias, top)
    n, device, f64 = teacher_hidden.shape[0], teacher_hidden.device, torch.float64
    teacher = (teacher_weight, teacher_bias, teacher_transform)
    student = (student_weight, student_bias, student_transform)
    out_t_nll = torch.empty(n, dtype=f64, device=device)
    out_s_nll = torch.empty(n, dtype=f64, device=device)
    out_kl = torch.empty(n, dtype=f64, device=device)
    out_top1 = torch.empty(n, dtype=torch.bool, device=device)
    out_topk = torch.empty(n, dtype=torch.bool, device=device)
    rows, tile = _tile_sizes(n, v, chunk_rows, vocab_tile)

    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        ht = teacher_hidden[r0:r1].to(torch.float32)  # [c, d_t]
        hs = student_hidden[r0:r1].to(torch.float32)  # [c, d_s]
        lse_t, lse_s, e_diff, t_arg, s_top_i = _vocab_pass(ht, hs, teacher, student, v, tile, top)
        y = labels[r0:r1].long()
        out_t_nll[r0:r1] = lse_t - _label_logit(ht, y, teacher)
        out_s_nll[r0:r1] = lse_s - _label_logit(hs, y, student)
        # KL ≥ 0 mathematically; clamp the float round-off of a near-identical pair.
        out_kl[r0:r1] = (e_diff - lse_t + lse_s).clamp_min(0.0)
        out_top1[r0:r1] = s_top_i[:, 0] == t_arg
        out_topk[r0:r1] = (s_top_i == t_arg[:, None]).any(dim=1)
    return TokenMetrics(out_t_nll, out_s_nll, out_kl, out_top1, out_topk)


@torch.no_grad()
def objective_kl(
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    *,
    k: int,
    teacher_bias: Optional[torch.Tensor] = None,
    student_bias: Optional[torch.Tensor] = None,
    backend: str = "auto",
    targets=None,
    teacher_transform=None,
    student_transform=None,
) -> torch.Tensor:
    """Per-row forward KL over the teacher's top-k plus one tail bucket, through the engine's own ops.

    This is what a top-k distillation run optimizes (``de.teacher_targets`` → ``de.fused_distill_loss``
    with ``tail="bucket"``). Merging the tail into one category can only lose information, so it is a
    lower bound of the exact KL from :func:`token_metrics` (the log-sum inequality); the gap between the
    two shows how much of the teacher's distribution the top-k targets leave out. Returns [N] float64.
    ``targets``: the teacher's ``de.teacher_targets`` for these rows, when already computed.
    """
    import distill_engine as de  # the ops sit below eval; imported lazily to keep eval importable alone

    v = teacher_weight.shape[0]
    if not isinstance(k, int) or k < 1 or k > v:
        raise ValueError(f"objective_k must be an int in [1, {v}], got {k!r}")
    if targets is None:
        ts, tc = teacher_transform or (None, None)
        targets = de.teacher_targets(teacher_hidden, teacher_weight, k, bias=teacher_bias, backend=backend,
                                     logit_scale=ts, softcap=tc)
    ss, sc = student_transform or (None, None)
    dtype = student_weight.dtype
    kl = de.fused_distill_loss(
        student_hidden.to(dtype),
        student_weight,
        targets.ids,
        targets.logprobs,
        bias=student_bias,
        divergence="forward_kl",
        tail="bucket",
        reduction="none",
        backend=backend,
        teacher_rest_logprob=getattr(targets, "rest_logprob", None),  # the teacher's exact tail mass (issue 15)
        logit_scale=ss,
        softcap=sc,
    )
    return kl.detach().to(torch.float64)


def engine_ops_available() -> bool:
    """True when the package exports the two ops :func:`objective_kl` needs."""
    try:
        import distill_engine as de

        return callable(de.teacher_targets) and callable(de.fused_distill_loss)
    except (ImportError, AttributeError):  # an op not built into this checkout
        return False
