"""The C++ CPU kernels of the core op (csrc/cpu/distill_loss.cpp) against float64 dense torch.

distill_logits_lse(h, weight, bias, T, need_lse1) -> (buf = h Wᵀ + b, logsumexp(buf/T), logsumexp(buf))
distill_dense_grad(buf, h, weight, T, lse_T, lse_1, s_q, s_1, dW_acc, db_acc) -> dH; buf := g,
    g = s_q·exp(l/T − lse_T) + s_1·exp(l − lse_1), dW_acc += gᵀ h, db_acc += Σ_rows g.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from distill_engine import _backend
from op_testing import rel_err

if not _backend.cpu_extension_has("distill_logits_lse"):
    pytest.skip("distill_engine._C is not built (run `make build`)", allow_module_level=True)

_C = _backend.cpu_extension()

SHAPES = [(13, 37, 101), (13, 37, 1009), (5, 8, 4099)]  # (c, d, V); V = 4099 spans several 2048-wide blocks
# Vocabulary tile width of the kernels: None = their default (one tile at these sizes); 256 walks
# V = 1009 and 4099 in several tiles (online log-sum-exp across tiles, per-tile GEMMs and column sums).
TILES = [None, 256]


@pytest.fixture(params=TILES, ids=lambda t: f"tile={t}")
def tile_cols(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setenv("DISTILL_ENGINE_CPU_TILE_COLS", str(request.param))
    else:
        monkeypatch.delenv("DISTILL_ENGINE_CPU_TILE_COLS", raising=False)
    return request.param


def _gen(*case) -> torch.Generator:
    """A generator seeded from the test case (stable across runs, different per case)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """The suite's metric (max abs error over max abs reference), without a floor: tiny references count."""
    return rel_err(got, ref, floor=1e-30)


def _case_grid(flag: str):
    """shape × bias × ``flag`` (the kernel's second switch) × temperature × dtype, one parametrize each."""
    axes = [("c,d,V", SHAPES), ("with_bias", [False, True]), (flag, [False, True]), ("T", [1.0, 2.5]),
            ("dtype", [torch.float32, torch.bfloat16])]

    def wrap(fn):
        for name, values in reversed(axes):
            fn = pytest.mark.parametrize(name, values)(fn)
        return fn
    return wrap


def _inputs(c, d, V, dtype, with_bias, gen, scale=1.0):
    h = (torch.randn(c, d, generator=gen) * scale).to(dtype)
    w = (torch.randn(V, d, generator=gen) / math.sqrt(d)).to(dtype)
    # A rising bias moves the row max from block to block, exercising the online rescale.
    b = (torch.randn(V, generator=gen) + torch.linspace(-2, 2, V)).to(dtype) if with_bias else None
    return h, w, b


def _ref_logits(h, w, b):
    l = h.double() @ w.double().T
    return l + b.double() if b is not None else l


def _tol(dtype):
    # Inputs of any dtype are upcast exactly; the kernel then computes in fp32 like for fp32 inputs.
    return 1e-5 if dtype == torch.float32 else 2e-5


@_case_grid("need_lse1")
def test_logits_lse_matches_float64(c, d, V, with_bias, need_lse1, T, dtype, tile_cols):
    gen = _gen(c, d, V, with_bias, need_lse1, T, dtype)
    h, w, b = _inputs(c, d, V, dtype, with_bias, gen, scale=3.0)
    buf, lse_t, lse_1 = _C.distill_logits_lse(h, w, b, T, need_lse1)
    assert buf.dtype == lse_t.dtype == lse_1.dtype == torch.float32
    assert buf.shape == (c, V) and lse_t.shape == (c,)
    l = _ref_logits(h, w, b)
    assert _rel_err(buf, l) < _tol(dtype)
    torch.testing.assert_close(lse_t.double(), torch.logsumexp(l / T, dim=1), rtol=_tol(dtype), atol=_tol(dtype))
    if need_lse1:
        assert lse_1.shape == (c,)
        torch.testing.assert_close(lse_1.double(), torch.logsumexp(l, dim=1), rtol=_tol(dtype), atol=_tol(dtype))
    else:
        assert lse_1.numel() == 0


def test_logits_lse_accepts_fp32_weight_copy_and_fp16(monkeypatch):
    gen = torch.Generator().manual_seed(7)
    h, w, b = _inputs(13, 37, 1009, torch.bfloat16, True, gen)
    got = _C.distill_logits_lse(h, w.float(), b, 2.5, True)  # the driver's fp32 copy of a bf16 weight
    want = _C.distill_logits_lse(h, w, b, 2.5, True)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    h16, w16, b16 = h.half(), w.half(), b.half()  # fp16 inputs, walked in several tiles
    monkeypatch.setenv("DISTILL_ENGINE_CPU_TILE_COLS", "256")
    buf, lse_t, lse_1 = _C.distill_logits_lse(h16, w16, b16, 1.0, True)
    l = _ref_logits(h16, w16, b16)
    assert _rel_err(buf, l) < 5e-5
    torch.testing.assert_close(lse_t.double(), torch.logsumexp(l, dim=1), rtol=5e-5, atol=5e-5)
    torch.testing.assert_close(lse_1, lse_t)


def test_strided_inputs_are_accepted():
    """A transposed-storage weight (e.g. tied to a [d, V] matrix) and a strided h give the same results."""
    gen = torch.Generator().manual_seed(5)
    c, d, V = 13, 37, 1009
    h = torch.randn(d, c, generator=gen).T  # [c, d], not contiguous
    w = torch.randn(d, V, generator=gen).T  # [V, d], not contiguous
    s_q = torch.randn(c, generator=gen)
    outs = []
    for hh, ww in ((h, w), (h.contiguous(), w.contiguous())):
        buf, lse_t, _ = _C.distill_logits_lse(hh, ww, None, 2.5, False)
        dW = torch.zeros(V, d)
        dH = _C.distill_dense_grad(buf, hh, ww, 2.5, lse_t, None, s_q, None, dW, None)
        outs.append((lse_t, buf, dH, dW))
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def _ref_grad(l, h, w, T, s_q, s_1, dW0, db0):
    lse_t = torch.logsumexp(l / T, dim=1, keepdim=True)
    g = s_q.double()[:, None] * torch.exp(l / T - lse_t)
    if s_1 is not None:
        g = g + s_1.double()[:, None] * torch.exp(l - torch.logsumexp(l, dim=1, keepdim=True))
    dH = g @ w.double()
    dW = dW0.double() + g.T @ h.double()
    db = db0.double() + g.sum(0) if db0 is not None else None
    return g, dH, dW, db


@_case_grid("with_ce")
def test_dense_grad_matches_float64(c, d, V, with_bias, with_ce, T, dtype, tile_cols):
    gen = _gen(c, d, V, with_bias, with_ce, T, dtype, "g")
    h, w, b = _inputs(c, d, V, dtype, with_bias, gen, scale=3.0)
    buf, lse_t, lse_1 = _C.distill_logits_lse(h, w, b, T, with_ce)
    s_q = torch.randn(c, generator=gen)  # signed: the dense scale is α·T·(a_rest − c̄)
    s_1 = torch.rand(c, generator=gen) if with_ce else None
    l = _ref_logits(h, w, b)
    g_ref, dH_ref, inc_w, inc_b = _ref_grad(l, h, w, T, s_q, s_1, torch.zeros(V, d), torch.zeros(V))
    # Accumulators start non-zero (the kernel must add, not overwrite), at the increments' scale so the
    # fp32 rounding of the sum does not hide errors in the increment.
    dW = torch.randn(V, d, generator=gen) * inc_w.abs().max().float()
    db = torch.randn(V, generator=gen) * inc_b.abs().max().float() if with_bias else None
    dW0, db0 = dW.clone(), (db.clone() if db is not None else None)
    dH = _C.distill_dense_grad(buf, h, w, T, lse_t, lse_1 if with_ce else None, s_q, s_1, dW, db)
    tol = _tol(dtype)
    assert dH.dtype == torch.float32 and dH.shape == (c, d)
    assert _rel_err(buf, g_ref) < tol
    assert _rel_err(dH, dH_ref) < tol
    assert _rel_err(dW.double() - dW0.double(), inc_w) < tol
    if with_bias:
        assert _rel_err(db.double() - db0.double(), inc_b) < tol


def test_dense_grad_two_threads_column_sums(tile_cols):
    """The per-thread column-sum rows for db are reduced correctly when two threads split the rows."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(3)
        c, d, V = 13, 16, 4099
        h, w, b = _inputs(c, d, V, torch.float32, True, gen)
        buf, lse_t, lse_1 = _C.distill_logits_lse(h, w, b, 2.5, True)
        s_q, s_1 = torch.randn(c, generator=gen), torch.rand(c, generator=gen)
        dW, db = torch.zeros(V, d), torch.zeros(V)
        dH = _C.distill_dense_grad(buf, h, w, 2.5, lse_t, lse_1, s_q, s_1, dW, db)
    finally:
        torch.set_num_threads(old)
    g_ref, dH_ref, dW_ref, db_ref = _ref_grad(_ref_logits(h, w, b), h, w, 2.5, s_q, s_1, torch.zeros(V, d), torch.zeros(V))
    assert _rel_err(db, db_ref) < 2e-5
    assert _rel_err(dH, dH_ref) < 2e-5
    assert _rel_err(dW, dW_ref) < 2e-5


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_extreme_logits_stay_finite(T, tile_cols):
    """Logits of magnitude ~1e4: log-sum-exps and g finite, g's rows sum to s_q + s_1."""
    gen = torch.Generator().manual_seed(11)
    c, d, V = 13, 37, 1009
    h, w, b = _inputs(c, d, V, torch.float32, True, gen)
    h = h * (1e4 / (h @ w.T).abs().amax(dim=1, keepdim=True))  # every row reaches |l| = 1e4
    buf, lse_t, lse_1 = _C.distill_logits_lse(h, w, b, T, True)
    assert buf.abs().max() > 5e3
    assert torch.isfinite(lse_t).all() and torch.isfinite(lse_1).all()
    l = buf.double()  # the elementwise math is checked against the kernel's own fp32 logits
    torch.testing.assert_close(lse_t.double(), torch.logsumexp(l / T, dim=1), rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(lse_1.double(), torch.logsumexp(l, dim=1), rtol=1e-6, atol=1e-3)
    s_q, s_1 = torch.randn(c, generator=gen), torch.rand(c, generator=gen)
    dW, db = torch.zeros(V, d), torch.zeros(V)
    dH = _C.distill_dense_grad(buf, h, w, T, lse_t, lse_1, s_q, s_1, dW, db)
    for t in (buf, dH, dW, db):
        assert torch.isfinite(t).all()
    # fp32 lse of a 1e4-sized logit carries ~1e-3 absolute rounding, so row sums hold to ~1e-3 relative.
    torch.testing.assert_close(buf.double().sum(1), (s_q + s_1).double(), rtol=3e-3, atol=3e-3)


def test_empty_chunk():
    w = torch.randn(11, 4)
    buf, lse_t, lse_1 = _C.distill_logits_lse(torch.randn(0, 4), w, None, 1.0, True)
    assert buf.shape == (0, 11) and lse_t.shape == (0,) and lse_1.shape == (0,)
    dW = torch.zeros(11, 4)
    dH = _C.distill_dense_grad(buf, torch.randn(0, 4), w, 1.0, lse_t, lse_1, torch.zeros(0), torch.zeros(0), dW, None)
    assert dH.shape == (0, 4) and not dW.any()


def test_argument_checks():
    h, w = torch.randn(3, 4), torch.randn(7, 4)
    with pytest.raises(RuntimeError, match="share d"):
        _C.distill_logits_lse(h, torch.randn(7, 5), None, 1.0, False)
    with pytest.raises(RuntimeError, match="bias"):
        _C.distill_logits_lse(h, w, torch.randn(6), 1.0, False)
    with pytest.raises(RuntimeError, match="temperature"):
        _C.distill_logits_lse(h, w, None, 0.0, False)
    with pytest.raises(RuntimeError, match="h must be"):
        _C.distill_logits_lse(h.long(), w, None, 1.0, False)
    buf, lse_t, lse_1 = _C.distill_logits_lse(h, w, None, 1.0, True)
    s, dW = torch.zeros(3), torch.zeros(7, 4)
    with pytest.raises(RuntimeError, match="buf"):
        _C.distill_dense_grad(torch.zeros(3, 8), h, w, 1.0, lse_t, None, s, None, dW, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        _C.distill_dense_grad(torch.zeros(7, 3).T, h, w, 1.0, lse_t, None, s, None, dW, None)
    with pytest.raises(RuntimeError, match="dW_acc"):
        _C.distill_dense_grad(buf, h, w, 1.0, lse_t, None, s, None, dW.double(), None)
    with pytest.raises(RuntimeError, match="lse_1"):
        _C.distill_dense_grad(buf, h, w, 1.0, lse_t, None, s, s, dW, None)
    with pytest.raises(RuntimeError, match="db_acc"):
        _C.distill_dense_grad(buf, h, w, 1.0, lse_t, None, s, None, dW, torch.zeros(6))
