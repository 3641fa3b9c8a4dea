"""nn.Module faces of the ops: options go to the constructor (validated there, as the ops' option dataclasses),
tensors to ``forward``; each forward calls the op's public function."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .ops.distill_loss import DistillOptions, fused_distill_loss


class FusedDistillLoss(nn.Module):
    """Module form of :func:`distill_engine.fused_distill_loss`; options go to the constructor.

    forward(hidden [N, d], weight [V, d], teacher_ids [N, k], teacher_logprobs [N, k], labels=None, bias=None,
            teacher_rest_logprob=None)
    """

    def __init__(self, *, divergence: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                 ce_weight: float = 0.0, tail: str = "bucket", ignore_index: int = -100, reduction: str = "mean",
                 backend: str = "auto", validate: bool = True, chunk_rows: Optional[int] = None,
                 logit_scale: Optional[float] = None, softcap: Optional[float] = None):
        super().__init__()
        self.options = DistillOptions(divergence=divergence, beta=beta, temperature=temperature, ce_weight=ce_weight,
                                      tail=tail, ignore_index=ignore_index, reduction=reduction, backend=backend,
                                      validate=validate, chunk_rows=chunk_rows, logit_scale=logit_scale,
                                      softcap=softcap)
        from .ops.logit_transform import check_transform

        check_transform(logit_scale, softcap)  # fail at construction, not at the first batch

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, teacher_ids: torch.Tensor,
                teacher_logprobs: torch.Tensor, labels: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None,
                teacher_rest_logprob: Optional[torch.Tensor] = None) -> torch.Tensor:
        o = self.options
        return fused_distill_loss(hidden, weight, teacher_ids, teacher_logprobs, labels=labels, bias=bias,
                                  teacher_rest_logprob=teacher_rest_logprob,
                                  divergence=o.divergence, beta=o.beta, temperature=o.temperature,
                                  ce_weight=o.ce_weight, tail=o.tail, ignore_index=o.ignore_index,
                                  reduction=o.reduction, backend=o.backend, validate=o.validate,
                                  chunk_rows=o.chunk_rows, logit_scale=o.logit_scale, softcap=o.softcap)

    def extra_repr(self) -> str:
        o = self.options
        return f"divergence={o.divergence!r}, tail={o.tail!r}, temperature={o.temperature}, ce_weight={o.ce_weight}"


class FusedProjectionLoss(nn.Module):
    """One feature-distillation pair: a learned projection ``nn.Linear(d_s, d_t)`` of student states matched to
    teacher states by :func:`distill_engine.fused_projection_loss` (P·h is never materialised).
    (:class:`distill_engine.HiddenStateDistiller` maps many layer pairs; this is the single-pair Module.)

    forward(student_hidden [..., d_s], teacher_hidden [..., d_t], mask=None [...]) → loss
    """

    def __init__(self, student_dim: int, teacher_dim: int, *, bias: bool = True, kind: str = "mse",
                 reduction: str = "mean", backend: str = "auto", device=None, dtype=None):
        super().__init__()
        from ._validate import check_positive_int
        from .ops.projection_loss import ProjectionLossOptions

        check_positive_int("student_dim", student_dim)
        check_positive_int("teacher_dim", teacher_dim)
        self.options = ProjectionLossOptions(kind=kind, reduction=reduction, backend=backend)
        self.proj = nn.Linear(student_dim, teacher_dim, bias=bias, device=device, dtype=dtype)
        self.kind, self.reduction, self.backend = kind, reduction, backend

    def forward(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        from .ops.projection_loss import fused_projection_loss

        return fused_projection_loss(student_hidden, self.proj.weight, teacher_hidden, proj_bias=self.proj.bias,
                                     kind=self.kind, mask=mask, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, reduction={self.reduction!r}"


class TeacherTargetExtractor(nn.Module):
    """Module form of :func:`distill_engine.teacher_targets` (no parameters; options go to the constructor).

    forward(hidden [N, d_t], weight [V, d_t], bias=None, generator=None) → TeacherTargets (ids, logprobs [N, k])
    """

    def __init__(self, k: int = 64, *, temperature: float = 1.0, method: str = "topk", backend: str = "auto",
                 validate: bool = True, chunk_rows: Optional[int] = None):
        super().__init__()
        from .ops.teacher_targets import TeacherTargetsOptions

        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        # option checks at construction; k <= V is checked against the weight per call
        self.options = TeacherTargetsOptions(k=k, temperature=temperature, method=method, backend=backend,
                                             chunk_rows=chunk_rows, validate=validate)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None):
        from .ops.teacher_targets import teacher_targets

        o = self.options
        return teacher_targets(hidden, weight, o.k, bias=bias, temperature=o.temperature, method=o.method,
                               generator=generator, backend=o.backend, chunk_rows=o.chunk_rows, validate=o.validate)

    def extra_repr(self) -> str:
        o = self.options
        return f"k={o.k}, method={o.method!r}, temperature={o.temperature}"
class RelationLoss(nn.Module):
    """Module form of :func:`distill_engine.relation_loss`; forward(student_emb [B, d_s], teacher_emb [B, d_t], mask=None)."""

    def __init__(self, *, kind: str = "similarity", temperature: float = 1.0, reduction: str = "mean",
                 gather_across_ranks: bool = False):
        super().__init__()
        from .ops.relation import KINDS, REDUCTIONS
        from ._validate import check_choice, check_positive

        check_choice("kind", kind, KINDS)
        check_choice("reduction", reduction, REDUCTIONS)
        check_positive("temperature", temperature)
        self.kind, self.temperature, self.reduction, self.gather_across_ranks = kind, temperature, reduction, \
            gather_across_ranks

    def forward(self, student_emb, teacher_emb, mask=None):
        from .ops.relation import relation_loss

        return relation_loss(student_emb, teacher_emb, kind=self.kind, temperature=self.temperature, mask=mask,
                             reduction=self.reduction, gather_across_ranks=self.gather_across_ranks)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, temperature={self.temperature}, gather_across_ranks={self.gather_across_ranks}"


class TokenRelationLoss(nn.Module):
    """Module form of :func:`distill_engine.token_relation_loss`; forward(student_states, teacher_states, mask=None)."""

    def __init__(self, *, relation_heads: int, causal: bool = True, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        from .ops.token_relation import TokenRelationOptions

        self.options = TokenRelationOptions(heads=relation_heads, causal=causal, reduction=reduction, backend=backend)
        self.relation_heads, self.causal, self.reduction, self.backend = relation_heads, causal, reduction, backend

    def forward(self, student_states, teacher_states, mask=None):
        from .ops.token_relation import token_relation_loss

        return token_relation_loss(student_states, teacher_states, relation_heads=self.relation_heads, mask=mask,
                                   causal=self.causal, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"relation_heads={self.relation_heads}, causal={self.causal}"
