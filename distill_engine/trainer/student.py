"""The module DeepSpeed trains: the student's base model, the fused loss on its lm_head weight, and the
optional feature-distillation projections.

The student's forward stops at its final hidden states (``model.base_model``); its lm_head is never called,
so no [tokens × vocab] logits tensor exists. :class:`FusedHeadLoss` hands the lm_head *weight* to
``fused_distill_loss``.

ZeRO-3. The lm_head weight is partitioned across ranks and gathered only inside the forward of a module
that owns it. Because the weight is used outside the lm_head's own forward, it is registered as an
*external parameter* of :class:`FusedHeadLoss` (``deepspeed.zero.register_external_parameter``): DeepSpeed
then gathers it in this module's pre-forward hook, keeps it gathered until the module's output is done, and
gathers it again in this module's pre-backward hook — so when the loss's backward hands back dW, the
parameter has its full shape and ZeRO-3's gradient hook reduce-scatters dW into the owning partitions like
any other gradient. (``GatheredParameters(modifier_rank=None)`` would give the forward the weight, but the
gradient would land on a temporary full tensor that ZeRO never reduces.) A tied lm_head (the input
embedding) works the same way; the two gradient contributions are summed by autograd before ZeRO sees them.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from ..teacher.colocated import base_model_of, lm_head_of


class FusedHeadLoss(nn.Module):
    """Σ over rows of the fused distillation loss, with the lm_head weight of ``lm_head`` (held by reference,
    not as a child, so the student's state dict is unchanged)."""

    def __init__(self, lm_head: nn.Module, *, divergence: str, beta: float, temperature: float, ce_weight: float,
                 tail: str, backend: str, zero3: bool):
        super().__init__()
        object.__setattr__(self, "_lm_head", lm_head)
        self.opts = dict(divergence=divergence, beta=beta, temperature=temperature, tail=tail, backend=backend)
        self.ce_weight = ce_weight
        if zero3:
            import deepspeed

            deepspeed.zero.register_external_parameter(self, lm_head.weight)
            if getattr(lm_head, "bias", None) is not None:
                deepspeed.zero.register_external_parameter(self, lm_head.bias)

    def forward(self, h: torch.Tensor, ids: torch.Tensor, lps: torch.Tensor, labels: torch.Tensor,
                validate: bool, measure_divergence: bool, rest: Optional[torch.Tensor] = None):
        from ..ops.distill_loss import fused_distill_loss

        w = self._lm_head.weight
        b = getattr(self._lm_head, "bias", None)
        dev = h.device.type
        if torch.is_autocast_enabled(dev):  # torch engine, bf16: fp32 master weights, low-precision compute
            h = h.to(torch.get_autocast_dtype(dev))
        if w.dtype != h.dtype:
            w = w.to(h.dtype)
            b = None if b is None else b.to(h.dtype)
        with torch.autocast(dev, enabled=False):  # the op picks its own precisions; inputs are cast above
            loss = fused_distill_loss(h, w, ids, lps, labels=labels, bias=b, ce_weight=self.ce_weight,
                                      reduction="sum", validate=validate, teacher_rest_logprob=rest, **self.opts)
        div = None
        if measure_divergence:
            if self.ce_weight == 0.0:
                div = loss.detach() / (self.opts["temperature"] ** 2)
            elif self.ce_weight < 1.0:
                with torch.no_grad(), torch.autocast(dev, enabled=False):  # an extra pass, on logged steps only
                    div = fused_distill_loss(h.detach(), w.detach(), ids, lps, labels=labels,
                                             bias=None if b is None else b.detach(), ce_weight=0.0,
                                             reduction="sum", validate=False, teacher_rest_logprob=rest,
                                             **self.opts)
                    div = div / (self.opts["temperature"] ** 2)
        return loss, div


class DistillStudent(nn.Module):
    """forward(...) → (loss to backpropagate, [3] detached sums: distillation loss, divergence, feature loss;
    [4] with the relation loss of the micro-batch appended when ``relation`` is set)."""

    def __init__(self, student: nn.Module, head: FusedHeadLoss, features: Optional[nn.Module] = None,
                 feature_weight: float = 1.0, relation: Optional[nn.Module] = None):
        super().__init__()
        self.student = student
        self.head = head
        self.features = features
        self.feature_weight = feature_weight
        self.relation = relation  # trainer.relation.RelationTerm (loss.relation, issue 16)
        lm = lm_head_of(student)
        self.untied = lm.weight is not student.get_input_embeddings().weight

    def student_feature_layers(self) -> List[int]:
        return sorted({s for s, _ in self.features.layer_pairs}) if self.features is not None else []

    def forward(self, input_ids, attention_mask, valid_index, labels, teacher_ids, teacher_logprobs,
                teacher_hidden: Optional[Sequence[torch.Tensor]] = None, scale: float = 1.0,
                validate: bool = False, measure_divergence: bool = False,
                teacher_rest_logprob: Optional[torch.Tensor] = None, teacher_relation=None,
                relation_scale: float = 1.0):
        def call():
            return base_model_of(self.student)(input_ids=input_ids, attention_mask=attention_mask,
                                               output_hidden_states=self.features is not None, use_cache=False,
                                               return_dict=True)
        store = None
        if self.relation is not None:
            out, store = self.relation.run(self.student, call)  # Q/K/V hooks around the forward (kind: token)
        else:
            out = call()
        hs = out.last_hidden_state  # [B, L, d]
        d = hs.shape[-1]
        h = hs[:, :-1].reshape(-1, d).index_select(0, valid_index)  # [n, d] loss rows only
        loss, div = self.head(h, teacher_ids, teacher_logprobs, labels, validate, measure_divergence,
                              teacher_rest_logprob)
        total = loss
        feat = None
        if self.features is not None:
            n = h.shape[0]
            L_s, L_t = self.features.student_layers, self.features.teacher_layers
            s_states: List[Optional[torch.Tensor]] = [None] * (L_s + 1)
            for s in self.student_feature_layers():
                s_states[s + 1] = out.hidden_states[s + 1][:, :-1].reshape(-1, d).index_select(0, valid_index)
            t_states: List[Optional[torch.Tensor]] = [None] * (L_t + 1)
            for t, x in zip(sorted({t for _, t in self.features.layer_pairs}), teacher_hidden):
                t_states[t + 1] = x
            if n > 0:
                with torch.autocast(hs.device.type, enabled=False):  # projections run in their own dtype
                    feat = self.features(tuple(s_states), tuple(t_states)) * n  # mean over rows → sum over rows
                total = total + self.feature_weight * feat
        stats = [loss.detach().float(),
                 (div if div is not None else torch.zeros((), device=loss.device)).float(),
                 (feat.detach() if feat is not None else torch.zeros((), device=loss.device)).float()]
        total = total * scale
        if self.relation is not None:
            # a per-micro-batch mean: relation_scale (1/grad_accum) averages it over the step's micro-batches
            rel = self.relation(hs, attention_mask, store, teacher_relation)
            total = total + (self.relation.weight * relation_scale) * rel
            stats.append(rel.detach().float())
        return total, torch.stack(stats)
