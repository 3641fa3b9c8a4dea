"""logprobs_at against the float64 dense oracle: every backend, odd shapes, prime V, duplicates, strides, grads."""
import math

import pytest
import torch

import distill_engine as de
import distill_engine.functional as DF
from distill_engine.reference.logprobs_at import dense_logprobs_at
from op_testing import assert_close_to_ref, backends, skip_unavailable, strided

BACKENDS = backends("logprobs_at")


def _inputs(N, d, V, m, dtype=torch.float32, seed=0, bias=True, dup=True):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, d, generator=g) / math.sqrt(d) * 3).to(dtype)
    weight = torch.randn(V, d, generator=g).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    ids = torch.randint(0, V, (N, m), generator=g)
    if dup and m > 1:
        ids[:, -1] = ids[:, 0]  # a repeated id in every row
    return hidden, weight, b, ids


def _torch_in_dtype(hidden, weight, ids, bias, T):
    """What plain PyTorch computes in the inputs' dtype: the GEMM in that dtype, the softmax in fp32."""
    logits = hidden @ weight.t() + (bias if bias is not None else 0)
    return torch.log_softmax(logits.float() / T, dim=1).gather(1, ids.long())


def _check(backend, N, d, V, m, *, dtype=torch.float32, T=1.0, bias=True, chunk_rows=None, seed=0,
           strided_inputs=False, ids_dtype=torch.int64, vs_torch=False):
    skip_unavailable(backend, "logprobs_at")
    hidden, weight, b, ids = _inputs(N, d, V, m, dtype, seed=seed, bias=bias)
    ids = ids.to(ids_dtype)
    # non-contiguous views of the same values: column-major hidden, row stride 2·d weight, stride-2 ids / bias
    h, w, i, bb = (strided(hidden, "t"), strided(weight, "rows"), strided(ids), strided(b)) if strided_inputs \
        else (hidden.clone(), weight.clone(), ids, None if b is None else b.clone())
    h, w = h.requires_grad_(True), w.requires_grad_(True)
    bb = bb.requires_grad_(True) if bb is not None else None
    out = de.logprobs_at(h, w, i, bias=bb, temperature=T, backend=backend, chunk_rows=chunk_rows)
    assert out.shape == (N, m) and out.dtype == torch.float32
    g = torch.Generator().manual_seed(seed + 1)
    up = torch.randn(N, m, generator=g)
    (out * up).sum().backward()

    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    b64 = b.double().requires_grad_(True) if b is not None else None
    ref = dense_logprobs_at(h64, w64, ids, bias=b64, temperature=T)
    (ref * up.double()).sum().backward()
    same = _torch_in_dtype(hidden, weight, ids, b, T) if vs_torch else None
    assert_close_to_ref(out, ref, dtype, torch_same_dtype=same, what=f"{backend} logprobs")
    for name, got, want in (("d_hidden", h.grad, h64.grad), ("d_weight", w.grad, w64.grad),
                            ("d_bias", None if b is None else bb.grad, None if b is None else b64.grad)):
        if want is not None:
            assert_close_to_ref(got, want, dtype, what=f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,d,V,m,T", [(7, 13, 97, 3, 1.0), (19, 16, 131, 5, 2.0), (1, 5, 2, 2, 0.7)])
def test_matches_dense_oracle(backend, N, d, V, m, T):
    _check(backend, N, d, V, m, T=T, chunk_rows=4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True])
def test_int32_ids_strided(backend, bias):
    _check(backend, 11, 12, 89, 4, bias=bias, ids_dtype=torch.int32, strided_inputs=True, T=1.3, seed=int(bias))


@pytest.mark.parametrize("backend", backends("logprobs_at", ["torch", "cpu"]))
def test_bf16_inputs(backend):
    _check(backend, 9, 16, 101, 3, dtype=torch.bfloat16, vs_torch=True)


def test_only_hidden_grad_and_functional_export():
    hidden, weight, b, ids = _inputs(6, 8, 53, 2)
    h = hidden.clone().requires_grad_(True)
    out = DF.logprobs_at(h, weight, ids, bias=b)
    out.sum().backward()
    h64 = hidden.double().requires_grad_(True)
    dense_logprobs_at(h64, weight, ids, bias=b).sum().backward()
    assert_close_to_ref(h.grad, h64.grad, what="functional d_hidden")
    # each row's log-probs over all ids sum (in prob space) to 1
    all_ids = torch.arange(53).expand(6, 53)
    full = de.logprobs_at(hidden, weight, all_ids, bias=b)
    torch.testing.assert_close(full.double().exp().sum(1), torch.ones(6, dtype=torch.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(ids=torch.tensor([[0, 53]])), "ids must lie in"),
    (dict(ids=torch.tensor([[-1, 0]])), "ids must lie in"),
    (dict(ids=torch.zeros(1, 2)), "ids must have dtype"),
    (dict(ids=torch.zeros(2, 2, dtype=torch.long)), "ids has shape"),
    (dict(ids=torch.zeros(1, 0, dtype=torch.long)), "at least one column"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(bias=torch.zeros(7)), "bias has shape"),
    (dict(chunk_rows=0), "chunk_rows"),
    (dict(backend="gpu"), "backend must be one of"),
    (dict(hidden=torch.full((1, 8), float("nan"))), "hidden contains non-finite"),
    (dict(weight=torch.zeros(53, 8, dtype=torch.float64)), "weight must have dtype"),
])
def test_bad_input_one_line_error(kwargs, match):
    args = dict(hidden=torch.randn(1, 8), weight=torch.randn(53, 8), ids=torch.tensor([[1, 2]]))
    args.update(kwargs)
    hidden, weight, ids = args.pop("hidden"), args.pop("weight"), args.pop("ids")
    with pytest.raises(ValueError, match=match) as exc:
        de.logprobs_at(hidden, weight, ids, **args)
    assert "\n" not in str(exc.value)


def test_empty_rows():
    out = de.logprobs_at(torch.randn(0, 4), torch.randn(11, 4), torch.zeros(0, 3, dtype=torch.long))
    assert out.shape == (0, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_only_gradient_every_backend(backend):
    """weight/bias frozen (as the teacher's, or a student's lm_head outside the graph): only dH is formed."""
    hidden, weight, b, ids = _inputs(10, 12, 67, 3, seed=4)
    h = hidden.clone().requires_grad_(True)
    (de.logprobs_at(h, weight, ids, bias=b, temperature=1.7, backend=backend, chunk_rows=3) * 2.0).sum().backward()
    h64 = hidden.double().requires_grad_(True)
    (dense_logprobs_at(h64, weight, ids, bias=b, temperature=1.7) * 2.0).sum().backward()
    assert_close_to_ref(h.grad, h64.grad, what=f"{backend} d_hidden")


# (logit_scale, softcap): Gemma-2-like soft-cap, scale + cap, a non-power-of-two scale alone
TRANSFORMS = [(None, 2.5), (0.6, 4.0), (1.7, None)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_logit_transform_matches_dense_transformed_oracle(backend, transform):
    """logprobs_at(..., logit_scale=s, softcap=c) = log softmax(c·tanh(s·l/c) / T)[ids] in float64, with both
    gradients (dH, dW, db), a repeated id per row, odd shapes, prime V, strided inputs and row chunks."""
    s, c = transform
    hidden, weight, b, ids = _inputs(13, 11, 103, 4, seed=7)
    hidden = hidden.t().contiguous().t()  # column-major
    h, w, bb = (x.clone().requires_grad_(True) for x in (hidden, weight, b))
    out = de.logprobs_at(h, w, ids, bias=bb, temperature=1.4, backend=backend, chunk_rows=5, logit_scale=s,
                         softcap=c)
    up = torch.randn(13, 4, generator=torch.Generator().manual_seed(8))
    (out * up).sum().backward()
    h64, w64, b64 = (x.double().requires_grad_(True) for x in (hidden, weight, b))
    ref = dense_logprobs_at(h64, w64, ids, bias=b64, temperature=1.4, logit_scale=s, softcap=c)
    (ref * up.double()).sum().backward()
    plain = dense_logprobs_at(hidden.double(), weight.double(), ids, bias=b.double(), temperature=1.4)
    assert (ref.detach() - plain).abs().max() > 1e-2  # the transform matters at these logits
    for got, want in ((out, ref.detach()), (h.grad, h64.grad), (w.grad, w64.grad), (bb.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [(dict(softcap=0.0), "softcap"), (dict(logit_scale=-1.0), "logit_scale"),
                                          (dict(softcap=float("inf")), "softcap")])
def test_bad_transform_one_line_error(kwargs, match):
    with pytest.raises(ValueError, match=match) as exc:
        de.logprobs_at(torch.randn(2, 4), torch.randn(7, 4), torch.zeros(2, 1, dtype=torch.long), **kwargs)
    assert "\n" not in str(exc.value)
