"""Argument checks shared by every op. Each raises ValueError naming the argument."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_tensor(
    name: str,
    t,
    *,
    ndim: Optional[int] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Check type, rank, dtype, shape (None = any size on that axis) and device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if shape is not None:
        for axis, want in enumerate(shape):
            if want is not None and t.shape[axis] != want:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}, expected size {want} on axis {axis} "
                    f"(expected shape {tuple('*' if s is None else s for s in shape)})"
                )
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}; move it with .to({str(device)!r})")
    return t


def check_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; cast one of them")


def check_hidden_weight(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
    """The lm_head every fused op takes: hidden [N, d], weight [V, d] (V >= 1) and an optional bias [V], one float
    dtype, one device."""
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, shape=(None, hidden.shape[1]), device=hidden.device)
    check_same_dtype("weight", weight, "hidden", hidden)
    V = weight.shape[0]
    if V < 1:
        raise ValueError("weight must have at least one row (shape [V, d] with V >= 1)")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, shape=(V,), device=hidden.device)
        check_same_dtype("bias", bias, "hidden", hidden)


def check_finite_head(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], whose: str) -> None:
    """Value checks of an lm_head's inputs (one row-sum pass each); ``whose`` ("the student's ", "the teacher's ",
    "the ") names the model in the fix."""
    check_finite_rows("hidden", hidden, f"; {whose}hidden states must be finite")
    check_finite_rows("weight", weight, f"; {whose}lm_head weight must be finite")
    if bias is not None:
        check_finite_rows("bias", bias[:, None], f"; {whose}lm_head bias must be finite")


def check_target_values(ids_name: str, ids: torch.Tensor, lp_name: str, lp: torch.Tensor, V: Optional[int],
                        unique_fix: str = "") -> None:
    """Value checks of sparse targets (one host sync each): ids [N, k] in [-1, V) (-1 an empty slot; V None: only
    >= -1), unique within a row; log-probabilities not NaN and <= 0 (1e-4 of rounding slack) in the filled slots."""
    bad = (ids < -1) | (ids >= V) if V is not None else ids < -1
    if bool(bad.any()):
        r, c = bad.nonzero()[0].tolist()
        raise ValueError(f"{ids_name} must lie in [-1, V={V}) (-1 marks an empty slot); found {int(ids[r, c])} "
                         f"at row {r}, slot {c}")
    if ids.shape[1] > 1:
        srt = ids.sort(dim=1).values
        dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
        if bool(dup.any()):
            raise ValueError(f"{ids_name} must be unique within a row; row {int(dup.any(1).nonzero()[0, 0])} repeats "
                             f"an id{unique_fix}")
    lpv = lp.float()
    if bool(torch.isnan(lpv).any()):
        raise ValueError(f"{lp_name} contains NaN (first at row {int(torch.isnan(lpv).any(1).nonzero()[0, 0])})")
    pos = (lpv > 1e-4) & (ids >= 0)
    if bool(pos.any()):
        raise ValueError(f"{lp_name} must be log-probabilities (<= 0); row {int(pos.any(1).nonzero()[0, 0])} has a "
                         f"positive value. Pass log_softmax outputs, not logits")


def check_rest_values(name: str, rest: torch.Tensor) -> None:
    """A teacher's rest log-mass [N]: not NaN, <= 0 (1e-4 of rounding slack), -inf allowed."""
    r = rest.float()
    if bool(torch.isnan(r).any()):
        raise ValueError(f"{name} contains NaN (first at row {int(torch.isnan(r).nonzero()[0, 0])})")
    if bool((r > 1e-4).any()):
        raise ValueError(f"{name} must be a log-probability (<= 0; -inf for no rest mass); row "
                         f"{int((r > 1e-4).nonzero()[0, 0])} is positive")


def check_finite(name: str, t: torch.Tensor) -> None:
    """Non-finite values raise, naming the first offending row."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        row = int(bad.reshape(t.shape[0], -1).any(dim=1).nonzero()[0, 0]) if t.dim() > 0 else 0
        raise ValueError(f"{name} contains non-finite values (first at row {row})")


def check_positive(name: str, value: float, *, optional: bool = False) -> None:
    """A finite number > 0 (not a bool); None too when ``optional``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0 and value == value
                                       and value != float("inf")):
        raise ValueError(f"{name} must be a finite number > 0{' or None' if optional else ''}, got {value!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def check_mask(mask: torch.Tensor, shape: Sequence[int], device: torch.device, hint: str = "") -> None:
    """A bool mask of exactly ``shape`` on ``device``; ``hint`` says where such a mask comes from."""
    check_tensor("mask", mask, dtypes=(torch.bool,), device=device)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(shape)}{hint}")


def check_positive_int(name: str, value, *, optional: bool = False) -> None:
    """A positive int (not a bool); None too when ``optional``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")


def check_finite_rows(name: str, t: torch.Tensor, fix: str = "") -> None:
    """Non-finite values in a 1-D/2-D float tensor raise ValueError naming the first offending row.

    Fast path: a row holding NaN or ±inf has a non-finite fp32 sum, so one row-sum pass (a reduction over the
    tensor, memory-bound) clears every other row; only rows whose sum is not finite are checked elementwise
    (a finite row can only get there by overflowing the sum, which is not an error)."""
    if t.numel() == 0:
        return
    t2 = t.reshape(t.shape[0], -1)
    row_ok = torch.isfinite(t2.sum(dim=1, dtype=torch.float32))  # [rows]
    if bool(row_ok.all()):
        return
    cand = (~row_ok).nonzero()[:, 0]
    bad = cand[~torch.isfinite(t2[cand]).all(dim=1)]
    if bad.numel():
        raise ValueError(f"{name} contains non-finite values (first at row {int(bad[0])}){fix}")
