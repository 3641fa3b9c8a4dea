"""The op core: backend resolution, the backend registry, the chunk policy, optional-extension loading.

Backends. Every op takes ``backend="auto" | "triton" | "cpu" | "torch"`` with one meaning everywhere:

* ``triton``: Triton kernels. Needs CUDA tensors, or CPU tensors with
  ``TRITON_INTERPRET=1`` set before Triton was imported (the test suite runs
  the kernels that way at small shapes).
* ``cpu``: the C++ kernels in ``csrc/cpu`` (module ``distill_engine._C``), for
  CPU tensors.
* ``torch``: the chunked PyTorch implementations in ``distill_engine.reference``.
* ``auto``: triton for CUDA tensors, cpu for CPU tensors when the extension is
  built, else torch.

:func:`resolve_backend` is the one place that maps the user's choice to the backend that runs.

Registry. Each op registers one implementation per backend, an object that fulfils the op's chunk contract
(documented in the op's module): ``register_impl(op, backend, impl, cpu_symbol=...)`` where ``impl`` is the object
itself or a ``"module"`` / ``"module:attribute"`` string imported on first use (so Triton stays optional), and
``cpu_symbol`` names the C++ function whose presence makes the cpu backend available. ``impl_for(op, backend)``
returns the registered implementation of a resolved backend. Implementations that adapt a C++ or Triton surface
to an op's contract are classes named ``<Op><Backend>Impl`` (``DistillLossCpuImpl``,
``TeacherTargetsTritonImpl``, ...); modules that already fulfil the contract (``reference.distill_loss``,
``kernels.distill_loss``, ...) are registered as they are.

    op                      torch                          cpu                      triton
    fused_distill_loss      reference.distill_loss         DistillLossCpuImpl       kernels.distill_loss
    logprobs_at             (the fused_distill_loss implementations: the same two vocabulary passes)
    teacher_targets         TeacherTargetsTorchImpl        TeacherTargetsCpuImpl    TeacherTargetsTritonImpl
    fused_projection_loss   reference.projection_loss      ProjectionLossCpuImpl    kernels.projection_loss
    token_relation_loss     reference.token_relation       TokenRelationCpuImpl     kernels.token_relation

Chunk policy. Every chunked op walks rows in chunks whose scratch memory stays within a byte budget:
``chunk_rows(op, n_rows, bytes_per_row, device)``. The budget is, first found:

    DISTILL_ENGINE_<OP>_CHUNK_BYTES    (per op, <OP> from the table below)
    DISTILL_ENGINE_CHUNK_BYTES          (every op)
    the op's default                    (table below)

    <OP>              scratch per row (bytes)           default CPU   default CUDA          rows
    DISTILL_LOSS      fp32 logits, 4·V                  32 MiB        2 GiB (≤ 1/24 mem)    power of 2 in [16, 8192]
    LOGPROBS_AT       fp32 logits, 4·V                  32 MiB        2 GiB (≤ 1/24 mem)    power of 2 in [16, 8192]
    TEACHER_TARGETS   fp32 logits, 4·V                  32 MiB        512 MiB               power of 2 in [8, 8192]
    TEACHER_REST      fp32 logits (triton rest), 4·V    512 MiB       512 MiB               ≥ 1
    PROJECTION_LOSS   fp32 projection, 4·d_t            8 MiB         64 MiB                power of 2, ≥ 16
    TOKEN_RELATION    six fp32 score strips, 24·H·L     16 MiB        16 MiB                ≥ 1
    RELATION_ANGLE    fp32 triplet tensors, 16·B·(d+2B) 32 MiB        32 MiB                ≥ 1

Rows are capped at ``n_rows`` when given. A value that is not a positive integer raises a ValueError naming the
variable; the old names (``DISTILL_ENGINE_CHUNK_ELEMS``, ``DISTILL_ENGINE_TT_CHUNK_ELEMS``,
``DISTILL_ENGINE_PROJ_CHUNK_BYTES``, ``DISTILL_ENGINE_ANGLE_CHUNK_BYTES``,
``DISTILL_ENGINE_RELATION_CHUNK_BYTES``) raise one naming their replacement, so an old setting is never ignored.
An op's explicit ``chunk_rows=`` argument, where it has one, wins over all of this.

The package never fails to import because the extension or Triton is missing;
only an explicit request for the missing backend raises.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import warnings
from typing import Any, Dict, Optional, Tuple

import torch

BACKENDS = ("auto", "triton", "cpu", "torch")
RESOLVED_BACKENDS = ("triton", "cpu", "torch")


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


# ----------------------------------------------------------------------------------------------
# the backend registry
# ----------------------------------------------------------------------------------------------
_IMPLS: Dict[Tuple[str, str], Any] = {}
_CPU_SYMBOLS: Dict[str, str] = {}


def register_impl(op: str, backend: str, impl: Any, *, cpu_symbol: Optional[str] = None) -> None:
    """Register ``impl`` (an object, or a ``"module[:attribute]"`` string imported on first use) as ``op``'s
    implementation on ``backend`` ("triton" | "cpu" | "torch"); ``cpu_symbol`` (cpu only) is the C++ function
    whose presence in the extension makes the cpu backend available for ``op``."""
    if backend not in RESOLVED_BACKENDS:
        raise ValueError(f"register_impl: backend must be one of {RESOLVED_BACKENDS}, got {backend!r}")
    if cpu_symbol is not None:
        if backend != "cpu":
            raise ValueError(f"register_impl: cpu_symbol is only meaningful for backend='cpu', got {backend!r}")
        _CPU_SYMBOLS[op] = cpu_symbol
    _IMPLS[(op, backend)] = impl


def impl_for(op: str, backend: str) -> Any:
    """The implementation registered for ``op`` on the resolved ``backend`` (strings are imported here, lazily)."""
    try:
        impl = _IMPLS[(op, backend)]
    except KeyError:
        have = sorted(b for (o, b) in _IMPLS if o == op)
        raise ValueError(f"{op}: no implementation registered for backend {backend!r} (registered: {have})") from None
    if isinstance(impl, str):
        module, _, attr = impl.partition(":")
        impl = importlib.import_module(module)
        impl = getattr(impl, attr) if attr else impl
    return impl


def cpu_symbol_for(op: str) -> Optional[str]:
    """The C++ symbol registered for ``op``'s cpu backend (None: the op has no C++ implementation)."""
    return _CPU_SYMBOLS.get(op)


def resolve_backend(backend: str, device: torch.device, op: str, cpu_symbol: Optional[str] = None) -> str:
    """Map the user's ``backend`` choice to the one that will run.

    ``cpu_symbol`` is the name the C++ extension exports for this op (default: the one registered with
    :func:`register_impl`); when it is missing the cpu backend is unavailable for the op.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if cpu_symbol is None:
        cpu_symbol = cpu_symbol_for(op)
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


# ----------------------------------------------------------------------------------------------
# the chunk policy
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ChunkPolicy:
    """One op's default scratch budget (bytes) and how rows are rounded."""

    cpu_bytes: int
    cuda_bytes: int
    min_rows: int = 1
    max_rows: Optional[int] = None
    pow2: bool = False  # round down to a power of two (GEMM-friendly tiles)
    # cap the CUDA budget at 1/16 of the device's memory for the fp32 buffer + its 16-bit gradient copy
    # (6 B per element, 4 of them in the budgeted buffer), never below 64 MiB
    cuda_memory_cap: bool = False


# The loss's GPU default, 2^29 fp32 elements: 4,096 rows at V = 128,256. The chunk size sets the fp32 dW
# accumulator traffic (every chunk's dW += gᵀh reads and writes the whole [V, d] accumulator, 4.2 GB at
# V = 128,256, d = 4,096): at N = 8,192, 1,024-row chunks cost ~34 GB of HBM traffic per step, 4,096-row ~8 GB.
# CPU: 2^23 elements (32 MiB): the CPU GEMMs are already efficient at a few hundred rows.
_LOSS_POLICY = ChunkPolicy(cpu_bytes=2**25, cuda_bytes=2**31, min_rows=16, max_rows=8192, pow2=True,
                           cuda_memory_cap=True)
CHUNK_POLICIES: Dict[str, ChunkPolicy] = {
    "distill_loss": _LOSS_POLICY,
    "logprobs_at": _LOSS_POLICY,
    "teacher_targets": ChunkPolicy(cpu_bytes=2**25, cuda_bytes=2**29, min_rows=8, max_rows=8192, pow2=True),
    # the triton teacher_targets backend keeps no logits buffer; its rest log-mass pass forms them again
    "teacher_rest": ChunkPolicy(cpu_bytes=2**29, cuda_bytes=2**29),
    # CPU 8 MiB (512 rows at d_t = 4096): the GEMMs run at full rate and the per-chunk re-reads of P and dW stay
    # a few percent of the GEMM time; CUDA 64 MiB (2048 rows at d_t = 8192), enough rows to fill the GPU
    "projection_loss": ChunkPolicy(cpu_bytes=2**23, cuda_bytes=2**26, min_rows=16, pow2=True),
    "token_relation": ChunkPolicy(cpu_bytes=2**24, cuda_bytes=2**24),
    "relation_angle": ChunkPolicy(cpu_bytes=2**25, cuda_bytes=2**25),
}
_LEGACY_ENV = {
    "DISTILL_ENGINE_CHUNK_ELEMS": "DISTILL_ENGINE_DISTILL_LOSS_CHUNK_BYTES (and _LOGPROBS_AT_, _TEACHER_REST_)",
    "DISTILL_ENGINE_TT_CHUNK_ELEMS": "DISTILL_ENGINE_TEACHER_TARGETS_CHUNK_BYTES",
    "DISTILL_ENGINE_PROJ_CHUNK_BYTES": "DISTILL_ENGINE_PROJECTION_LOSS_CHUNK_BYTES",
    "DISTILL_ENGINE_ANGLE_CHUNK_BYTES": "DISTILL_ENGINE_RELATION_ANGLE_CHUNK_BYTES",
    "DISTILL_ENGINE_RELATION_CHUNK_BYTES": "DISTILL_ENGINE_TOKEN_RELATION_CHUNK_BYTES",
}


def chunk_env_var(op: str) -> str:
    """The per-op budget variable, ``DISTILL_ENGINE_<OP>_CHUNK_BYTES``."""
    return f"DISTILL_ENGINE_{op.upper()}_CHUNK_BYTES"


def _env_bytes(name: str) -> Optional[int]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name} must be a positive integer number of bytes, got {raw!r}; fix or unset it")
    return value


def chunk_budget(op: str, device: torch.device) -> int:
    """The byte budget of one chunk's scratch memory for ``op`` on ``device`` (env overrides, then default)."""
    if op not in CHUNK_POLICIES:
        raise ValueError(f"chunk policy: unknown op {op!r}; one of {sorted(CHUNK_POLICIES)}")
    for old, new in _LEGACY_ENV.items():
        if old in os.environ:
            raise ValueError(f"{old} is no longer read; set {new} (a budget in bytes, 4 per fp32 element) or "
                             f"DISTILL_ENGINE_CHUNK_BYTES for every op, and unset {old}")
    for name in (chunk_env_var(op), "DISTILL_ENGINE_CHUNK_BYTES"):
        value = _env_bytes(name)
        if value is not None:
            return value
    policy = CHUNK_POLICIES[op]
    if device.type != "cuda":
        return policy.cpu_bytes
    budget = policy.cuda_bytes
    if policy.cuda_memory_cap:
        try:
            total = torch.cuda.get_device_properties(device.index if device.index is not None else
                                                     torch.cuda.current_device()).total_memory
            budget = min(budget, max(2**26, total // 96 * 4))
        except (RuntimeError, AssertionError):  # no device properties (mocked devices): keep the default
            pass
    return budget


def chunk_rows(op: str, n_rows: Optional[int], bytes_per_row: int, device: torch.device) -> int:
    """Rows per chunk of ``op``: its budget (:func:`chunk_budget`) over ``bytes_per_row``, rounded by the op's
    policy, capped at ``n_rows`` (None: no cap)."""
    policy = CHUNK_POLICIES.get(op)
    budget = chunk_budget(op, device)
    rows = max(1, budget // max(int(bytes_per_row), 1))
    if policy.pow2:
        rows = 1 << (rows.bit_length() - 1)
    rows = max(policy.min_rows, rows)
    if policy.max_rows is not None:
        rows = min(rows, policy.max_rows)
    if n_rows is not None:
        rows = min(rows, max(int(n_rows), 1))
    return rows
