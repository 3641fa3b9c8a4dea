"""Logit scaling and soft-capping in fused_distill_loss and teacher_targets (issue 12), every backend against
the float64 dense oracle: odd shapes, prime V, every divergence and tail, CE term, bias, ignored rows,
strided views of every tensor, both gradients, fp32 and bf16; Triton under TRITON_INTERPRET=1 (tests/conftest.py)."""
import pytest
import torch

from distill_engine.ops.distill_loss import fused_distill_loss
from distill_engine.ops.teacher_targets import teacher_targets
from distill_engine.reference.distill_loss import dense_reference_grads
from distill_engine.reference.teacher_targets import dense_teacher_logprobs
from op_testing import assert_close_to_ref, backends, strided

BACKENDS = backends("fused_distill_loss")
TT_BACKENDS = backends("teacher_targets")
N, D, V, K = 13, 24, 101, 5  # odd rows, odd d, prime V
CASES = [  # (divergence, beta, tail, ce_weight, temperature)
    ("forward_kl", 0.5, "bucket", 0.0, 1.0),
    ("reverse_kl", 0.5, "bucket", 0.3, 2.0),
    ("jsd", 0.3, "bucket", 0.0, 1.5),
    ("forward_kl", 0.5, "renormalize", 0.4, 1.0),
    ("jsd", 0.7, "renormalize", 0.0, 0.7),
]
TRANSFORMS = [(None, 3.0), (0.5, 2.0), (2.5, None), (1.3, 30.0)]  # (logit_scale, softcap)
# every case with two transforms, every transform with every divergence/tail family of cases (suite time)
COMBOS = [(case, TRANSFORMS[(i + j) % 4]) for i, case in enumerate(CASES) for j in (0, 2)]


def _inputs(dtype, seed, bias=True, strided_views=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g) * 2.0
    w = torch.randn(V, D, generator=g)
    b = torch.randn(V, generator=g) if bias else None
    full = torch.log_softmax(torch.randn(N, V, generator=g) * 3, dim=1)
    lp, ids = full.topk(K, dim=1)
    ids = ids.to(torch.int32)
    ids[2, 3:] = -1  # empty slots
    lp[2, 3:] = float("-inf")
    ids[4] = -1  # a row without targets
    lp[4] = float("-inf")
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[1, 7]] = -100  # ignored rows
    rest = torch.log1p(-lp.exp().nansum(1).clamp(max=1 - 1e-6)).float()
    h, w, b = h.to(dtype), w.to(dtype), (b.to(dtype) if b is not None else None)
    if strided_views:  # the same values as non-contiguous views of every tensor
        return (strided(h), strided(w, "t"), strided(b), strided(ids), strided(lp, "rows"), strided(labels),
                strided(rest))
    return h, w, b, ids, lp, labels, rest


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,transform", COMBOS)
def test_loss_and_grads_match_dense_oracle_fp32(backend, case, transform):
    div, beta, tail, ce, T = case
    s, c = transform
    h, w, b, ids, lp, labels, rest = _inputs(torch.float32, seed=COMBOS.index((case, transform)))
    kw = dict(labels=labels, divergence=div, beta=beta, tail=tail, ce_weight=ce, temperature=T,
              logit_scale=s, softcap=c, teacher_rest_logprob=rest if tail == "bucket" else None)
    for reduction in ("mean", "none"):
        hh, ww, bb = (x.detach().requires_grad_(True) for x in (h, w, b))  # strides kept
        loss = fused_distill_loss(hh, ww, ids, lp, bias=bb, reduction=reduction, backend=backend,
                                  chunk_rows=4, **kw)
        loss.sum().backward()
        ref, dh, dw, db = dense_reference_grads(h, w, ids, lp, bias=b, reduction=reduction, **kw)
        for got, want in ((loss, ref), (hh.grad, dh), (ww.grad, dw), (bb.grad, db)):
            assert_close_to_ref(got, want, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", [(0.7, 4.0), (0.7, None), (0.25, None)])  # buffer path ×2, folded scale
def test_bf16_transforms_match_oracle(backend, transform):
    h, w, b, ids, lp, labels, rest = _inputs(torch.bfloat16, seed=3)
    kw = dict(labels=labels, divergence="forward_kl", ce_weight=0.2, temperature=1.0, logit_scale=transform[0],
              softcap=transform[1], teacher_rest_logprob=rest)
    hh, ww, bb = (x.detach().requires_grad_(True) for x in (h, w, b))  # strides kept
    loss = fused_distill_loss(hh, ww, ids, lp, bias=bb, backend=backend, **kw)
    loss.backward()
    # the oracle on the same bf16 values (upcast), so only the op's own precision is measured
    ref, dh, dw, db = dense_reference_grads(h.float(), w.float(), ids, lp, bias=b.float(), **kw)
    for got, want in ((loss, ref), (hh.grad, dh), (ww.grad, dw), (bb.grad, db)):
        assert_close_to_ref(got, want, torch.bfloat16)


def test_softcap_changes_the_loss_and_transform_args_are_checked():
    h, w, b, ids, lp, labels, rest = _inputs(torch.float32, seed=5)
    plain = fused_distill_loss(h, w, ids, lp, bias=b, backend="torch")
    capped = fused_distill_loss(h, w, ids, lp, bias=b, backend="torch", softcap=2.0)
    assert not torch.allclose(plain, capped)
    import distill_engine as de

    mod = de.FusedDistillLoss(softcap=2.0, backend="torch")  # the Module face carries the transform
    torch.testing.assert_close(mod(h, w, ids, lp, bias=b), capped)
    for bad in (0.0, -1.0, float("inf"), float("nan"), "2"):
        with pytest.raises(ValueError, match="softcap"):
            fused_distill_loss(h, w, ids, lp, softcap=bad)
        with pytest.raises(ValueError, match="logit_scale"):
            teacher_targets(h, w, 3, logit_scale=bad)


@pytest.mark.parametrize("backend", TT_BACKENDS)
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_targets_topk_matches_oracle(backend, transform, dtype):
    s, c = transform
    h, w, b, *_ = _inputs(dtype, seed=11)
    t = teacher_targets(h, w, K, bias=b, temperature=1.7, logit_scale=s, softcap=c, backend=backend, chunk_rows=4)
    full = dense_teacher_logprobs(h.float(), w.float(), b.float(), 1.7, logit_scale=s, softcap=c)  # [N, V]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    want = full.gather(1, t.ids.long())
    torch.testing.assert_close(t.logprobs.double(), want, rtol=tol, atol=tol)
    # the chosen ids are a top-k of the oracle (ties within tolerance allowed)
    kth = full.topk(K, dim=1).values[:, -1:]
    assert bool((want >= kth - tol * 10).all())
    rest = torch.logsumexp(full.scatter(1, t.ids.long(), float("-inf")), dim=1)  # exact log mass outside the ids
    torch.testing.assert_close(t.rest_logprob.double(), rest, rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("backend", TT_BACKENDS)
def test_teacher_targets_sample_uses_capped_distribution(backend):
    h, w, b, *_ = _inputs(torch.float32, seed=13)
    g1 = torch.Generator().manual_seed(0)
    t = teacher_targets(h, w, 4, bias=b, method="sample", generator=g1, logit_scale=0.8, softcap=2.0,
                        backend=backend)
    # same uniforms through the float64 inverse CDF of the capped distribution
    from distill_engine.ops.teacher_targets import draw_uniforms, merge_draws

    u = draw_uniforms(N, 4, torch.Generator().manual_seed(0), h.device)
    p = dense_teacher_logprobs(h, w, b, 1.0, logit_scale=0.8, softcap=2.0).exp()
    draws = torch.searchsorted(torch.cumsum(p, dim=1), u.double(), right=True).clamp(max=V - 1)
    ids, lps = merge_draws(draws, V)
    assert torch.equal(t.ids, ids)
    torch.testing.assert_close(t.logprobs, lps)
