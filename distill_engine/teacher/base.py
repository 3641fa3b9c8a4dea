"""The one interface every teacher source implements.

A :class:`TeacherSource` hands the trainer, for each student micro-batch, the teacher's sparse targets
for exactly the loss rows of that micro-batch (``Batch.valid_index``, row-major), plus the hidden states
of the mapped teacher layers when feature losses are on. Sources: ``colocated`` (the frozen teacher runs
on every student rank), ``cache`` (targets precomputed by ``distill-engine cache-teacher``), ``stream``
(dedicated teacher ranks send packed targets over torch.distributed), and ``none`` (hard labels only).
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..data.loader import Batch


@dataclass
class TeacherBatch:
    """Targets for the ``n`` loss rows of one micro-batch."""

    ids: torch.Tensor                       # [n, k] int32, -1 = empty slot
    logprobs: torch.Tensor                  # [n, k] float32, -inf in empty slots
    micro_step: int
    hidden: Optional[List[torch.Tensor]] = None  # one [n, d_t] tensor per mapped teacher layer
    rest_logprob: Optional[torch.Tensor] = None  # [n] float32 exact teacher rest log-mass (topk), else None
    relation: Optional[List[torch.Tensor]] = None  # loss.relation: pooled [B, d_t] or per-pair Q/K/V [B, L, d]

    def to(self, device) -> "TeacherBatch":
        hid = None if self.hidden is None else [h.to(device, non_blocking=True) for h in self.hidden]
        rest = None if self.rest_logprob is None else self.rest_logprob.to(device, non_blocking=True)
        rel = None if self.relation is None else [r.to(device, non_blocking=True) for r in self.relation]
        return TeacherBatch(self.ids.to(device, non_blocking=True), self.logprobs.to(device, non_blocking=True),
                            self.micro_step, hid, rest, rel)


class TeacherSource(ABC):
    """Yields the :class:`TeacherBatch` aligned with each student micro-batch, in the order they are trained."""

    name = "abstract"

    def start(self, first_micro_step: int, last_micro_step: int) -> None:
        """Called once before training with the micro-steps [first, last) this invocation will consume."""

    @abstractmethod
    def get(self, batch: Batch) -> TeacherBatch:
        """Targets for ``batch`` (every rank calls this for every micro-batch, in order)."""

    def close(self) -> None:
        """Stop background threads and release resources."""


class NoTeacher(TeacherSource):
    """``teacher: none``: black-box / hard-label training. One empty slot per row, so the fused loss sees no
    teacher mass and, with ``ce_weight = 1``, reduces to plain cross-entropy on the labels."""

    name = "none"

    def get(self, batch: Batch) -> TeacherBatch:
        n = batch.n_valid
        return TeacherBatch(torch.full((n, 1), -1, dtype=torch.int32),
                            torch.full((n, 1), float("-inf"), dtype=torch.float32), batch.micro_step)


def sample_generator(seed: int, dp_rank: int, micro_step: int, device="cpu") -> torch.Generator:
    """The generator for ``method="sample"`` targets of one micro-batch: a pure function of the run seed, the
    student rank and the micro-step, so co-located, cached and streamed targets agree and a resumed run draws
    exactly what the uninterrupted one would have."""
    digest = hashlib.sha256(f"{seed}/{dp_rank}/{micro_step}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def check_alignment(tb: TeacherBatch, batch: Batch, source: str) -> None:
    n = batch.n_valid
    if tb.micro_step != batch.micro_step or tb.ids.shape[0] != n:
        raise RuntimeError(f"teacher source {source!r} returned targets for micro-step {tb.micro_step} with "
                           f"{tb.ids.shape[0]} rows, but the student is at micro-step {batch.micro_step} with {n} "
                           f"loss rows: teacher and student data orders diverged (different data, seq_len, seed "
                           f"or micro-batch settings)")
