"""The C++ operators of ``distill_engine._C`` (csrc/) as one object, and their fake implementations.

The extension registers its kernels with PyTorch's dispatcher as ``torch.ops.distill_engine_C.<op>``
(``TORCH_LIBRARY`` schemas in csrc/bindings.cpp and csrc/cuda/register.cu, argument checks with
``TORCH_CHECK``): tensors in, tensors out, no raw pointers.  The namespace is distinct from the Python custom
ops' ``distill_engine`` (ops/library.py).  ``load()`` imports the extension module (which registers the
operators) and returns a :class:`CppOps`, whose attributes are those operators plus ``WITH_CUDA``; this is
what ``_backend.cpu_extension()`` hands to the op adapters, so a call site reads ``ext.distill_logits_lse(...)``.

The fake (meta) implementations below give every operator its output shapes and dtypes without running it,
so ``torch.library.opcheck``, FakeTensor tracing and ``torch.compile`` can handle them; the C++ schemas name
this module (``set_python_module``) so PyTorch imports it whenever a fake kernel is needed.
"""
from __future__ import annotations

import importlib

import torch

NAMESPACE = "distill_engine_C"
_F32 = torch.float32


class CppOps:
    """``torch.ops.distill_engine_C`` with the extension's ``WITH_CUDA`` flag.

    ``ops.<name>`` is the operator; ``hasattr(ops, name)`` is False for an operator this build lacks (the
    CUDA ones in a CPU-only build).
    """

    def __init__(self, module):
        self.module = module
        self.WITH_CUDA = bool(getattr(module, "WITH_CUDA", False))

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(getattr(torch.ops, NAMESPACE), name)  # AttributeError when not registered


# ------------------------------------------------------------------------------------------------------
# fake implementations: output metadata only (shapes as documented in the C++ files)
# ------------------------------------------------------------------------------------------------------
def _distill_logits_lse(h, weight, bias, temperature, need_lse1, exclude_ids=None):
    c, V = h.shape[0], weight.shape[0]
    return h.new_empty((c, V), dtype=_F32), h.new_empty((c,), dtype=_F32), h.new_empty((c if need_lse1 else 0,), dtype=_F32)


def _distill_dense_grad(buf, h, weight, temperature, lse_T, lse_1, s_q, s_1, dW_acc, db_acc, sparse_ids=None,
                        sparse_coef=None):
    return h.new_empty(h.shape, dtype=_F32)  # dH [c, d]


def _distill_buf_lse(buf, temperature):
    return buf.new_empty((buf.shape[0],))


def _vexp(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _projection_chunk(h, weight, bias, t, kind, zero_norm_sq, row_scale, dW_acc, db_acc, dh_out):
    c = h.shape[0]
    return h.new_empty((c,), dtype=_F32), h.new_empty((c,), dtype=torch.bool)  # loss, nonfinite teacher


def _teacher_topk_chunk(hidden, weight, bias, k, inv_t, buf):
    c = hidden.shape[0]
    return (hidden.new_empty((c, k), dtype=torch.int32), hidden.new_empty((c, k), dtype=_F32),
            hidden.new_empty((c,), dtype=_F32))


def _teacher_sample_chunk(hidden, weight, bias, inv_t, u, buf):
    c = hidden.shape[0]
    return hidden.new_empty((c, u.shape[1]), dtype=torch.int64), hidden.new_empty((c,), dtype=_F32)


def _token_relation_forward(S, T, heads, mask, causal, bq=128, bk=256):
    B, L = S.shape[0], S.shape[1]
    return tuple(S.new_empty((B, heads, L)) for _ in range(3))  # kl, lse_s, lse_t


def _token_relation_backward(S, T, heads, mask, causal, lse_s, lse_t, c, g, need_s, need_t, bq=128, bk=256):
    dS = S.new_empty(S.shape) if need_s else S.new_empty((0,))
    dT = S.new_empty(T.shape) if need_t else S.new_empty((0,))
    return dS, dT


def _tt_topk_merge(cand_vals, cand_ids, split_max, split_sum, k):
    rows = cand_vals.shape[0]
    return (cand_vals.new_empty((rows, k), dtype=torch.int32), cand_vals.new_empty((rows, k)),
            cand_vals.new_empty((rows,)))


def _tt_pack_id_bits(ids, bits, vocab):
    return ids.new_empty(((ids.numel() * bits + 31) // 32,))


def _tt_unpack_id_bits(words, n, bits, vocab):
    return words.new_empty((n,)), words.new_empty((1,))


def _tt_quantize_u8(logprobs, ids, floor_value):
    N, k = logprobs.shape
    return (logprobs.new_empty((N, k), dtype=torch.uint8), logprobs.new_empty((N,), dtype=torch.float16),
            logprobs.new_empty((N,), dtype=torch.float16))


def _tt_dequantize_u8(codes, offset, scale):
    return codes.new_empty(codes.shape, dtype=_F32)


_FAKES = {
    "distill_logits_lse": _distill_logits_lse, "distill_dense_grad": _distill_dense_grad,
    "distill_buf_lse": _distill_buf_lse, "_vexp": _vexp, "projection_chunk": _projection_chunk,
    "teacher_topk_chunk": _teacher_topk_chunk, "teacher_sample_chunk": _teacher_sample_chunk,
    "token_relation_forward": _token_relation_forward, "token_relation_backward": _token_relation_backward,
    "tt_topk_merge": _tt_topk_merge, "tt_pack_id_bits": _tt_pack_id_bits, "tt_unpack_id_bits": _tt_unpack_id_bits,
    "tt_quantize_u8": _tt_quantize_u8, "tt_dequantize_u8": _tt_dequantize_u8,
}
_registered: set = set()


def _register_fakes() -> None:
    """Registers the fake of every operator registered so far that has none yet.

    Runs at import (PyTorch imports this module when it needs a fake of an already loaded operator) and
    again after ``load()`` has loaded the extension.
    """
    ns = getattr(torch.ops, NAMESPACE)
    for name, fn in _FAKES.items():
        if name not in _registered and hasattr(ns, name):
            torch.library.register_fake(f"{NAMESPACE}::{name}")(fn)
            _registered.add(name)


def load() -> CppOps:
    """Imports ``distill_engine._C`` (ImportError when it is not built) and returns its operators."""
    module = importlib.import_module("distill_engine._C")
    _register_fakes()
    return CppOps(module)


_register_fakes()
