"""The C++ operators torch.ops.distill_engine_C.* (csrc/): registration, torch.library.opcheck, argument checks.

opcheck runs each CPU operator on small inputs and checks its schema (declared mutations and aliasing),
its fake implementation (distill_engine/_cpp_ops.py) against the real kernel's outputs, and that it traces
through AOT dispatch with dynamic shapes.  The numerics of each kernel are tested against float64
references in the op test files (test_cpu_distill_kernels.py, test_teacher_targets.py, ...).
"""
from __future__ import annotations

import pytest
import torch

from distill_engine import _backend, _cpp_ops

if not _backend.cpu_extension_has("distill_logits_lse"):
    pytest.skip("distill_engine._C is not built (run `make build`)", allow_module_level=True)

ext = _backend.cpu_extension()
NS = getattr(torch.ops, _cpp_ops.NAMESPACE)
CPU_OPS = ["distill_logits_lse", "distill_dense_grad", "distill_buf_lse", "_vexp", "projection_chunk",
           "teacher_topk_chunk", "teacher_sample_chunk", "token_relation_forward", "token_relation_backward"]
CUDA_OPS = ["tt_topk_merge", "tt_pack_id_bits", "tt_unpack_id_bits", "tt_quantize_u8", "tt_dequantize_u8"]


def _r(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _token_relation_stats(S, T, mask):
    kl, lse_s, lse_t = NS.token_relation_forward(S, T, 2, mask, True, 4, 4)
    return lse_s, lse_t, _r(*kl.shape, seed=5), _r(*kl.shape, seed=6)


def _cases():
    c, d, V = 5, 8, 37  # prime vocabulary
    h, w, b = _r(c, d, seed=1), _r(V, d, seed=2), _r(V, seed=3)
    buf, lse_t, lse_1 = NS.distill_logits_lse(h, w, b, 2.0, True)
    ex = torch.tensor([[0, 5, -1]] * c)
    u = torch.sort(torch.rand(c, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4)), dim=1).values
    S, T, mask = _r(2, 7, 8, seed=7), _r(2, 7, 6, seed=8), torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    dt = 6
    return [
        ("distill_logits_lse", (h, w, b, 2.0, True), {}),
        ("distill_logits_lse", (h.bfloat16(), w.bfloat16(), None, 1.0, False), {"exclude_ids": ex}),
        ("distill_dense_grad", (buf.clone(), h, w, 2.0, lse_t, lse_1, _r(c, seed=9), _r(c, seed=10),
                                torch.zeros(V, d), torch.zeros(V)),
         {"sparse_ids": torch.tensor([[1, 2]] * c), "sparse_coef": _r(c, 2, seed=11)}),
        ("distill_buf_lse", (buf, 1.5), {}),
        ("_vexp", (_r(3, 11, seed=12) * 30,), {}),
        ("projection_chunk", (h, _r(dt, d, seed=13), _r(dt, seed=14), _r(c, dt, seed=15), 1, 1e-12,
                              torch.ones(c), torch.zeros(dt, d), torch.zeros(dt), torch.empty(c, d)), {}),
        ("projection_chunk", (h, _r(dt, d, seed=13), None, _r(c, dt, dtype=torch.bfloat16, seed=15), 0, 1e-12,
                              None, None, None, None), {}),
        ("teacher_topk_chunk", (h, w, b, 6, 0.5, torch.empty(c + 2, V)), {}),
        ("teacher_sample_chunk", (h, w, None, 1.0, u, torch.empty(c, V)), {}),
        ("token_relation_forward", (S, T, 2, mask, True, 4, 4), {}),
        ("token_relation_backward", (S, T, 2, mask, True, *_token_relation_stats(S, T, mask), True, True, 4, 4),
         {}),
        ("token_relation_backward", (S, T, 2, mask, False, *_token_relation_stats(S, T, mask), False, True), {}),
    ]


def test_every_cpu_op_is_registered():
    for name in CPU_OPS:
        assert hasattr(ext, name), f"torch.ops.{_cpp_ops.NAMESPACE}.{name} missing"
        assert getattr(ext, name) is getattr(NS, name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"{_cpp_ops.NAMESPACE}::{name}", "CPU")
    assert ext.WITH_CUDA == all(hasattr(ext, n) for n in CUDA_OPS)
    assert not hasattr(ext, "no_such_op")
    assert set(_cpp_ops._FAKES) == set(CPU_OPS + CUDA_OPS)


@pytest.mark.parametrize("case", range(len(_cases())), ids=lambda i: f"{_cases()[i][0]}-{i}")
def test_opcheck(case):
    name, args, kwargs = _cases()[case]
    torch.library.opcheck(getattr(NS, name), args, kwargs)


def test_argument_checks_name_the_argument():
    h, w = _r(3, 4), _r(7, 4)
    with pytest.raises(RuntimeError, match="buf must be contiguous"):
        ext.teacher_topk_chunk(h, w, None, 2, 1.0, torch.empty(7, 3).T)
    with pytest.raises(RuntimeError, match=r"k must lie in \[1, V = 7\]"):
        ext.teacher_topk_chunk(h, w, None, 8, 1.0, torch.empty(3, 7))
    with pytest.raises(RuntimeError, match="hidden and weight must share a dtype"):
        ext.teacher_topk_chunk(h, w.double(), None, 2, 1.0, torch.empty(3, 7))
    with pytest.raises(RuntimeError, match="u must be float64"):
        ext.teacher_sample_chunk(h, w, None, 1.0, torch.rand(2, 3, dtype=torch.float64), torch.empty(3, 7))
    with pytest.raises(RuntimeError, match="dW_acc must be a float32 CPU tensor"):
        ext.projection_chunk(h, w, None, _r(3, 7), 0, 0.0, torch.ones(3), torch.zeros(7, 5), None, None)
    with pytest.raises(RuntimeError, match="row_scale must be"):
        ext.projection_chunk(h, w, None, _r(3, 7), 0, 0.0, torch.ones(4), None, None, None)
    with pytest.raises(RuntimeError, match="kind must be 0"):
        ext.projection_chunk(h, w, None, _r(3, 7), 2, 0.0, None, None, None, None)
    S, T, mask = _r(1, 5, 4), _r(1, 5, 6), torch.ones(1, 5, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"heads \(4\) must divide"):
        ext.token_relation_forward(S, T, 4, mask, False)
    with pytest.raises(RuntimeError, match="mask must have"):
        ext.token_relation_forward(S, T, 2, torch.ones(1, 4, dtype=torch.bool), False)
    lse = torch.zeros(1, 2, 5)
    with pytest.raises(RuntimeError, match="g must be float32"):
        ext.token_relation_backward(S, T, 2, mask, False, lse, lse, lse, torch.zeros(3), True, True)
    with pytest.raises(RuntimeError, match="h must be a CPU tensor|h must be float32"):
        ext.distill_logits_lse(h.to(torch.int64), w, None, 1.0, False)


@pytest.mark.skipif(not (torch.cuda.is_available() and ext.WITH_CUDA), reason="needs a GPU and _C built with CUDA")
def test_cuda_ops_opcheck_and_match_the_torch_codecs():
    """The tt_* CUDA operators (csrc/cuda/register.cu) against the torch paths they replace, and opcheck."""
    from distill_engine.kernels.teacher_targets import merge_candidates
    from distill_engine.ops import packing

    g = torch.Generator().manual_seed(21)
    V, n = 1009, 1001  # prime vocabulary, a stream that ends mid-word
    bits = packing.id_bits_for(V)
    ids = torch.randint(-1, V, (n,), generator=g, dtype=torch.int32)
    words = NS.tt_pack_id_bits(ids.cuda(), bits, V)
    assert torch.equal(words.cpu(), packing._pack_id_bits(ids, V, bits))
    back, bad = NS.tt_unpack_id_bits(words, n, bits, V)
    assert torch.equal(back.cpu(), ids) and int(bad.item()) == 0

    lp = torch.log_softmax(torch.randn(7, 33, generator=g), dim=1).topk(5, dim=1).values  # [7, 5]
    lp_ids = torch.randint(0, V, (7, 5), generator=g, dtype=torch.int32)
    lp_ids[2, 3:] = -1  # empty slots
    lp_ids[4] = -1      # an empty row
    codes, off, sc = NS.tt_quantize_u8(lp.cuda(), lp_ids.cuda(), packing.U8_FLOOR)
    want = packing._quantize_u8(lp, lp_ids)
    for got_t, want_t in zip((codes, off, sc), want):
        assert torch.equal(got_t.cpu(), want_t)
    assert torch.equal(NS.tt_dequantize_u8(codes, off, sc).cpu(), packing._dequantize_u8(*want))

    rows, S, KP, k = 6, 3, 8, 5
    cv = torch.randn(rows, S * KP, generator=g)
    ci = torch.randperm(rows * S * KP, generator=g).reshape(rows, S * KP).to(torch.int32)
    cv[1, 4:] = float("-inf")  # row 1 has 4 real candidates (< k): its last slot is (-1, -inf)
    ci[1, 4:] = -1
    pm, ps = torch.randn(rows, S, generator=g), torch.rand(rows, S, generator=g) + 0.5
    got = NS.tt_topk_merge(cv.cuda(), ci.cuda(), pm.cuda(), ps.cuda(), k)
    want_ids, want_lp, want_lse = merge_candidates(cv, ci, pm, ps, k)  # CPU tensors: the torch path
    assert torch.equal(got[0].cpu(), want_ids)
    torch.testing.assert_close(got[1].cpu(), want_lp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[2].cpu(), want_lse, rtol=1e-6, atol=1e-6)

    for name, args in [("tt_pack_id_bits", (ids.cuda(), bits, V)), ("tt_unpack_id_bits", (words, n, bits, V)),
                       ("tt_quantize_u8", (lp.cuda(), lp_ids.cuda(), packing.U8_FLOOR)),
                       ("tt_dequantize_u8", (codes, off, sc)),
                       ("tt_topk_merge", (cv.cuda(), ci.cuda(), pm.cuda(), ps.cuda(), k))]:
        torch.library.opcheck(getattr(NS, name), args)
    with pytest.raises(RuntimeError, match="cand_ids must have dtype"):
        NS.tt_topk_merge(cv.cuda(), ci.long().cuda(), pm.cuda(), ps.cuda(), k)
