"""PyTorch implementations for the core op.

* The ``torch`` backend of ``fused_distill_loss``: the two vocabulary-wide passes of the backend
  contract (docs/ARCHITECTURE.md) written with plain torch ops on one row chunk at a time, so memory
  stays bounded by one fp32 [chunk, V] buffer.
* ``dense_distill_loss``: the float64 dense oracle used by the tests. It builds the full [N, V]
  logits and lets autograd differentiate the definitions directly, so it shares no gradient algebra
  with the fused paths.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

# The one floor shared with ops/distill_loss.py (docs/ARCHITECTURE.md, "The exact tail bucket"): reverse KL
# floors the TEACHER's log-probabilities (slots and rest) at LOG_FLOOR, so a category the teacher gives
# (near-)zero mass costs a large finite penalty instead of +inf. Nothing else is floored: the student's
# log q (slots and rest) is exact in log space at every confidence, and forward KL / JSD use the exact
# teacher log-probabilities (their p·log p terms vanish smoothly as p -> 0).
LOG_FLOOR = -100.0


# ----------------------------------------------------------------------------------------------
# torch backend: the chunk-level contract
# ----------------------------------------------------------------------------------------------
def logits_lse(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], temperature: float,
               need_lse1: bool, store: bool = True, _lse: bool = True):
    """Raw logits of a row chunk and their log-sum-exps.

    Returns ``(buf [c, V] fp32, lse_T [c], lse_1 [c] | None)`` with lse_T = logsumexp(l / T).
    """
    h32 = h.float()
    w32 = weight.float()
    if bias is not None:
        buf = torch.addmm(bias.float(), h32, w32.t())  # [c, V]
    else:
        buf = h32 @ w32.t()  # [c, V]
    if not _lse:
        return buf, None, None
    lse_1 = torch.logsumexp(buf, dim=1) if need_lse1 else None
    lse_T = torch.logsumexp(buf / temperature, dim=1) if temperature != 1.0 else (
        lse_1 if lse_1 is not None else torch.logsumexp(buf, dim=1))
    return buf, lse_T, lse_1


# The chunk driver calls logits_lse_excluding instead of logits_lse + buf_lse (no extra pass over the buffer).
fused_rest = True


def logits_lse_excluding(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], temperature: float,
                         need_lse1: bool, exclude_ids: torch.Tensor):
    """Like logits_lse, but both log-sum-exps leave each row's ``exclude_ids`` [c, m] out (the student's rest
    mass, issue 15): the ids are set to -inf for the one log-sum-exp pass and restored, so ``buf`` still holds
    every logit. A row's ids are either all >= 0 (repeats allowed) or all -1 (exclude nothing).
    """
    buf, _, _ = logits_lse(h, weight, bias, temperature, False, store=True, _lse=False)
    ok = exclude_ids >= 0
    has = ok.any(1, keepdim=True)  # [c, 1]
    first = exclude_ids.gather(1, ok.to(torch.uint8).argmax(1, keepdim=True))
    mids = torch.where(ok, exclude_ids, first).clamp(min=0).long()  # [c, m]
    old = buf.gather(1, mids)
    buf.scatter_(1, mids, torch.where(has, torch.full((), float("-inf"), device=buf.device), old))
    rest_1 = torch.logsumexp(buf, dim=1) if need_lse1 else None
    rest_T = torch.logsumexp(buf / temperature, dim=1) if temperature != 1.0 else (
        rest_1 if rest_1 is not None else torch.logsumexp(buf, dim=1))
    buf.scatter_(1, mids, old)
    return buf, rest_T, rest_1


def buf_lse(buf: torch.Tensor, temperature: float) -> torch.Tensor:
    """logsumexp(buf / T) per row [c] fp32; entries of -inf (masked) count as zero mass, an all -inf row gives -inf."""
    return torch.logsumexp(buf / temperature if temperature != 1.0 else buf, dim=1)


def dense_grad(buf: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               temperature: float, lse_T: torch.Tensor, lse_1: Optional[torch.Tensor], s_q: torch.Tensor,
               s_1: Optional[torch.Tensor], dW_acc: torch.Tensor, db_acc: Optional[torch.Tensor],
               sparse_ids: Optional[torch.Tensor] = None, sparse_coef: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Turn the chunk's logits buffer into dL/dl in place and apply the three gradient products.

    g = s_q · exp(l/T − lse_T) + s_1 · exp(l − lse_1) (+ sparse_coef scattered at sparse_ids);
    returns dH = g W [c, d] fp32 and accumulates dW_acc += gᵀ h, db_acc += Σ_rows g.
    """
    g = dense_coef_(buf, temperature, lse_T, lse_1, s_q, s_1)
    if sparse_ids is not None:
        g.scatter_add_(1, sparse_ids, sparse_coef)
    return grad_products(g, h, weight, dW_acc, db_acc)


def dense_coef_(buf: torch.Tensor, temperature: float, lse_T: torch.Tensor, lse_1: Optional[torch.Tensor],
                s_q: torch.Tensor, s_1: Optional[torch.Tensor]) -> torch.Tensor:
    """g = s_q · exp(l/T − lse_T) + s_1 · exp(l − lse_1), in place in the fp32 logits buffer [c, V] (returned)."""
    g = buf
    if s_1 is not None:
        q1 = torch.exp(buf - lse_1[:, None])  # [c, V]: CE's softmax at T = 1, taken before buf is overwritten
    g.div_(temperature).sub_(lse_T[:, None]).exp_().mul_(s_q[:, None])
    if s_1 is not None:
        g.add_(q1.mul_(s_1[:, None]))
        del q1
    return g


def grad_products(g: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, dW_acc: torch.Tensor,
                  db_acc: Optional[torch.Tensor]) -> torch.Tensor:
    """The three gradient products of a chunk's dL/dl g [c, V] fp32: returns dH = g W [c, d] fp32 and
    accumulates dW_acc += gᵀ h, db_acc += Σ_rows g."""
    dH = g @ weight.float()  # [c, d]
    dW_acc.addmm_(g.t(), h.float())
    if db_acc is not None:
        db_acc.add_(g.sum(0))
    return dH


# ----------------------------------------------------------------------------------------------
# float64 dense oracle (tests only: materialises [N, V])
# ----------------------------------------------------------------------------------------------
def _xlogy_safe(x: torch.Tensor, log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """x·(log x − log y) with 0·anything = 0 (and no NaN gradient through the unused branch)."""
    pos = x > 0
    zero = torch.zeros_like(x)
    return torch.where(pos, x * (torch.where(pos, log_x, zero) - torch.where(pos, log_y, zero)), zero)


def teacher_rest_from_slots(lp: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ_S p) computed stably in float64 from the slot log-probs ([N, k] -> [N]); -inf when Σ ≥ 1.

    The fallback when the teacher's exact rest mass is unknown: log(−expm1(logsumexp(lp))), exact for the
    given log-probs (it cannot recover a rest mass below the rounding of the log-probs themselves).
    """
    lpd = torch.where(slot, lp.double(), torch.full((), float("-inf"), dtype=torch.float64, device=lp.device))
    s = torch.logsumexp(lpd, dim=1)  # [N] log Σ_S p (−inf for an empty row)
    neg = s < 0
    return torch.where(neg, torch.log(-torch.expm1(torch.where(neg, s, torch.full_like(s, -1.0)))),
                       torch.full_like(s, float("-inf")))


def dense_distill_loss(hidden, weight, teacher_ids, teacher_logprobs, *, labels=None, bias=None,
                       divergence="forward_kl", beta=0.5, temperature=1.0, ce_weight=0.0, tail="bucket",
                       ignore_index=-100, reduction="mean", teacher_rest_logprob=None, logit_scale=None,
                       softcap=None) -> torch.Tensor:
    """The definitions of issue 2, on full float64 logits, entirely in log space; differentiate with autograd.

    log q_rest = logsumexp over the vocabulary minus the row's (unique, non-empty) teacher ids − the row's
    logsumexp, so the rest category is exact at every confidence (issue 15). log p_rest is
    ``teacher_rest_logprob`` when given, else log(1 − Σ_S p) (see teacher_rest_from_slots).
    """
    h = hidden.double()
    w = weight.double()
    logits = h @ w.t()  # [N, V]
    if bias is not None:
        logits = logits + bias.double()
    if logit_scale is not None:  # issue 12: z = s·l, soft-capped to c·tanh(z/c); the loss runs on z
        logits = logits * float(logit_scale)
    if softcap is not None:
        logits = float(softcap) * torch.tanh(logits / float(softcap))
    N, V = logits.shape
    z = logits / temperature
    lse = torch.logsumexp(z, dim=1)  # [N]
    logq = z - lse[:, None]  # [N, V]
    ids = teacher_ids.long()
    slot = ids >= 0  # [N, k]
    safe = ids.clamp(min=0)
    ninf = float("-inf")
    # [N, V] membership; scatter_add so that empty slots (pointing at column 0) never overwrite a real id 0
    in_S = torch.zeros(N, V, dtype=torch.int32, device=logits.device).scatter_add(1, safe, slot.int()) > 0
    rest_empty = in_S.all(1)
    # [N] log q_rest; rows whose S covers V have no rest category (q_rest = p_rest = 0): a finite stand-in
    # there keeps autograd free of −inf − −inf, and every rest term below vanishes through _xlogy_safe
    logq_rest = torch.logsumexp(z.masked_fill(in_S & ~rest_empty[:, None], ninf), dim=1) - lse
    logq_rest = torch.where(rest_empty, torch.zeros_like(logq_rest), logq_rest)
    lp = torch.where(slot, teacher_logprobs.double(), torch.full_like(teacher_logprobs, ninf, dtype=torch.float64))
    logq_S = torch.where(slot, logq.gather(1, safe), torch.full_like(lp, ninf))
    q_S = logq_S.exp()
    q_rest = torch.where(rest_empty, torch.zeros_like(logq_rest), logq_rest.exp())
    has = slot.any(1)

    if tail == "renormalize":
        lse_p = torch.logsumexp(lp, dim=1, keepdim=True)
        lp = torch.where(slot & has[:, None], lp - torch.where(has[:, None], lse_p, torch.zeros_like(lse_p)),
                         torch.full_like(lp, ninf))
        logp_rest = torch.full_like(logq_rest, ninf)
    elif teacher_rest_logprob is not None:
        logp_rest = teacher_rest_logprob.double()
    else:
        logp_rest = teacher_rest_from_slots(lp, slot)
    logp_rest = torch.where(rest_empty, torch.full_like(logp_rest, ninf), logp_rest)
    p_S = lp.exp()
    p_rest = logp_rest.exp()

    if divergence == "forward_kl":
        div = _xlogy_safe(p_S, lp, logq_S).sum(1) + _xlogy_safe(p_rest, logp_rest, logq_rest)
    elif divergence == "reverse_kl":
        div = _xlogy_safe(q_S, logq_S, lp.clamp(min=LOG_FLOOR)).sum(1) \
            + _xlogy_safe(q_rest, logq_rest, logp_rest.clamp(min=LOG_FLOOR))
    elif divergence == "jsd":
        lb, l1b = math.log(beta), math.log1p(-beta)
        if tail == "renormalize":
            # exact JSD between p̂ (zero outside S) and the full Q, summed over every vocabulary entry
            dense_p = torch.zeros_like(logits).scatter_add(1, safe, torch.where(slot, lp.exp(), torch.zeros_like(lp)))
            dense_lp = torch.log(dense_p)  # [N, V], −inf outside S
            logm = torch.logaddexp(lb + dense_lp, l1b + logq)
            div = beta * _xlogy_safe(dense_lp.exp(), dense_lp, logm).sum(1) \
                + (1 - beta) * _xlogy_safe(logq.exp(), logq, logm).sum(1)
        else:
            logm_S = torch.logaddexp(lb + lp, l1b + logq_S)
            logm_rest = torch.logaddexp(lb + logp_rest, l1b + logq_rest)
            div = beta * (_xlogy_safe(p_S, lp, logm_S).sum(1) + _xlogy_safe(p_rest, logp_rest, logm_rest)) \
                + (1 - beta) * (_xlogy_safe(q_S, logq_S, logm_S).sum(1) + _xlogy_safe(q_rest, logq_rest, logm_rest))
    else:
        raise ValueError(divergence)
    div = torch.where(has, div, torch.zeros_like(div))

    row = (1 - ce_weight) * temperature**2 * div
    if labels is not None:
        valid = labels != ignore_index
        if ce_weight > 0:
            ce = torch.logsumexp(logits, 1) - logits.gather(1, labels.clamp(min=0).long()[:, None]).squeeze(1)
            row = row + ce_weight * ce
        row = torch.where(valid, row, torch.zeros_like(row))
        n_valid = int(valid.sum())
    else:
        n_valid = N
    if reduction == "none":
        return row
    if reduction == "sum":
        return row.sum()
    return row.sum() / max(n_valid, 1)


def dense_reference_grads(hidden, weight, teacher_ids, teacher_logprobs, *, bias=None, **kw
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(loss, dH, dW, db) in float64; for reduction='none' the gradient is of the sum of rows."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    b = bias.detach().double().requires_grad_(True) if bias is not None else None
    loss = dense_distill_loss(h, w, teacher_ids, teacher_logprobs, bias=b, **kw)
    loss.sum().backward()
    return loss.detach(), h.grad, w.grad, (b.grad if b is not None else None)
