"""distill_engine: kernel-backed white-box knowledge distillation for LLMs.

Public API (see README.md):
    fused_distill_loss, FusedDistillLoss            -- student loss against sparse teacher targets
    teacher_targets, TeacherTargets                 -- fused top-k / sampled target extraction
    pack_targets, unpack_targets, PackedTargets     -- compact target packing for caches and streams
    fused_projection_loss, HiddenStateDistiller     -- feature (hidden-state) distillation
    FusedProjectionLoss, TeacherTargetExtractor     -- Module faces: one projection pair; target extraction
    relation_loss, token_relation_loss, pool_hidden -- relation-based distillation (issue 16)
    logprobs_at                                     -- log-probs at given ids, streamed over the vocabulary
    train, evaluate                                 -- the trainer and the evaluation
Heavy optional parts (Triton, the C++ extension, DeepSpeed, transformers) load lazily.
"""
from __future__ import annotations

import importlib

from .modules import FusedDistillLoss
from .ops.distill_loss import DistillOptions, fused_distill_loss

__version__ = "0.1.0"

# name -> module that defines it; resolved on first access so `import distill_engine` stays light
_LAZY = {
    "teacher_targets": "distill_engine.ops.teacher_targets",
    "TeacherTargets": "distill_engine.ops.teacher_targets",
    "pack_targets": "distill_engine.ops.packing",
    "unpack_targets": "distill_engine.ops.packing",
    "PackedTargets": "distill_engine.ops.packing",
    "fused_projection_loss": "distill_engine.ops.projection_loss",
    "logprobs_at": "distill_engine.ops.logprobs_at",
    "HiddenStateDistiller": "distill_engine.distiller",
    "FusedProjectionLoss": "distill_engine.modules",
    "TeacherTargetExtractor": "distill_engine.modules",
    "relation_loss": "distill_engine.ops.relation",
    "pool_hidden": "distill_engine.ops.relation",
    "token_relation_loss": "distill_engine.ops.token_relation",
    "RelationLoss": "distill_engine.modules",
    "TokenRelationLoss": "distill_engine.modules",
    "train": "distill_engine.trainer",
    "evaluate": "distill_engine.eval",
}

__all__ = ["fused_distill_loss", "FusedDistillLoss", "DistillOptions", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        mod = importlib.import_module(_LAZY[name])
        value = getattr(mod, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'distill_engine' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
