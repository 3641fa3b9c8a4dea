"""fused_projection_loss against the float64 dense oracle: every backend, kind, reduction and dtype,
odd shapes, several row chunks, masks, zero-norm rows, and every gradient (h_s, P, b)."""
import itertools
import zlib

import pytest
import torch

from distill_engine import _backend
from distill_engine.ops import projection_loss as PL
from distill_engine.ops.projection_loss import fused_projection_loss
from distill_engine.reference.projection_loss import dense_projection_loss
from op_testing import TOL, backends, rel_err, strided

N, DS, DT = 13, 37, 53  # odd, prime-ish: not multiples of any block size


BACKENDS = backends("fused_projection_loss")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Four rows per chunk: N = 13 then runs 4 chunks, the last one partial."""
    monkeypatch.setattr(PL, "_chunk_rows", lambda n, d_t, dev: 4)


def _inputs(dtype, bias, seed=0, lead=(N,), ds=DS, dt=DT):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, ds, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(dt, ds, generator=g) / ds**0.5).to(dtype).requires_grad_()
    b = (0.3 * torch.randn(dt, generator=g)).to(dtype).requires_grad_() if bias else None
    # teacher correlated with the projection so cosines are not all ~0
    t = (0.7 * (h.detach().float() @ W.detach().float().t()) + 0.5 * torch.randn(*lead, dt, generator=g)).to(dtype)
    return h, W, b, t


def _check(backend, h, W, b, t, kind, reduction, mask, dtype, seed=1):
    out = fused_projection_loss(h, W, t, proj_bias=b, kind=kind, mask=mask, reduction=reduction, backend=backend)
    assert out.dtype == torch.float32
    ref = dense_projection_loss(h, W, t, proj_bias=b, kind=kind, mask=mask, reduction=reduction)
    assert out.shape == ref.shape
    leaves = [x for x in (h, W, b) if x is not None]
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    grads = torch.autograd.grad(out, leaves, go)
    ref_grads = torch.autograd.grad(ref, leaves, go.double())
    tol = TOL[dtype]
    assert rel_err(out, ref) <= tol, (float(out.sum()), float(ref.sum()))
    for name, gx, gr, leaf in zip(("h", "W", "b"), grads, ref_grads, leaves):
        assert gx.dtype == leaf.dtype and gx.shape == leaf.shape
        assert torch.isfinite(gx).all()
        assert rel_err(gx, gr) <= tol, name
    return out, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias,masked", [(False, False), (True, True), (True, False)], ids=["plain", "bias+mask", "bias"])
def test_matches_dense(backend, kind, reduction, dtype, bias, masked):
    seed = zlib.crc32(f"{kind}-{reduction}-{bias}-{masked}".encode()) % 1000
    h, W, b, t = _inputs(dtype, bias, seed=seed)
    mask = None
    if masked:
        mask = torch.rand(N, generator=torch.Generator().manual_seed(seed)) > 0.4
        mask[0], mask[5] = True, False  # kept and dropped rows in the first two chunks
    _check(backend, h, W, b, t, kind, reduction, mask, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,reduction", [("mse", "mean"), ("cosine", "none")])
def test_strided_inputs(backend, kind, reduction):
    """Non-contiguous views of every argument: [B, T, d] student states with stride-2 features, a column-major
    projection, every other entry of the bias, row-strided teacher states and a stride-2 mask."""
    h, W, b, t = _inputs(torch.float32, True, seed=15, lead=(2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 5:] = False
    hs, Ws, bs = (strided(x, how).requires_grad_() for x, how in ((h, "cols"), (W, "t"), (b, "cols")))
    _check(backend, hs, Ws, bs, strided(t, "rows"), kind, reduction, strided(mask), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_float16(backend, kind):
    h, W, b, t = _inputs(torch.float16, True, seed=13)
    mask = torch.arange(N) % 3 != 1
    _check(backend, h, W, b, t, kind, "mean", mask, torch.float16)
    _check(backend, h, W, b, t, kind, "none", None, torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_single_chunk(backend, monkeypatch):
    # [B, T, d] inputs with a [B, T] mask, and the default (one-chunk) sizing
    monkeypatch.undo()
    h, W, b, t = _inputs(torch.float32, True, seed=3, lead=(2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False  # right padding
    for kind in ("mse", "cosine"):
        out, _ = _check(backend, h, W, b, t, kind, "none", mask, torch.float32)
        assert out.shape == (2, 7) and bool((out[1, 4:] == 0).all())
        _check(backend, h, W, b, t, kind, "mean", mask, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_mask_all_false_gives_zero_and_zero_grads(backend, reduction, kind):
    h, W, b, t = _inputs(torch.float32, True, seed=4)
    mask = torch.zeros(N, dtype=torch.bool)
    out = fused_projection_loss(h, W, t, proj_bias=b, kind=kind, mask=mask, reduction=reduction, backend=backend)
    assert bool((out == 0).all())
    grads = torch.autograd.grad(out.sum(), [h, W, b])
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend):
    h, W, b, t = _inputs(torch.float32, True, lead=(0,))
    out = fused_projection_loss(h, W, t, proj_bias=b, backend=backend)
    assert float(out.detach()) == 0.0
    gh, gW, gb = torch.autograd.grad(out, [h, W, b])
    assert gh.shape == (0, DS) and not gW.any() and not gb.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cosine_zero_norm_rows(backend, dtype, reduction):
    h, W, _, t = _inputs(dtype, False, seed=5)
    with torch.no_grad():
        h[2].zero_()  # y = P·0 = 0 (no bias)
        t[7].zero_()  # zero teacher row
        h[9].zero_()
        t[9].zero_()  # both
    out, grads = _check(backend, h, W, None, t, "cosine", reduction, None, dtype)
    if reduction == "none":
        assert torch.allclose(out[[2, 7, 9]], torch.ones(3))
    gh = grads[0]
    assert bool((gh[[2, 7, 9]] == 0).all())  # a zero-norm row has a zero gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_but_nonzero_norm_has_finite_gradient(backend):
    # a student row just above the zero-norm threshold: 1/||y|| is huge but every gradient stays finite
    h, W, _, t = _inputs(torch.float32, False, seed=6)
    with torch.no_grad():
        h[3].mul_(1e-13)
    out = fused_projection_loss(h, W, t, kind="cosine", backend=backend)
    grads = torch.autograd.grad(out, [h, W])
    assert torch.isfinite(out) and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_upstream_gradient_scaling_and_partial_requires_grad(backend, kind):
    h, W, b, t = _inputs(torch.float32, True, seed=7)
    out = fused_projection_loss(h, W, t, proj_bias=b, kind=kind, backend=backend)
    g1 = torch.autograd.grad(out, [h, W, b])
    out3 = fused_projection_loss(h, W, t, proj_bias=b, kind=kind, backend=backend)
    g3 = torch.autograd.grad(3.0 * out3, [h, W, b])
    for a, c in zip(g1, g3):
        torch.testing.assert_close(3.0 * a, c, rtol=1e-5, atol=1e-7)
    # only the projection trains (frozen student states, as in HiddenStateDistiller with a frozen student)
    h2 = h.detach()
    out = fused_projection_loss(h2, W, t, proj_bias=b, kind=kind, backend=backend)
    gW, gb = torch.autograd.grad(out, [W, b])
    torch.testing.assert_close(gW, g1[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gb, g1[2], rtol=1e-5, atol=1e-7)
    # no_grad: forward only, same value
    with torch.no_grad():
        out_ng = fused_projection_loss(h, W, t, proj_bias=b, kind=kind, backend=backend)
    torch.testing.assert_close(out_ng, out.detach(), rtol=1e-6, atol=1e-7)


def test_backends_agree_and_auto_resolves():
    h, W, b, t = _inputs(torch.float32, True, seed=8)
    auto = fused_projection_loss(h, W, t, proj_bias=b, backend="auto")
    ref = fused_projection_loss(h, W, t, proj_bias=b, backend="torch")
    torch.testing.assert_close(auto, ref, rtol=1e-5, atol=1e-6)
    want = "cpu" if _backend.cpu_extension_has("projection_chunk") else "torch"
    assert _backend.resolve_backend("auto", h.device, "fused_projection_loss", "projection_chunk") == want


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy computes inf·0
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_teacher_raises_with_row(backend):
    h, W, b, t = _inputs(torch.float32, True, seed=9)
    t = t.clone()
    t[6, 11] = float("nan")
    t[10, 0] = float("inf")
    with pytest.raises(ValueError, match=r"teacher_hidden contains non-finite values \(first at row 6"):
        fused_projection_loss(h, W, t, proj_bias=b, backend=backend)
    with pytest.raises(ValueError, match="row 6"):
        with torch.no_grad():
            fused_projection_loss(h, W, t, kind="cosine", backend=backend)
    mask = torch.ones(N, dtype=torch.bool)
    mask[6] = False
    with pytest.raises(ValueError, match="row 10"):
        fused_projection_loss(h, W, t, proj_bias=b, mask=mask, backend=backend)
    mask[10] = False  # masked rows are never read
    out = fused_projection_loss(h, W, t, proj_bias=b, mask=mask, backend=backend)
    assert torch.isfinite(out)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_student_raises(backend):
    h, W, b, t = _inputs(torch.float32, True, seed=10)
    h2 = h.detach().clone()
    h2[4, 0] = float("nan")
    with pytest.raises(ValueError, match="row 4 is not finite"):
        fused_projection_loss(h2, W, t, proj_bias=b, backend=backend)


def test_bad_arguments_raise():
    h, W, b, t = _inputs(torch.float32, True)
    call = lambda **kw: fused_projection_loss(kw.pop("h", h), kw.pop("W", W), kw.pop("t", t), **kw)  # noqa: E731
    cases = [
        (dict(kind="kl"), "kind"),
        (dict(reduction="avg"), "reduction"),
        (dict(backend="cuda"), "backend"),
        (dict(h=h[:, :-1]), "proj_weight"),  # d_s mismatch
        (dict(W=W[:-1]), "teacher_hidden"),  # d_t mismatch
        (dict(t=t[:-1]), "teacher_hidden"),  # N mismatch
        (dict(h=h[0]), "student_hidden"),  # 1-D
        (dict(W=W.double()), "proj_weight"),
        (dict(t=t.bfloat16()), "teacher_hidden"),
        (dict(h=h.double(), W=W.double(), t=t.double()), "student_hidden"),  # float64 unsupported
        (dict(h=h.long()), "student_hidden"),
        (dict(proj_bias=b[:-1]), "proj_bias"),
        (dict(proj_bias=b.bfloat16()), "proj_bias"),
        (dict(mask=torch.ones(N)), "mask"),  # not bool
        (dict(mask=torch.ones(N + 1, dtype=torch.bool)), "mask"),
        (dict(mask=torch.ones(N, 1, dtype=torch.bool)), "mask"),
        (dict(t=[[0.0]]), "teacher_hidden"),
    ]
    for kw, name in cases:
        with pytest.raises(ValueError, match=name):
            call(**kw)


def test_bad_device_raises():
    h, W, b, t = _inputs(torch.float32, True)
    with pytest.raises(ValueError, match="proj_weight is on meta"):
        fused_projection_loss(h, W.detach().to("meta"), t)
    with pytest.raises(ValueError, match="teacher_hidden is on meta"):
        fused_projection_loss(h, W, t.to("meta"))


def test_options_dataclass_is_frozen_and_checked():
    opts = PL.ProjectionLossOptions(kind="cosine", reduction="sum", backend="torch", chunk_rows=8)
    with pytest.raises(Exception):
        opts.kind = "mse"  # frozen
    for bad in (dict(kind="x"), dict(reduction="x"), dict(backend="cuda"), dict(chunk_rows=0)):
        with pytest.raises(ValueError):
            PL.ProjectionLossOptions(**bad).check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_count_does_not_change_the_result(backend, monkeypatch):
    h, W, b, t = _inputs(torch.float32, True, seed=11)
    results = []
    for rows in (1, 5, 64):
        monkeypatch.setattr(PL, "_chunk_rows", lambda n, d_t, dev, r=rows: r)
        out = fused_projection_loss(h, W, t, proj_bias=b, kind="cosine", backend=backend)
        results.append((out,) + torch.autograd.grad(out, [h, W, b]))
    for other in results[1:]:
        for a, c in zip(results[0], other):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("kind,reduction,dtype", list(itertools.product(
    ["mse", "cosine"], ["mean", "none"], [torch.float32, torch.bfloat16])))
def test_triton_cuda_matches_dense(kind, reduction, dtype, monkeypatch):
    monkeypatch.undo()
    g = torch.Generator().manual_seed(12)
    n, ds, dt = 1000, 257, 1031
    h = torch.randn(n, ds, generator=g).to("cuda", dtype).requires_grad_()
    W = (torch.randn(dt, ds, generator=g) / ds**0.5).to("cuda", dtype).requires_grad_()
    b = (0.3 * torch.randn(dt, generator=g)).to("cuda", dtype).requires_grad_()
    t = (0.7 * (h.detach().float() @ W.detach().float().t())).to(dtype) + torch.randn(n, dt, device="cuda").to(dtype)
    mask = torch.rand(n, device="cuda") > 0.2
    _check("triton", h, W, b, t, kind, reduction, mask, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_triton_cuda_strided(kind, monkeypatch):
    monkeypatch.undo()
    h, W, b, t = _inputs(torch.float32, True, seed=16, lead=(4, 250), ds=257, dt=1031)
    mask = torch.rand(4, 250, generator=torch.Generator().manual_seed(16)) > 0.2
    hs, Ws, bs = (strided(x.detach().cuda(), how).requires_grad_() for x, how in ((h, "cols"), (W, "t"), (b, "cols")))
    _check("triton", hs, Ws, bs, strided(t.cuda(), "rows"), kind, "mean", strided(mask.cuda()), torch.float32)


def test_second_backward_raises_clearly():
    h, W, b, t = _inputs(torch.float32, True, seed=14)
    out = fused_projection_loss(h, W, t, proj_bias=b, backend="torch")
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        out.backward()
    out = fused_projection_loss(h, W, t, proj_bias=b, reduction="none", backend="torch")
    g1 = torch.autograd.grad(out.sum(), [W], retain_graph=True)[0]
    g2 = torch.autograd.grad(out.sum(), [W])[0]  # reduction="none" recomputes: twice is fine
    torch.testing.assert_close(g1, g2)
