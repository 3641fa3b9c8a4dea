"""fused_distill_loss against the float64 dense reference: every divergence × tail × dtype × backend."""
import itertools
import math

import pytest
import torch

import distill_engine as de
from distill_engine.reference.distill_loss import dense_reference_grads
from op_testing import assert_all_close, available, backends, rel_err, strided

BACKENDS = backends("fused_distill_loss")
COMBOS = [(dv, tl) for dv, tl in itertools.product(["forward_kl", "reverse_kl", "jsd"], ["bucket", "renormalize"])
          if not (dv == "reverse_kl" and tl == "renormalize")]


def make_inputs(N, d, V, k, dtype=torch.float32, seed=0, padded=True, ignored=True, bias=True, teacher_scale=2.0):
    """Fresh random inputs: a teacher distribution's top-k (unique ids, normalized log-probs), some empty slots,
    one fully padded row, some ignored labels."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, d, generator=g) / math.sqrt(d) * 3).to(dtype)
    weight = torch.randn(V, d, generator=g).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    t_logp = torch.log_softmax(torch.randn(N, V, generator=g) * teacher_scale, dim=1)
    lp, ids = t_logp.topk(k, dim=1)
    # shuffle slot order so nothing relies on sorted ids
    perm = torch.argsort(torch.rand(N, k, generator=g), dim=1)
    ids, lp = ids.gather(1, perm), lp.gather(1, perm)
    labels = torch.randint(0, V, (N,), generator=g)
    if padded and N > 2 and k > 1:
        ids[0, k // 2:] = -1
        lp[0, k // 2:] = float("-inf")
        ids[1, :] = -1  # a row with no teacher target at all
        lp[1, :] = float("-inf")
    if ignored and N > 3:
        labels[2] = -100
        labels[N - 1] = -100
    return hidden, weight, b, ids.to(torch.int32), lp.float(), labels


def run_and_compare(backend, N, d, V, k, dtype, divergence, tail, *, temperature=1.0, ce_weight=0.0,
                    reduction="mean", bias=True, chunk_rows=None, seed=0, use_labels=True):
    hidden, weight, b, ids, lp, labels = make_inputs(N, d, V, k, dtype, seed=seed, bias=bias)
    if not use_labels:
        labels = None
    kw = dict(labels=labels, divergence=divergence, tail=tail, temperature=temperature, ce_weight=ce_weight,
              reduction=reduction)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    bb = b.clone().requires_grad_(True) if b is not None else None
    out = de.fused_distill_loss(h, w, ids, lp, bias=bb, backend=backend, chunk_rows=chunk_rows, **kw)
    out.sum().backward()
    ref, dh, dw, db = dense_reference_grads(hidden, weight, ids, lp, bias=b, **kw)
    return (out.detach(), h.grad, w.grad, bb.grad if bb is not None else None), (ref, dh, dw, db)


def assert_close(got, ref, dtype, what=""):
    assert_all_close(got, ref, dtype, what=what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,tail", COMBOS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_dense_reference(backend, divergence, tail, dtype):
    # vary k, temperature, ce_weight and reduction across the grid so every value is exercised
    i = COMBOS.index((divergence, tail)) + (0 if dtype == torch.float32 else 5)
    k = [1, 8, 64][i % 3]
    temperature = [1.0, 2.0, 0.7][(i + 1) % 3]
    ce_weight = [0.0, 0.25][i % 2]
    reduction = ["mean", "sum", "none"][(i + 2) % 3]
    N, d, V = (19, 37, 101) if backend != "triton" else (13, 24, 101)
    got, ref = run_and_compare(backend, N, d, V, k, dtype, divergence, tail, temperature=temperature,
                               ce_weight=ce_weight, reduction=reduction, chunk_rows=7, seed=i)
    assert_close(got, ref, dtype, f"{backend}/{divergence}/{tail}/{dtype}/k={k}/T={temperature}/ce={ce_weight}/{reduction}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_no_labels_fp16(backend):
    got, ref = run_and_compare(backend, 11, 16, 97, 8, torch.float16, "forward_kl", "bucket", bias=False,
                               use_labels=False, seed=3)
    assert_close(got, ref, torch.float16, f"{backend}/fp16")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_batch_is_zero_with_zero_grads(backend):
    hidden, weight, b, ids, lp, labels = make_inputs(9, 16, 53, 4)
    labels[:] = -100
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = de.fused_distill_loss(h, w, ids, lp, labels=labels, bias=b, ce_weight=0.5, backend=backend)
    out.backward()
    assert out.item() == 0.0
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,tail,reduction", [("jsd", "bucket", "mean"), ("forward_kl", "renormalize", "none")])
def test_strided_inputs_match_dense_reference(backend, divergence, tail, reduction):
    _check_strided(backend, "cpu", 11, 24, 89, 6, divergence, tail, reduction)


def _check_strided(backend, device, N, d, V, k, divergence, tail, reduction):
    """Every tensor argument as a non-contiguous view (column-major hidden, row-strided weight, every other
    entry of ids / log-probs / labels / bias / teacher rest): same loss and gradients as the oracle."""
    hidden, weight, b, ids, lp, labels = make_inputs(N, d, V, k, seed=21)
    rest = torch.full((N,), -3.0) if tail == "bucket" else None
    view = lambda x, how="cols": strided(None if x is None else x.to(device), how)  # noqa: E731
    h, w, bb = (x.requires_grad_(True) for x in (view(hidden, "t"), view(weight, "rows"), view(b)))
    kw = dict(divergence=divergence, tail=tail, ce_weight=0.3, reduction=reduction, temperature=1.5)
    out = de.fused_distill_loss(h, w, view(ids), view(lp, "rows"), bias=bb, labels=view(labels),
                                teacher_rest_logprob=view(rest), backend=backend, chunk_rows=4, **kw)
    out.sum().backward()
    ref = dense_reference_grads(hidden, weight, ids, lp, bias=b, labels=labels, teacher_rest_logprob=rest, **kw)
    got = tuple(x.cpu() for x in (out.detach(), h.grad, w.grad, bb.grad))
    assert_close(got, ref, torch.float32, f"{device}/{backend}/strided/{divergence}")


@pytest.mark.parametrize("backend", backends("fused_distill_loss", ["torch", "cpu"]))
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_extreme_logits_and_zero_prob_ids_stay_finite(backend, divergence):
    N, d, V, k = 8, 4, 61, 6
    g = torch.Generator().manual_seed(5)
    h = (torch.randn(N, d, generator=g) * 100).requires_grad_(True)
    w = (torch.randn(V, d, generator=g) * 25).requires_grad_(True)  # |logits| up to ~1e4
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)])
    lp = torch.log_softmax(torch.randn(N, k, generator=g), 1) - 0.1
    lp[:, 0] = float("-inf")  # zero-probability teacher ids
    lp[0, :] = float("-inf")
    out = de.fused_distill_loss(h, w, ids, lp, divergence=divergence, backend=backend, temperature=1.0)
    out.backward()
    assert torch.isfinite(out)
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


def test_backends_agree_and_validate_false_is_identical():
    hidden, weight, b, ids, lp, labels = make_inputs(23, 20, 89, 8)
    outs = []
    for backend in available("fused_distill_loss", ["torch", "cpu"]):
        for validate in (True, False):
            outs.append(de.fused_distill_loss(hidden, weight, ids, lp, labels=labels, bias=b, backend=backend,
                                              validate=validate, reduction="none"))
    for o in outs[1:]:
        assert torch.allclose(o, outs[0], rtol=1e-5, atol=1e-6)


def test_never_allocates_full_logits(monkeypatch):
    """The driver only ever asks a backend for chunk_rows rows of logits at a time."""
    from distill_engine.reference import distill_loss as ref_impl

    seen = []
    orig = ref_impl.logits_lse

    def spy(h, *a, **kw):
        seen.append(h.shape[0])
        return orig(h, *a, **kw)

    monkeypatch.setattr(ref_impl, "logits_lse", spy)
    hidden, weight, b, ids, lp, labels = make_inputs(50, 8, 31, 4)
    h = hidden.clone().requires_grad_(True)
    de.fused_distill_loss(h, weight, ids, lp, labels=labels, backend="torch", chunk_rows=16, reduction="none").sum().backward()
    assert seen and max(seen) <= 16 and sum(seen) == 2 * 50  # forward + recomputing backward


def test_grad_in_forward_scales_with_upstream_gradient():
    hidden, weight, b, ids, lp, labels = make_inputs(12, 8, 41, 4)
    h1 = hidden.clone().requires_grad_(True)
    (3.5 * de.fused_distill_loss(h1, weight, ids, lp, labels=labels, backend="torch")).backward()
    h2 = hidden.clone().requires_grad_(True)
    de.fused_distill_loss(h2, weight, ids, lp, labels=labels, backend="torch").backward()
    assert torch.allclose(h1.grad, 3.5 * h2.grad, rtol=1e-6, atol=1e-8)


def test_module_face_matches_function():
    hidden, weight, b, ids, lp, labels = make_inputs(10, 8, 37, 4)
    mod = de.FusedDistillLoss(divergence="jsd", beta=0.3, temperature=2.0, ce_weight=0.1, backend="torch")
    a = mod(hidden, weight, ids, lp, labels=labels, bias=b)
    r = de.fused_distill_loss(hidden, weight, ids, lp, labels=labels, bias=b, divergence="jsd", beta=0.3,
                              temperature=2.0, ce_weight=0.1, backend="torch")
    assert torch.equal(a, r)
    with pytest.raises(ValueError, match="divergence"):
        de.FusedDistillLoss(divergence="kl")


def test_no_grad_forward():
    hidden, weight, b, ids, lp, labels = make_inputs(10, 8, 37, 4)
    with torch.no_grad():
        out = de.fused_distill_loss(hidden.requires_grad_(True), weight, ids, lp, labels=labels, backend="torch")
    ref = dense_reference_grads(hidden, weight, ids, lp, labels=labels)[0]
    assert rel_err(out, ref) < 1e-5


# --------------------------------------------------------------------------------------------
# bad input -> ValueError naming the argument
# --------------------------------------------------------------------------------------------
def _good():
    hidden, weight, b, ids, lp, labels = make_inputs(6, 8, 29, 4, padded=False)
    return dict(hidden=hidden, weight=weight, teacher_ids=ids, teacher_logprobs=lp), dict(labels=labels, bias=b)


def _call(pos, kw, **over):
    args = dict(pos)
    kws = dict(kw)
    for k_, v in over.items():
        (args if k_ in args else kws)[k_] = v
    return de.fused_distill_loss(args["hidden"], args["weight"], args["teacher_ids"], args["teacher_logprobs"],
                                 backend="torch", **kws)


@pytest.mark.parametrize("mutate,match", [
    (lambda p, k: {"weight": p["weight"][:, :5]}, "weight"),
    (lambda p, k: {"weight": p["weight"].double()}, "weight"),
    (lambda p, k: {"teacher_ids": p["teacher_ids"].float()}, "teacher_ids"),
    (lambda p, k: {"teacher_ids": p["teacher_ids"][:3]}, "teacher_ids"),
    (lambda p, k: {"teacher_logprobs": p["teacher_logprobs"][:, :2]}, "teacher_logprobs"),
    (lambda p, k: {"teacher_ids": torch.where(torch.arange(4) == 1, 29, p["teacher_ids"])}, "teacher_ids"),
    (lambda p, k: {"teacher_ids": torch.where(torch.arange(4) == 1, -2, p["teacher_ids"])}, "teacher_ids"),
    (lambda p, k: {"teacher_ids": torch.cat([p["teacher_ids"][:, :1], p["teacher_ids"][:, :1], p["teacher_ids"][:, 2:]], 1)},
     "unique"),
    (lambda p, k: {"teacher_logprobs": p["teacher_logprobs"].clone().fill_(float("nan"))}, "NaN"),
    (lambda p, k: {"teacher_logprobs": p["teacher_logprobs"].abs()}, "teacher_logprobs"),
    (lambda p, k: {"teacher_logprobs": torch.full_like(p["teacher_logprobs"], -0.1)}, "sum to probability"),
    (lambda p, k: {"labels": k["labels"][:2]}, "labels"),
    (lambda p, k: {"labels": torch.full_like(k["labels"], 29)}, "labels"),
    (lambda p, k: {"bias": k["bias"][:3]}, "bias"),
    (lambda p, k: {"divergence": "kl"}, "divergence"),
    (lambda p, k: {"tail": "drop"}, "tail"),
    (lambda p, k: {"reduction": "avg"}, "reduction"),
    (lambda p, k: {"temperature": 0.0}, "temperature"),
    (lambda p, k: {"ce_weight": 1.5}, "ce_weight"),
    (lambda p, k: {"divergence": "jsd", "beta": 1.0}, "beta"),
    (lambda p, k: {"divergence": "reverse_kl", "tail": "renormalize"}, "tail='bucket'"),
    (lambda p, k: {"labels": None, "ce_weight": 0.5}, "labels"),
])
def test_bad_input_raises_value_error(mutate, match):
    pos, kw = _good()
    with pytest.raises(ValueError, match=match):
        _call(pos, kw, **mutate(pos, kw))


def test_bad_backend_names():
    pos, kw = _good()
    with pytest.raises(ValueError, match="backend"):
        de.fused_distill_loss(*pos.values(), backend="cuda")
    if not torch.cuda.is_available():
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            with pytest.raises(ValueError, match="triton"):
                de.fused_distill_loss(*pos.values(), backend="triton")


# --------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): the triton backend end to end at shapes that span several tiles
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("divergence,tail", COMBOS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_matches_dense_reference(divergence, tail, dtype):
    N, d, V, k = 300, 136, 5003, 64
    hidden, weight, b, ids, lp, labels = make_inputs(N, d, V, k, dtype, seed=11)
    kw = dict(labels=labels, divergence=divergence, tail=tail, temperature=1.5, ce_weight=0.2, reduction="mean")
    dev = "cuda"
    h = hidden.to(dev).requires_grad_(True)
    w = weight.to(dev).requires_grad_(True)
    bb = b.to(dev).requires_grad_(True)
    out = de.fused_distill_loss(h, w, ids.to(dev), lp.to(dev), bias=bb, backend="triton", chunk_rows=128,
                                **{**kw, "labels": labels.to(dev)})
    out.backward()
    ref = dense_reference_grads(hidden, weight, ids, lp, bias=b, **kw)
    got = (out.detach().cpu(), h.grad.cpu(), w.grad.cpu(), bb.grad.cpu())
    assert_close(got, ref, dtype, f"cuda/{divergence}/{tail}/{dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("divergence,tail,reduction", [("jsd", "bucket", "mean"), ("forward_kl", "renormalize", "none")])
def test_cuda_triton_strided_inputs(divergence, tail, reduction):
    _check_strided("triton", "cuda", 300, 136, 5003, 64, divergence, tail, reduction)


@pytest.mark.gpu
def test_cuda_reduction_none_recompute_path():
    hidden, weight, b, ids, lp, labels = make_inputs(257, 64, 3001, 16, torch.bfloat16, seed=12)
    kw = dict(labels=labels, reduction="none", ce_weight=0.1)
    h = hidden.cuda().requires_grad_(True)
    w = weight.cuda().requires_grad_(True)
    out = de.fused_distill_loss(h, w, ids.cuda(), lp.cuda(), bias=b.cuda(), backend="triton",
                                **{**kw, "labels": labels.cuda()})
    out.sum().backward()
    ref = dense_reference_grads(hidden, weight, ids, lp, bias=b, **kw)
    got = (out.detach().cpu(), h.grad.cpu(), w.grad.cpu(), None)
    assert_close(got[:3], ref[:3], torch.bfloat16, "cuda/none")
