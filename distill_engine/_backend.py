"""Backend resolution and optional-extension loading.

Every op takes ``backend="auto" | "triton" | "cpu" | "torch"``:

* ``triton``: Triton kernels. Needs CUDA tensors, or CPU tensors with
  ``TRITON_INTERPRET=1`` set before Triton was imported (the test suite runs
  the kernels that way at small shapes).
* ``cpu``: the C++ kernels in ``csrc/cpu`` (module ``distill_engine._C``), for
  CPU tensors.
* ``torch``: the chunked PyTorch implementations in ``distill_engine.reference``.
* ``auto``: triton for CUDA tensors, cpu for CPU tensors when the extension is
  built, else torch.

The package never fails to import because the extension or Triton is missing;
only an explicit request for the missing backend raises.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from typing import Optional

import torch

BACKENDS = ("auto", "triton", "cpu", "torch")


@functools.lru_cache(maxsize=None)
def cpu_extension():
    """The C++ operators, or None when ``distill_engine._C`` is not built.

    The returned object's attributes are the ``torch.ops.distill_engine_C.<op>`` operators (CPU kernels
    always, CUDA ones when built with CUDA) plus ``WITH_CUDA``; see ``distill_engine/_cpp_ops.py``.
    """
    if os.environ.get("DISTILL_ENGINE_NO_EXT") == "1":
        return None
    try:
        return importlib.import_module("distill_engine._cpp_ops").load()
    except ImportError as exc:  # not built: the torch backend still works
        if os.environ.get("DISTILL_ENGINE_WARN_NO_EXT") == "1":
            warnings.warn(f"distill_engine._C not importable ({exc}); using the torch backend")
        return None


def cpu_extension_has(symbol: str) -> bool:
    ext = cpu_extension()
    return ext is not None and hasattr(ext, symbol)


def cuda_extension_has(symbol: str) -> bool:
    """True when the extension was built with CUDA sources and exports ``symbol``."""
    ext = cpu_extension()
    return ext is not None and getattr(ext, "WITH_CUDA", False) and hasattr(ext, symbol)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device, op: str, cpu_symbol: Optional[str] = None) -> str:
    """Map the user's ``backend`` choice to the one that will run.

    ``cpu_symbol`` is the name the C++ extension exports for this op; when it is
    missing the cpu backend is unavailable for the op.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    is_cuda = device.type == "cuda"
    has_cpu = cpu_symbol is not None and cpu_extension_has(cpu_symbol)
    if backend == "auto":
        if is_cuda:
            return "triton" if triton_available() else "torch"
        if device.type == "cpu" and has_cpu:
            return "cpu"
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError(f"{op}: backend='triton' requested but Triton is not installed; use backend='torch'")
        if not is_cuda and not triton_interpret():
            raise ValueError(
                f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                f"got tensors on {device}. Use backend='cpu' or 'torch' for CPU tensors."
            )
        return "triton"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"{op}: backend='cpu' needs CPU tensors, got tensors on {device}; use backend='triton' or 'auto'")
        if not has_cpu:
            raise ValueError(
                f"{op}: backend='cpu' requested but the C++ extension distill_engine._C "
                f"(symbol {cpu_symbol!r}) is not built; run `make build` or use backend='torch'"
            )
        return "cpu"
    return "torch"
