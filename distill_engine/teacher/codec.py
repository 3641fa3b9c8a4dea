"""Bytes on the wire and on disk: one row block of teacher targets ↔ ``de.pack_targets`` bytes (layout, checksum
and lossy steps documented in :mod:`distill_engine.ops.packing`)."""
from __future__ import annotations

from typing import Optional

import torch


def encode(ids: torch.Tensor, logprobs: torch.Tensor, logprob_dtype: str, vocab_size: int,
           bitpack_ids: bool = False, rest_logprob: Optional[torch.Tensor] = None) -> bytes:
    """[n, k] targets (and the [n] teacher rest log-mass when known: packed format v2) → packed bytes."""
    from ..ops.packing import pack_targets
    from ..ops.teacher_targets import TeacherTargets

    rest = None if rest_logprob is None else rest_logprob.detach().float().to(ids.device)
    t = TeacherTargets(ids.detach().to(torch.int32), logprobs.detach().float(), vocab_size, rest)
    return pack_targets(t, logprob_dtype=logprob_dtype, bitpack_ids=bitpack_ids).to_bytes()


def decode(buf, *, where: str, with_rest: bool = False):
    """Packed bytes → (ids int32 [n, k], logprobs float32 [n, k]) (+ rest_logprob float32 [n] | None when
    ``with_rest``); a corrupt buffer raises ValueError naming ``where``."""
    from ..ops.packing import unpack_targets

    try:
        t = unpack_targets(bytes(buf))
    except ValueError as e:
        raise ValueError(f"{where}: corrupt packed teacher targets ({e})") from None
    if with_rest:
        return t.ids, t.logprobs, t.rest_logprob
    return t.ids, t.logprobs
