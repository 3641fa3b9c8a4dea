"""PyTorch implementations for the core op.

* The ``torch`` backend of ``fused_distill_loss``: the two vocabulary-wide passes of the backend
  contract (docs/ARCHITECTURE.md) written with plain torch ops on one row chunk at a time, so memory
  stays bounded by one fp32 [chunk, V] buffer.
* ``dense_distill_loss``: the float64 dense oracle used by the tests. It builds the full [N, V]
  logits and lets autograd differentiate the definitions directly, so it shares no gradient algebra
  with the fused paths.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

# Floors shared with ops/distill_loss.py (see docs/ARCHITECTURE.md).
LOG_FLOOR = -100.0
TAIL_FLOOR = 2.0**-23


# ----------------------------------------------------------------------------------------------
# torch backend: the chunk-level contract
# ----------------------------------------------------------------------------------------------
def logits_lse(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], temperature: float,
               need_lse1: bool, store: bool = True):
    """Raw logits of a row chunk and their log-sum-exps.

    Returns ``(buf [c, V] fp32, lse_T [c], lse_1 [c] | None)`` with lse_T = logsumexp(l / T).
    """
    h32 = h.float()
    w32 = weight.float()
    if bias is not None:
        buf = torch.addmm(bias.float(), h32, w32.t())  # [c, V]
    else:
        buf = h32 @ w32.t()  # [c, V]
    lse_1 = torch.logsumexp(buf, dim=1) if need_lse1 else None
    lse_T = torch.logsumexp(buf / temperature, dim=1) if temperature != 1.0 else (
        lse_1 if lse_1 is not None else torch.logsumexp(buf, dim=1))
    return buf, lse_T, lse_1


def dense_grad(buf: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               temperature: float, lse_T: torch.Tensor, lse_1: Optional[torch.Tensor], s_q: torch.Tensor,
               s_1: Optional[torch.Tensor], dW_acc: torch.Tensor, db_acc: Optional[torch.Tensor],
               sparse_ids: Optional[torch.Tensor] = None, sparse_coef: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Turn the chunk's logits buffer into dL/dl in place and apply the three gradient products.

    g = s_q · exp(l/T − lse_T) + s_1 · exp(l − lse_1) (+ sparse_coef scattered at sparse_ids);
    returns dH = g W [c, d] fp32 and accumulates dW_acc += gᵀ h, db_acc += Σ_rows g.
    """
    g = buf
    if s_1 is not None:
        q1 = torch.exp(buf - lse_1[:, None])  # [c, V]: CE's softmax at T = 1, taken before buf is overwritten
    g.div_(temperature).sub_(lse_T[:, None]).exp_().mul_(s_q[:, None])
    if s_1 is not None:
        g.add_(q1.mul_(s_1[:, None]))
        del q1
    if sparse_ids is not None:
        g.scatter_add_(1, sparse_ids, sparse_coef)
    w32 = weight.float()
    dH = g @ w32  # [c, d]
    dW_acc.addmm_(g.t(), h.float())
    if db_acc is not None:
        db_acc.add_(g.sum(0))
    return dH


# ----------------------------------------------------------------------------------------------
# float64 dense oracle (tests only: materialises [N, V])
# ----------------------------------------------------------------------------------------------
def _xlogy_safe(x: torch.Tensor, log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """x·(log x − log y) with 0·anything = 0."""
    return torch.where(x > 0, x * (log_x - log_y), torch.zeros_like(x))


def dense_distill_loss(hidden, weight, teacher_ids, teacher_logprobs, *, labels=None, bias=None,
                       divergence="forward_kl", beta=0.5, temperature=1.0, ce_weight=0.0, tail="bucket",
                       ignore_index=-100, reduction="mean") -> torch.Tensor:
    """The definitions of issue 2, on full float64 logits; differentiate with autograd."""
    h = hidden.double()
    w = weight.double()
    logits = h @ w.t()  # [N, V]
    if bias is not None:
        logits = logits + bias.double()
    N, V = logits.shape
    logq = torch.log_softmax(logits / temperature, dim=1)  # [N, V]
    ids = teacher_ids.long()
    slot = ids >= 0  # [N, k]
    safe = ids.clamp(min=0)
    lp = torch.where(slot, teacher_logprobs.double(), torch.full_like(teacher_logprobs, float("-inf"), dtype=torch.float64))
    logq_S = logq.gather(1, safe)  # [N, k]
    q_S = torch.where(slot, logq_S.exp(), torch.zeros_like(logq_S))
    q_rest = (1 - q_S.sum(1)).clamp(min=0)  # [N]
    has = slot.any(1)

    if tail == "renormalize":
        lse_p = torch.logsumexp(lp, dim=1, keepdim=True)
        lp_n = torch.where(slot & has[:, None], lp - lse_p, torch.full_like(lp, float("-inf")))
        p_S = lp_n.exp()
        p_rest = torch.zeros_like(q_rest)
        lp_use = lp_n
    else:
        p_S = lp.exp()
        p_rest = (1 - p_S.sum(1)).clamp(min=0)
        lp_use = lp
    logp_S = lp_use.clamp(min=LOG_FLOOR)
    logp_rest = torch.log(p_rest.clamp(min=TAIL_FLOOR))
    logq_rest = torch.log(q_rest.clamp(min=TAIL_FLOOR))

    if divergence == "forward_kl":
        if tail == "renormalize":
            # Σ_S p̂ (log p̂ − log q) over the full vocabulary: the dense form of the definition.
            dense_p = torch.zeros_like(logits).scatter_add(1, safe, torch.where(slot, p_S, torch.zeros_like(p_S)))
            dense_logp = torch.log(dense_p.clamp(min=1e-300))
            div = _xlogy_safe(dense_p, dense_logp, logq).sum(1)
        else:
            div = _xlogy_safe(p_S, logp_S, logq_S).sum(1) + _xlogy_safe(p_rest, logp_rest, logq_rest)
    elif divergence == "reverse_kl":
        div = _xlogy_safe(q_S, logq_S, logp_S).sum(1) + _xlogy_safe(q_rest, logq_rest, logp_rest)
    elif divergence == "jsd":
        if tail == "renormalize":
            # exact JSD between p̂ (zero outside S) and the full Q, summed over every vocabulary entry
            dense_p = torch.zeros_like(logits).scatter_add(1, safe, torch.where(slot, p_S, torch.zeros_like(p_S)))
            q = logq.exp()
            m = beta * dense_p + (1 - beta) * q
            logm = torch.log(m.clamp(min=1e-300))
            div = beta * _xlogy_safe(dense_p, torch.log(dense_p.clamp(min=1e-300)), logm).sum(1) \
                + (1 - beta) * _xlogy_safe(q, logq, logm).sum(1)
        else:
            m_S = beta * p_S + (1 - beta) * q_S
            m_rest = beta * p_rest + (1 - beta) * q_rest
            logm_S = torch.log(m_S.clamp(min=1e-300))
            logm_rest = torch.log(m_rest.clamp(min=1e-300))
            div = beta * (_xlogy_safe(p_S, logp_S, logm_S).sum(1) + _xlogy_safe(p_rest, logp_rest, logm_rest)) \
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
