"""Shared helpers for the op tests: one error metric, one dtype-table assertion, one backend parametrizer and
one strided-view maker. Every op test judges its results the same way:

* ``rel_err(got, ref)`` = max |got − ref| / max(max |ref|, floor), computed in float64;
* ``assert_close_to_ref(got, ref, dtype)`` bounds it by ``TOL[dtype]`` (the input dtype; the ops accumulate in
  fp32), optionally plus ``factor`` × the error PyTorch itself makes in that dtype (cut-cross-entropy style);
* ``backends(op)`` gives the pytest params torch / cpu / triton, each skipped with its reason when unavailable;
* ``strided(t, how)`` returns a non-contiguous tensor holding the same values (the gaps hold NaN, so an op that
  reads the underlying storage as if it were contiguous gives NaN instead of a quietly wrong number).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import pytest
import torch

from distill_engine import _backend

ALL_BACKENDS = ("torch", "cpu", "triton")
# max-abs relative error allowed for each input dtype against the float64 oracle (the ops accumulate in fp32;
# half inputs only change the rounding of the inputs and of the returned gradients)
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}
# the symbol the C++ extension exports for each op: without it the cpu backend cannot run the op
CPU_SYMBOL = {
    "fused_distill_loss": "distill_logits_lse",
    "tail_exact": "distill_buf_lse",
    "logprobs_at": "distill_logits_lse",
    "teacher_targets": "teacher_topk_chunk",
    "fused_projection_loss": "projection_chunk",
    "token_relation_loss": "token_relation_forward",
}


def rel_err(got: torch.Tensor, ref: torch.Tensor, floor: float = 1e-6) -> float:
    """max |got − ref| / max(max |ref|, floor) in float64 (0 for empty tensors)."""
    a, r = got.detach().double().cpu(), ref.detach().double().cpu()
    if r.numel() == 0:
        return 0.0
    return float((a - r).abs().max() / r.abs().max().clamp_min(floor))


def assert_close_to_ref(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype = torch.float32, *,
                        torch_same_dtype: Optional[torch.Tensor] = None, factor: float = 2.0, tol: Optional[float] = None,
                        what: str = "") -> None:
    """``got`` is finite, has ``ref``'s shape and ``rel_err(got, ref) <= TOL[dtype]`` (or ``tol``); with
    ``torch_same_dtype`` (what plain PyTorch computes from the same inputs in ``dtype``) the bound grows by
    ``factor`` × PyTorch's own error, so a kernel is never asked to beat the dtype it is given."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert bool(torch.isfinite(got.detach().double()).all()), f"{what}: not finite"
    allowed = TOL[dtype] if tol is None else tol
    if torch_same_dtype is not None:
        allowed += factor * rel_err(torch_same_dtype, ref)
    err = rel_err(got, ref)
    assert err <= allowed, f"{what}: relative error {err:.3e} > {allowed:.3e}"


def assert_all_close(got: Sequence, ref: Sequence, dtype: torch.dtype = torch.float32, *,
                     names: Iterable[str] = ("loss", "d_hidden", "d_weight", "d_bias"), tol: Optional[float] = None,
                     what: str = "") -> None:
    """assert_close_to_ref over paired results (a loss and its gradients); a None reference wants a None result."""
    for name, a, r in zip(names, got, ref):
        if r is None:
            assert a is None, f"{what}: {name} should be None"
            continue
        assert_close_to_ref(a, r, dtype, tol=tol, what=f"{what} {name}")


def unavailable(backend: str, op: str) -> Optional[str]:
    """Why ``backend`` cannot run ``op`` on CPU tensors here, or None when it can."""
    if backend == "cpu" and not _backend.cpu_extension_has(CPU_SYMBOL[op]):
        return f"C++ extension without {CPU_SYMBOL[op]} (run `make build`)"
    if backend == "triton":
        if not _backend.triton_available():
            return "triton not installed"
        if not (_backend.triton_interpret() or torch.cuda.is_available()):
            return "needs CUDA or TRITON_INTERPRET=1 (set in tests/conftest.py)"
        try:
            import distill_engine.kernels.distill_loss  # noqa: F401
        except ImportError as exc:
            return f"triton kernels not importable: {exc}"
    return None


def backends(op: str, names: Sequence[str] = ALL_BACKENDS) -> list:
    """pytest params for ``@pytest.mark.parametrize("backend", backends(op))``: each unavailable backend is
    skipped with its reason."""
    out = []
    for name in names:
        reason = unavailable(name, op)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        out.append(pytest.param(name, id=name, marks=marks))
    return out


def available(op: str, names: Sequence[str] = ALL_BACKENDS) -> list:
    """The backends of ``names`` that can run ``op`` here (for loops inside one test)."""
    return [name for name in names if unavailable(name, op) is None]


def skip_unavailable(backend: str, op: str) -> None:
    reason = unavailable(backend, op)
    if reason:
        pytest.skip(reason)


def _junk(t: torch.Tensor) -> torch.Tensor:
    """Gap filler: NaN for floats (reads of it poison the result), the tensor's first entry for ints/bools."""
    if t.is_floating_point():
        return torch.full_like(t, float("nan"))
    return torch.full_like(t, t.flatten()[0].item()) if t.numel() else t.clone()


def strided(t: Optional[torch.Tensor], how: str = "cols") -> Optional[torch.Tensor]:
    """A non-contiguous tensor with ``t``'s values, dtype and device (a fresh leaf; call ``requires_grad_()``).

    how: "cols"   every other entry of the last dim of a twice-as-wide tensor (last-dim stride 2; 1-D too);
         "rows"   every other row of a twice-as-tall tensor (row stride 2·d, last dim contiguous);
         "t"      a transposed copy transposed back (column-major last two dims).
    """
    if t is None:
        return None
    t = t.detach()
    if how == "cols":
        out = torch.stack([t, _junk(t)], dim=-1)[..., 0]
    elif how == "rows":
        out = torch.stack([t, _junk(t)], dim=1)[:, 0]
    elif how == "t":
        if t.dim() < 2:
            raise ValueError("strided(how='t') needs at least 2 dimensions")
        out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    else:
        raise ValueError(f"how must be 'cols', 'rows' or 't', got {how!r}")
    assert torch.equal(out.nan_to_num(), t.nan_to_num()) if t.is_floating_point() else torch.equal(out, t)
    if how != "t" or min(t.shape[-2:]) > 1:  # a transpose of a size-1 dim stays contiguous
        assert t.numel() <= 1 or not out.is_contiguous(), f"strided(how={how!r}) of {tuple(t.shape)} is contiguous"
    return out.detach()
