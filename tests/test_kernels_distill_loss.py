"""Direct tests of the Triton launchers of fused_distill_loss (kernels/distill_loss.py).

On CPU they run under TRITON_INTERPRET=1 (tests/conftest.py) at tiny, ragged shapes (c, d, V not
multiples of any block size, V prime); the gpu-marked tests rerun them compiled on CUDA at larger
shapes with the real tile configs (heuristic, plus one autotuned run) and both logits modes. Everything is judged against float64 torch
computed from the same (rounded) inputs; for bf16/fp16 the gradient tolerance is set by what torch
itself gets when it rounds g to the input dtype before the GEMMs.
"""
import math

import pytest
import torch

triton = pytest.importorskip("triton")

from distill_engine.kernels import distill_loss as K  # noqa: E402
from op_testing import rel_err  # noqa: E402

F64 = torch.float64


def _inputs(c, d, V, dtype, device, bias, scale=1.0, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    h = (torch.randn(c, d, generator=gen) * scale).to(device=device, dtype=dtype)
    w = (torch.randn(V, d, generator=gen) / math.sqrt(d)).to(device=device, dtype=dtype)
    b = (torch.randn(V, generator=gen)).to(device=device, dtype=dtype) if bias else None
    return h, w, b


def _ref_logits(h, w, b):
    l = h.to(F64) @ w.to(F64).T                      # [c, V]
    if b is not None:
        l = l + b.to(F64)
    return l


def _rel(a, b):
    """The suite's metric (tests/op_testing.py: max |a - b| / max |b|) without a floor."""
    return rel_err(a, b, floor=1e-30)


def _check_logits_lse(c, d, V, dtype, device, bias, T, need_lse1, store, split=None, scale=1.0):
    h, w, b = _inputs(c, d, V, dtype, device, bias, scale)
    buf, lse_T, lse_1 = K.logits_lse(h, w, b, T, need_lse1, store, split=split)
    l = _ref_logits(h, w, b)
    # inputs are exact in fp32; only the fp32 accumulation differs from float64
    tol = 2e-5 if device == "cpu" else 1e-4
    assert lse_T.dtype == torch.float32 and lse_T.shape == (c,)
    assert torch.isfinite(lse_T).all()
    assert _rel(lse_T, torch.logsumexp(l / T, dim=1)) < tol
    if need_lse1:
        assert lse_1 is not None and lse_1.shape == (c,)
        assert _rel(lse_1, torch.logsumexp(l, dim=1)) < tol
    else:
        assert lse_1 is None
    if store:
        assert buf is not None and buf.dtype == torch.float32 and buf.shape == (c, V)
        assert _rel(buf, l) < tol
    else:
        assert buf is None


@pytest.mark.parametrize(
    "dtype,bias,T,need_lse1,store,split",
    [
        (torch.float32, True, 0.7, True, True, None),
        (torch.float32, False, 1.0, True, False, 3),
        (torch.float32, True, 2.0, False, False, 2),
        (torch.bfloat16, True, 1.3, True, True, 3),
        (torch.bfloat16, False, 1.0, False, True, None),
        (torch.float16, True, 0.5, True, False, None),
    ],
)
def test_logits_lse_matches_float64(dtype, bias, T, need_lse1, store, split):
    _check_logits_lse(13, 37, 101, dtype, "cpu", bias, T, need_lse1, store, split)


def test_logits_lse_large_logits_finite():
    # |logits| ~ 1e4: the online max + rescaling keeps everything finite and exact (no inf - inf).
    h, w, b = _inputs(9, 19, 67, torch.float32, "cpu", True, scale=3e3)
    l = _ref_logits(h, w, b)
    assert l.abs().max() > 5e3
    buf, lse_T, lse_1 = K.logits_lse(h, w, b, 0.5, True, True, split=2)
    assert torch.isfinite(lse_T).all() and torch.isfinite(lse_1).all()
    assert _rel(lse_T, torch.logsumexp(l / 0.5, dim=1)) < 1e-6
    assert _rel(lse_1, torch.logsumexp(l, dim=1)) < 1e-6
    # the gradient pass on such logits: exponents ≤ ~0, no overflow, no NaN
    s_q = torch.randn(9)
    dH = K.dense_grad(buf, h, w, b, 0.5, lse_T, lse_1, s_q, None, None, None)
    g = s_q.to(F64)[:, None] * torch.softmax(l / 0.5, dim=1)
    assert torch.isfinite(dH).all()
    # one ulp of a 1e4 logit is ~1e-3 in the exponent: that bounds the agreement
    assert _rel(dH, g @ w.to(F64)) < 1e-2


def test_logits_lse_empty_chunk():
    h, w, b = _inputs(0, 8, 11, torch.float32, "cpu", True)
    buf, lse_T, lse_1 = K.logits_lse(h, w, b, 1.0, True, True)
    assert buf.shape == (0, 11) and lse_T.shape == (0,) and lse_1.shape == (0,)


def _sparse_terms(c, V, m, gen, device):
    """ids [c, m] with a repeated id in every other row (scatter-add must sum them), coef [c, m]."""
    ids = torch.stack([torch.randperm(V, generator=gen)[:m] for _ in range(c)])
    ids[::2, -1] = ids[::2, 0]
    coef = torch.randn(c, m, generator=gen) * 0.3
    return ids.to(device), coef.to(device)


def _check_dense_grad(c, d, V, dtype, device, bias, T, with_ce, from_buf, want_dw, want_db, sparse=True, seed=1):
    h, w, b = _inputs(c, d, V, dtype, device, bias, seed=seed)
    gen = torch.Generator(device="cpu").manual_seed(seed + 100)
    s_q = torch.randn(c, generator=gen).to(device)
    s_1 = torch.randn(c, generator=gen).to(device) if with_ce else None
    sp_ids, sp_coef = _sparse_terms(c, V, 6, gen, device) if sparse else (None, None)
    buf, lse_T, lse_1 = K.logits_lse(h, w, b, T, with_ce, from_buf)
    # accumulators start non-zero: dense_grad must add, not overwrite
    dW0 = torch.randn(V, d, generator=gen).to(device) if want_dw else None
    db0 = torch.randn(V, generator=gen).to(device) if (want_db and bias) else None
    dW = dW0.clone() if want_dw else None
    db = db0.clone() if db0 is not None else None
    dH = K.dense_grad(buf, h, w, b, T, lse_T, lse_1, s_q, s_1, dW, db, sp_ids, sp_coef)

    l = _ref_logits(h, w, b)
    g = s_q.to(F64)[:, None] * torch.softmax(l / T, dim=1)        # [c, V]
    if with_ce:
        g = g + s_1.to(F64)[:, None] * torch.softmax(l, dim=1)
    if sparse:
        g = g.scatter_add(1, sp_ids.long(), sp_coef.to(F64))
    hd, wd = h.to(F64), w.to(F64)
    ref_dH, ref_dW, ref_db = g @ wd, g.T @ hd, g.sum(0)
    assert dH.dtype == torch.float32 and dH.shape == (c, d)
    if dtype == torch.float32:
        tol_h = tol_w = 2e-5 if device == "cpu" else 1e-4
    else:
        # what torch gets when it rounds g to the input dtype before the GEMMs (fp32 accumulation)
        g_lp = g.to(dtype).to(F64)
        tol_h = 2 * _rel(g_lp @ wd, ref_dH) + 1e-4
        tol_w = 2 * _rel(g_lp.T @ hd, ref_dW) + 1e-4
    assert _rel(dH, ref_dH) < tol_h
    if want_dw:
        assert _rel(dW - dW0, ref_dW) < tol_w
    if db is not None:
        # the bias gradient is summed from the fp32 g, before any rounding
        assert _rel(db - db0, ref_db) < (2e-5 if device == "cpu" else 1e-4)
    if from_buf and dtype == torch.float32:
        # fp32: buf now holds g (in place)
        assert _rel(buf, g) < (2e-5 if device == "cpu" else 1e-4)


@pytest.mark.parametrize(
    "dtype,bias,T,with_ce,from_buf,want_dw,want_db,sparse",
    [
        (torch.float32, True, 0.7, True, True, True, True, True),
        (torch.float32, False, 1.0, False, True, True, False, False),
        (torch.float32, True, 2.0, True, False, True, True, True),
        (torch.float32, False, 1.0, True, False, False, False, False),
        (torch.bfloat16, True, 1.5, True, True, True, True, True),
        (torch.bfloat16, False, 1.0, False, False, True, False, True),
        (torch.bfloat16, True, 1.0, False, False, True, True, False),
        (torch.float16, True, 0.8, True, True, True, True, True),
        (torch.float16, True, 1.0, False, False, True, True, True),
    ],
)
def test_dense_grad_matches_float64(dtype, bias, T, with_ce, from_buf, want_dw, want_db, sparse):
    _check_dense_grad(13, 37, 101, dtype, "cpu", bias, T, with_ce, from_buf, want_dw, want_db, sparse)


def test_dense_grad_fp16_tiny_scales_neither_underflow_nor_overflow():
    # s_q ~ 1e-6 (a mean over many rows): g ~ 1e-8 would flush to zero in fp16 without the
    # power-of-two rescaling the launcher applies.
    c, d, V = 7, 21, 53
    h, w, b = _inputs(c, d, V, torch.float16, "cpu", False)
    s_q = torch.full((c,), 1e-6)
    buf, lse_T, _ = K.logits_lse(h, w, b, 1.0, False, True)
    dW = torch.zeros(V, d)
    dH = K.dense_grad(buf, h, w, b, 1.0, lse_T, None, s_q, None, dW, None)
    g = 1e-6 * torch.softmax(_ref_logits(h, w, b), dim=1)
    assert _rel(dH, g @ w.to(F64)) < 1e-2
    assert _rel(dW, g.T @ h.to(F64)) < 1e-2
    # tiny dense scale but O(1e-3) sparse terms: the scale must account for them (no fp16 overflow)
    gen = torch.Generator(device="cpu").manual_seed(5)
    ids, coef = _sparse_terms(c, V, 4, gen, "cpu")
    coef = coef * 1e-2
    s_q = torch.full((c,), 1e-9)
    buf, lse_T, _ = K.logits_lse(h, w, b, 1.0, False, True)
    dW = torch.zeros(V, d)
    dH = K.dense_grad(buf, h, w, b, 1.0, lse_T, None, s_q, None, dW, None, ids, coef)
    g = (1e-9 * torch.softmax(_ref_logits(h, w, b), dim=1)).scatter_add(1, ids, coef.to(F64))
    assert torch.isfinite(dH).all() and torch.isfinite(dW).all()
    assert _rel(dH, g @ w.to(F64)) < 1e-2
    assert _rel(dW, g.T @ h.to(F64)) < 1e-2


def test_rejects_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    h, w, b = _inputs(3, 8, 11, torch.float32, "cpu", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        K.logits_lse(h, w, b, 1.0, False, False)


def test_rejects_mixed_dtypes():
    h, w, _ = _inputs(3, 8, 11, torch.float32, "cpu", False)
    with pytest.raises(ValueError, match="dtype"):
        K.logits_lse(h, w.to(torch.bfloat16), None, 1.0, False, False)


# ---------------------------------------------------------------------------------------------
# CUDA: the compiled kernels, bigger ragged shapes, both logits modes, the autotuned configs.
# Parametrized sparingly: every distinct specialization is a Triton compile on the GPU machine.
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,logits_mode",
    [(torch.bfloat16, "triton"), (torch.bfloat16, "cublas"), (torch.float32, "triton"), (torch.float16, "triton")],
)
def test_logits_lse_cuda(dtype, logits_mode, monkeypatch):
    # heuristic config (no autotuning: keeps compile time of the GPU run small)
    monkeypatch.setenv("DISTILL_ENGINE_TRITON_AUTOTUNE", "0")
    monkeypatch.setenv("DISTILL_ENGINE_TRITON_LOGITS", logits_mode)
    _check_logits_lse(301, 517, 5003, dtype, "cuda", True, 0.7, True, True)
    _check_logits_lse(77, 259, 4099, dtype, "cuda", True, 2.0, True, False, split=5)


@pytest.mark.gpu
def test_logits_lse_cuda_large_logits(monkeypatch):
    monkeypatch.setenv("DISTILL_ENGINE_TRITON_AUTOTUNE", "0")
    h, w, b = _inputs(129, 301, 3001, torch.bfloat16, "cuda", True, scale=3e3)
    buf, lse_T, lse_1 = K.logits_lse(h, w, b, 0.5, True, True)
    l = _ref_logits(h, w, b)
    assert torch.isfinite(lse_T).all() and torch.isfinite(lse_1).all()
    assert _rel(lse_T, torch.logsumexp(l / 0.5, dim=1)) < 1e-5
    s_q = torch.randn(129, device="cuda")
    dH = K.dense_grad(buf, h, w, b, 0.5, lse_T, lse_1, s_q, None, None, None)
    assert torch.isfinite(dH).all()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,from_buf",
    [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, True), (torch.float32, False),
     (torch.float16, True)],
)
def test_dense_grad_cuda(dtype, from_buf, monkeypatch):
    monkeypatch.setenv("DISTILL_ENGINE_TRITON_AUTOTUNE", "0")
    _check_dense_grad(301, 517, 5003, dtype, "cuda", True, 0.7, True, from_buf, True, True)


@pytest.mark.gpu
def test_autotuned_bf16_cuda(monkeypatch):
    # The autotuned launch (all candidates compiled and timed, the fastest kept) must agree too.
    # Shapes are multiples of 16 and options match the benchmark's (no bias, no CE), so the compiled
    # kernels are cache hits for benchmarks/bench_distill_loss.py --preset gpu afterwards.
    monkeypatch.setenv("DISTILL_ENGINE_TRITON_AUTOTUNE", "1")
    _check_logits_lse(512, 512, 16384, torch.bfloat16, "cuda", False, 1.0, False, True)
    _check_dense_grad(512, 512, 16384, torch.bfloat16, "cuda", False, 1.0, False, True, True, False)
