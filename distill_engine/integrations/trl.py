"""Fused loss for TRL's GKD trainer (requires trl; tested against trl 1.16).

TRL's hook: ``GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature,
reduction, num_items_in_batch)`` is a dense [B, L, V] loss, called from ``GKDTrainer.compute_loss`` on the full
logits of both models. :func:`fused_generalized_jsd_loss` is the same objective from *hidden states* and lm_head
weights (the teacher's distribution from :func:`teacher_targets`, the student's through
:func:`fused_distill_loss`), and :class:`FusedGKDTrainer` is a ``GKDTrainer`` whose ``compute_loss`` uses it, so
neither model forms its [tokens × vocab] logits.

Definitions (identical to TRL's at ``k = V``):
  beta = 0 → KL(P‖Q) (forward), beta = 1 → KL(Q‖P) (reverse), else β·KL(P‖M) + (1−β)·KL(Q‖M) with
  M = β·P + (1−β)·Q; P the teacher, Q the student, both softmax(logits / temperature).
Differences, documented: (1) TRL does not scale by T²; this module divides the engine's T²-scaled divergence by T²
so the two agree at every temperature. (2) With ``k < V`` the teacher is truncated to its top-k plus one "rest"
bucket (``tail="bucket"``) or renormalized over its top-k (``tail="renormalize"``); TRL always uses all V.
(3) Reduction follows TRL's ``batchmean`` (mean over labelled positions) or Σ / ``num_items_in_batch``.
``FusedGKDTrainer`` runs the base models directly, so it does not support DeepSpeed ZeRO-3 (use
:class:`distill_engine.integrations.hf.FusedDistillationTrainer` there).
"""
from __future__ import annotations

from typing import Optional

import torch
from trl.experimental.gkd import GKDTrainer

from ..ops.distill_loss import fused_distill_loss
from ..ops.teacher_targets import teacher_targets
from ..teacher.colocated import base_model_of, lm_head_of

__all__ = ["fused_generalized_jsd_loss", "FusedGKDTrainer"]


def _divergence(beta: float):
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta}")
    if beta == 0.0:
        return "forward_kl", 0.5
    if beta == 1.0:
        return "reverse_kl", 0.5
    return "jsd", beta


def fused_generalized_jsd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                               teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                               labels: Optional[torch.Tensor] = None, *, beta: float = 0.5,
                               temperature: float = 1.0, k: Optional[int] = None, tail: str = "bucket",
                               num_items_in_batch=None, student_bias: Optional[torch.Tensor] = None,
                               teacher_bias: Optional[torch.Tensor] = None, backend: str = "auto",
                               validate: bool = False) -> torch.Tensor:
    """TRL's generalized JSD (``reduction="batchmean"``) from hidden states, never forming [B·L, V].

    student_hidden [B, L, d_s] and teacher_hidden [B, L, d_t] are already aligned with ``labels`` [B, L]
    (shifted as in ``GKDTrainer.compute_loss``); label -100 = no loss. k: teacher slots (default V: exact).
    """
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
                         f"{tuple(teacher_hidden.shape)} must agree in every dim but the last")
    V = teacher_weight.shape[0]
    k = V if k is None else k
    divergence, b = _divergence(beta)
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])  # [B·L, d_s]
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])  # [B·L, d_t]
    if labels is not None:
        keep = (labels.reshape(-1) != -100).nonzero().squeeze(1)  # [n] labelled positions only
        h_s, h_t = h_s.index_select(0, keep), h_t.index_select(0, keep)
    tt = teacher_targets(h_t.detach(), teacher_weight.detach(), k, bias=teacher_bias, temperature=temperature,
                         backend=backend, validate=validate)
    total = fused_distill_loss(h_s, student_weight, tt.ids, tt.logprobs, bias=student_bias, divergence=divergence,
                               beta=b, temperature=temperature, tail=tail, reduction="sum", backend=backend,
                               validate=validate, teacher_rest_logprob=tt.rest_logprob
                               ) / (temperature * temperature)  # TRL has no T² factor
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / max(int(h_s.shape[0]), 1)


class FusedGKDTrainer(GKDTrainer):
    """``trl.experimental.gkd.GKDTrainer`` with the fused loss in ``compute_loss`` (same batch keys, same
    objective). Extra keyword arguments: k (teacher slots, default V: exact), tail, backend."""

    def __init__(self, *args, k: Optional[int] = None, tail: str = "bucket", backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise ValueError("FusedGKDTrainer does not support DeepSpeed ZeRO-3; use "
                             "distill_engine.integrations.hf.FusedDistillationTrainer for ZeRO-3 training")
        self.k, self.tail, self.backend = k, tail, backend

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student = self.accelerator.unwrap_model(model)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        kw = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
                  return_dict=True)
        hs = base_model_of(student)(**kw).last_hidden_state  # [B, L, d_s]
        teacher.eval()
        with torch.no_grad():
            ht = base_model_of(teacher)(**kw).last_hidden_state  # [B, L, d_t]
        s_head, t_head = lm_head_of(student), lm_head_of(teacher)
        # GKDTrainer.compute_loss calls generalized_jsd_loss at its default temperature (1.0); so does this
        loss = fused_generalized_jsd_loss(hs[:, :-1], s_head.weight, ht[:, :-1], t_head.weight,
                                          inputs["labels"][:, 1:], beta=self.beta, k=self.k, tail=self.tail,
                                          num_items_in_batch=num_items_in_batch,
                                          student_bias=getattr(s_head, "bias", None),
                                          teacher_bias=getattr(t_head, "bias", None), backend=self.backend)
        return (loss, None) if return_outputs else loss
