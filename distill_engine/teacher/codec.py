"""Bytes on the wire and on disk: one row block of teacher targets ↔ ``de.pack_targets`` bytes (layout, checksum
and lossy steps documented in :mod:`distill_engine.ops.packing`)."""
from __future__ import annotations

import torch


def encode(ids: torch.Tensor, logprobs: torch.Tensor, logprob_dtype: str, vocab_size: int,
           bitpack_ids: bool = False) -> bytes:
    """[n, k] targets → packed bytes."""
    from ..ops.packing import pack_targets
    from ..ops.teacher_targets import TeacherTargets

    t = TeacherTargets(ids.detach().to(torch.int32), logprobs.detach().float(), vocab_size)
    return pack_targets(t, logprob_dtype=logprob_dtype, bitpack_ids=bitpack_ids).to_bytes()


def decode(buf, *, where: str):
    """Packed bytes → (ids int32 [n, k], logprobs float32 [n, k]); a corrupt buffer raises ValueError naming ``where``."""
    from ..ops.packing import unpack_targets

    try:
        t = unpack_targets(bytes(buf))
    except ValueError as e:
        raise ValueError(f"{where}: corrupt packed teacher targets ({e})") from None
    return t.ids, t.logprobs
