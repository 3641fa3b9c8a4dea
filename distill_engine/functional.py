"""Torch-style functional face of the ops (``import distill_engine.functional as DF``)."""
from .ops.distill_loss import fused_distill_loss

__all__ = ["fused_distill_loss"]

try:  # ops written by later issues register here when present
    from .ops.teacher_targets import teacher_targets  # noqa: F401

    __all__.append("teacher_targets")
except ImportError:  # pragma: no cover - only while the op is absent
    pass
try:
    from .ops.projection_loss import fused_projection_loss  # noqa: F401

    __all__.append("fused_projection_loss")
except ImportError:  # pragma: no cover
    pass
try:
    from .ops.relation import pool_hidden, relation_loss  # noqa: F401
    from .ops.token_relation import token_relation_loss  # noqa: F401

    __all__ += ["relation_loss", "token_relation_loss", "pool_hidden"]

    from .ops.logprobs_at import logprobs_at  # noqa: F401

    __all__.append("logprobs_at")
except ImportError:  # pragma: no cover
    pass
