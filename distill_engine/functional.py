"""Torch-style functional face of the ops (``import distill_engine.functional as DF``).

Eager functions (autograd.Function-backed). For torch.compile-traceable versions of the loss, target and
projection ops (torch.library custom ops) use ``distill_engine.ops.library``.
"""
from .ops.distill_loss import fused_distill_loss
from .ops.logprobs_at import logprobs_at
from .ops.projection_loss import fused_projection_loss
from .ops.relation import pool_hidden, relation_loss
from .ops.teacher_targets import teacher_targets
from .ops.token_relation import token_relation_loss

__all__ = ["fused_distill_loss", "teacher_targets", "fused_projection_loss", "relation_loss", "token_relation_loss",
           "pool_hidden", "logprobs_at"]
