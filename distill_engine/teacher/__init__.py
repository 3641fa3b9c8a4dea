"""Teacher sources: where each student micro-batch's sparse teacher targets come from.

``colocated`` (the frozen teacher on every student rank), ``cache`` (precomputed by
``distill-engine cache-teacher``), ``stream`` (dedicated teacher ranks), ``none`` (hard labels only).
Heavy modules (cache, stream) load on first use.
"""
from .base import NoTeacher, TeacherBatch, TeacherSource, check_alignment, sample_generator
from .colocated import ColocatedTeacher, TeacherHead

__all__ = ["TeacherSource", "TeacherBatch", "NoTeacher", "ColocatedTeacher", "TeacherHead", "check_alignment",
           "sample_generator"]
