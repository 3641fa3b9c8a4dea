"""token_relation_loss against the float64 dense oracle on every backend: odd L, several key/query tiles,
padded rows, causal on/off, every reduction, fp32 and bf16, strided inputs, both gradients, bad input."""
import pytest
import torch

from distill_engine.ops.token_relation import token_relation_loss
from distill_engine.reference.token_relation import dense_token_relation_loss, naive_token_relation_loss
from op_testing import TOL, backends, rel_err, strided

B, L, DS, DT, H = 2, 37, 12, 18, 3  # odd L, different widths (d_hs = 4, d_ht = 6)


BACKENDS = backends("token_relation_loss")


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Small tiles so L = 37 spans several query and key tiles (the last ones partial) on every backend."""
    monkeypatch.setenv("DISTILL_ENGINE_RELATION_TILE", "16")
    monkeypatch.setenv("DISTILL_ENGINE_TOKEN_RELATION_CHUNK_BYTES", str(4 * H * L * 6 * 5))  # 5 query rows a chunk


def _inputs(dtype, seed=0, strided_views=False):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(B, L, DS, generator=g)
    T = 0.6 * torch.cat([S, S[..., :DT - DS]], -1) + 0.8 * torch.randn(B, L, DT, generator=g)  # correlated
    S, T = 1.5 * S, 1.5 * T
    S, T = S.to(dtype), T.to(dtype)
    if strided_views:  # non-contiguous views: every other feature of a wider tensor; (L, d) transposed storage
        S, T = strided(S, "cols"), strided(T, "t")
    return S.requires_grad_(), T.requires_grad_()


def _mask(kind):
    if kind is None:
        return None
    m = torch.ones(B, L, dtype=torch.bool)
    m[0, 30:] = False  # right padding
    m[1, :4] = False  # left padding
    m[1, 20] = False  # a hole
    return m


def _check(backend, dtype, causal, mask, reduction, strided_views=False, seed=0):
    S, T = _inputs(dtype, seed, strided_views)
    out = token_relation_loss(S, T, relation_heads=H, mask=mask, causal=causal, reduction=reduction,
                              backend=backend)
    ref = dense_token_relation_loss(S, T, relation_heads=H, mask=mask, causal=causal, reduction=reduction)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    go = torch.rand(out.shape, generator=torch.Generator().manual_seed(seed + 7)) + 0.5
    gS, gT = torch.autograd.grad(out, (S, T), go)
    rS, rT = torch.autograd.grad(ref, (S, T), go.double())
    tol = TOL[dtype]
    assert rel_err(out, ref) < tol, (rel_err(out, ref), out, ref)
    assert gS.dtype == S.dtype and gT.dtype == T.dtype
    assert rel_err(gS, rS) < tol, rel_err(gS, rS)
    assert rel_err(gT, rT) < tol, rel_err(gT, rT)
    if mask is not None:  # padded positions get exactly no gradient
        assert float(gS[~mask].abs().max()) == 0.0 and float(gT[~mask].abs().max()) == 0.0
    if reduction != "none":  # the inputs differ: a non-trivial loss is being compared
        assert float(ref.detach()) > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,masked,reduction", [
    (True, None, "mean"), (True, "pad", "mean"), (False, "pad", "sum"), (False, None, "none"), (True, "pad", "none"),
])
def test_fp32_matches_oracle(backend, causal, masked, reduction):
    _check(backend, torch.float32, causal, _mask(masked), reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_bf16_and_strided(backend, causal):
    _check(backend, torch.bfloat16, causal, _mask("pad"), "mean", seed=3)
    _check(backend, torch.float32, causal, strided(_mask("pad")), "mean", strided_views=True, seed=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_student_gradient_and_forward_only(backend):
    S, T = _inputs(torch.float32, 5)
    T = T.detach()
    m = _mask("pad")
    out = token_relation_loss(S, T, relation_heads=H, mask=m, backend=backend)
    (gS,) = torch.autograd.grad(out, (S,))
    ref = dense_token_relation_loss(S, T, relation_heads=H, mask=m)
    (rS,) = torch.autograd.grad(ref, (S,))
    assert rel_err(gS, rS) < 2e-5
    with torch.no_grad():
        out2 = token_relation_loss(S, T, relation_heads=H, mask=m, backend=backend)
    assert rel_err(out2, ref) < 2e-5


def test_identical_inputs_give_zero_and_naive_agrees():
    S, _ = _inputs(torch.float32, 6)
    out = token_relation_loss(S, S.detach() * 1.0, relation_heads=H, backend="torch")
    assert abs(float(out.detach())) < 1e-6
    S, T = _inputs(torch.float32, 7)
    m = _mask("pad")
    a = naive_token_relation_loss(S, T, relation_heads=H, mask=m)
    r = dense_token_relation_loss(S, T, relation_heads=H, mask=m)
    assert rel_err(a, r) < 2e-5


def test_all_rows_padded_is_zero():
    S, T = _inputs(torch.float32, 8)
    m = torch.zeros(B, L, dtype=torch.bool)
    out = token_relation_loss(S, T, relation_heads=H, mask=m, backend="torch")
    assert float(out.detach()) == 0.0
    (gS,) = torch.autograd.grad(out, (S,))
    assert float(gS.abs().max()) == 0.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(relation_heads=5), "relation_heads=5 does not divide"),
    (dict(relation_heads=0), "relation_heads must be a positive int"),
    (dict(relation_heads=H, reduction="avg"), "reduction must be one of"),
    (dict(relation_heads=H, backend="gpu"), "backend must be one of"),
    (dict(relation_heads=H, mask=torch.ones(B, L)), "mask must have dtype"),
    (dict(relation_heads=H, mask=torch.ones(B, L + 1, dtype=torch.bool)), "mask has shape"),
    (dict(relation_heads=H, causal="yes"), "causal must be a bool"),
])
def test_bad_input_raises_value_error(kwargs, match):
    S, T = _inputs(torch.float32)
    with pytest.raises(ValueError, match=match):
        token_relation_loss(S, T, **kwargs)


def test_bad_shapes_and_nonfinite():
    S, T = _inputs(torch.float32)
    with pytest.raises(ValueError, match="teacher_states has shape"):
        token_relation_loss(S, T[:, :-1], relation_heads=H)
    with pytest.raises(ValueError, match="student_states must have 3 dimensions"):
        token_relation_loss(S[0], T[0], relation_heads=H)
    bad = T.detach().clone()
    bad[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"teacher_states contains non-finite values \(first at \[b, l, d\] = \[0, 3, 1\]"):
        token_relation_loss(S, bad, relation_heads=H)
    with pytest.raises(ValueError, match="student_states contains non-finite"):
        token_relation_loss(S.detach() * float("inf"), T, relation_heads=H)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("strided_views", [False, True])
def test_triton_on_cuda(dtype, causal, strided_views, monkeypatch):
    """The compiled Triton kernels (not the interpreter) against the oracle, with the GPU tile sizes; also with
    non-contiguous views of both states and the mask."""
    monkeypatch.delenv("DISTILL_ENGINE_RELATION_TILE", raising=False)
    g = torch.Generator().manual_seed(9)
    Bc, Lc, H2 = 2, 133, 4  # L spans several 64-row tiles, the last partial
    S = torch.randn(Bc, Lc, 4 * 24, generator=g)
    T = torch.cat([S, torch.randn(Bc, Lc, 4 * 8, generator=g)], -1)  # d_hs = 24, d_ht = 32
    m = torch.ones(Bc, Lc, dtype=torch.bool)
    m[0, 100:] = False
    S, T, m = S.to("cuda", dtype), T.to("cuda", dtype), m.cuda()
    if strided_views:
        S, T, m = strided(S, "cols"), strided(T, "t"), strided(m)
    S, T = S.requires_grad_(), T.requires_grad_()
    out = token_relation_loss(S, T, relation_heads=H2, mask=m, causal=causal, backend="triton")
    ref = dense_token_relation_loss(S, T, relation_heads=H2, mask=m, causal=causal)
    gS, gT = torch.autograd.grad(out, (S, T))
    rS, rT = torch.autograd.grad(ref, (S, T))
    tol = TOL[dtype]
    assert rel_err(out, ref) < tol and rel_err(gS, rS) < tol and rel_err(gT, rT) < tol
