"""Bytes on the wire and on disk: one row block of teacher targets ↔ ``de.pack_targets`` bytes."""
from __future__ import annotations

import torch


def encode(ids: torch.Tensor, logprobs: torch.Tensor, logprob_dtype: str) -> bytes:
    """[n, k] targets → the packed byte string (``de.pack_targets``' documented layout)."""
    from ..ops.packing import pack_targets
    from ..ops.teacher_targets import TeacherTargets

    packed = pack_targets(TeacherTargets(ids.detach().to("cpu", torch.int32), logprobs.detach().to("cpu", torch.float32)),
                          logprob_dtype=logprob_dtype)
    return packed.to_bytes()


def decode(buf, *, where: str):
    """Packed bytes → (ids int32 [n, k], logprobs float32 [n, k]); a corrupt buffer raises ValueError naming ``where``."""
    from ..ops.packing import PackedTargets, unpack_targets

    try:
        t = unpack_targets(PackedTargets.from_bytes(bytes(buf)))
    except ValueError as e:
        raise ValueError(f"{where}: corrupt packed teacher targets ({e})") from None
    return t.ids, t.logprobs
