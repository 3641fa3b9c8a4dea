"""teacher_targets against the float64 dense oracle, on every backend.

* top-k: ids as sets (random inputs, no ties) and log-probabilities equal to the dense
  log_softmax at those ids; ragged shapes (N=13, d=37, V=101 prime), k ∈ {1, 8, 64}, temperature, bias,
  fp32 / bf16 / fp16, several chunks.
* sample: (a) the same uniforms give the same draws as the dense float64 inverse CDF, (b) the same
  generator seed gives identical targets, (c) unbiasedness: over many draws the mean of exp(logprob)
  scattered over V matches softmax within 5 standard errors per id (and a chi-square bound), while the
  same statistic rejects a biased estimator, (d) no NaN at extreme logits.
* bad input raises ValueError naming the argument.
Triton runs under TRITON_INTERPRET=1 here (tests/conftest.py); gpu-marked tests rerun on CUDA.
"""
from __future__ import annotations

import math

import pytest
import torch

import distill_engine as de
from distill_engine import _backend
from distill_engine.ops.teacher_targets import TeacherTargets, draw_uniforms, merge_draws
from distill_engine.reference import teacher_targets as R
from op_testing import available, backends, skip_unavailable, strided

F64 = torch.float64
HAS_CPU_EXT = _backend.cpu_extension_has("teacher_topk_chunk")
BACKENDS = backends("teacher_targets")
TORCH_CPU = available("teacher_targets", ["torch", "cpu"])


def _inputs(N, d, V, dtype=torch.float32, bias=False, scale=1.0, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g) * scale
    w = torch.randn(V, d, generator=g) / math.sqrt(d)
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(h), cast(w), cast(b)


def _check_topk(t: TeacherTargets, h, w, b, k, T, atol):
    N = h.shape[0]
    assert t.ids.shape == (N, k) and t.ids.dtype == torch.int32
    assert t.logprobs.shape == (N, k) and t.logprobs.dtype == torch.float32
    assert t.vocab_size == w.shape[0] and len(t) == N
    lp_ref = R.dense_teacher_logprobs(h.cpu(), w.cpu(), None if b is None else b.cpu(), T)  # [N, V] float64
    ids = t.ids.cpu().long()
    lps = t.logprobs.cpu().double()
    assert bool((ids >= 0).all()) and bool((ids < w.shape[0]).all())
    # the returned log-probs are the dense ones at the returned ids (full-vocabulary normalisation)
    torch.testing.assert_close(lps, lp_ref.gather(1, ids), atol=atol, rtol=0)
    # sorted best first, ids unique
    assert bool((lps[:, 1:] <= lps[:, :-1] + atol).all())
    assert bool((ids.sort(1).values[:, 1:] != ids.sort(1).values[:, :-1]).all())
    # the exact top-k set (random inputs: a gap to the (k+1)-th value far above the tolerance)
    ref_vals, ref_ids = torch.sort(lp_ref, dim=1, descending=True)
    torch.testing.assert_close(lps, ref_vals[:, :k], atol=atol, rtol=0)
    for r in range(N):
        if k < w.shape[0] and ref_vals[r, k - 1] - ref_vals[r, k] < 10 * atol:
            continue  # a near-tie at the boundary: either id is a correct answer
        assert set(ids[r].tolist()) == set(ref_ids[r, :k].tolist()), f"row {r}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 8, 64])
@pytest.mark.parametrize("T,bias", [(1.0, False), (1.7, True)])
def test_topk_matches_dense_reference(backend, k, T, bias):
    h, w, b = _inputs(13, 37, 101, bias=bias, scale=2.0)
    t = de.teacher_targets(h, w, k, bias=b, temperature=T, backend=backend)
    _check_topk(t, h, w, b, k, T, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_topk_half_inputs(backend, dtype):
    # the oracle uses the same rounded inputs; only the fp32 accumulation differs
    h, w, b = _inputs(13, 37, 101, dtype=dtype, bias=True, scale=2.0, seed=1)
    t = de.teacher_targets(h, w, 8, bias=b, temperature=0.7, backend=backend)
    _check_topk(t, h, w, b, 8, 0.7, atol=1e-4)


@pytest.mark.parametrize("var,value,bad,N,V,seed,T", [
    # DISTILL_ENGINE_TT_LOGITS=cublas: the same candidate kernel reading logits from a GEMM buffer
    ("DISTILL_ENGINE_TT_LOGITS", "cublas", "bogus", 13, 101, 15, 1.3),
    # DISTILL_ENGINE_TT_GROUP_M: 3 row blocks x several splits, groups of 1 / 2 (ragged last group) / all blocks
    ("DISTILL_ENGINE_TT_GROUP_M", "0", "-1", 45, 131, 16, 1.1),
    ("DISTILL_ENGINE_TT_GROUP_M", "1", "-1", 45, 131, 16, 1.1),
    ("DISTILL_ENGINE_TT_GROUP_M", "2", "-1", 45, 131, 16, 1.1),
])
def test_triton_env_modes(monkeypatch, var, value, bad, N, V, seed, T):
    skip_unavailable("triton", "teacher_targets")
    monkeypatch.setenv(var, value)
    h, w, b = _inputs(N, 37, V, bias=True, scale=2.0, seed=seed)
    t = de.teacher_targets(h, w, 8, bias=b, temperature=T, backend="triton")
    _check_topk(t, h, w, b, 8, T, atol=2e-5)
    monkeypatch.setenv(var, bad)
    with pytest.raises(ValueError, match=var):
        de.teacher_targets(h, w, 8, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how_h,how_w", [("t", "rows"), ("cols", "t")])
def test_strided_inputs(backend, how_h, how_w):
    """Non-contiguous hidden / weight / bias views give the dense top-k, and the sampler the dense inverse-CDF
    draws for the same uniforms."""
    h, w, b = _inputs(13, 37, 101, bias=True, scale=2.0, seed=17)
    hs, ws, bs = strided(h, how_h), strided(w, how_w), strided(b)
    _check_strided_topk(backend, h, w, b, how_h, how_w, 8, 2e-5)
    got = de.teacher_targets(hs, ws, 6, bias=bs, method="sample", generator=torch.Generator().manual_seed(3),
                             backend=backend)
    _check_sample_vs_inverse_cdf(got, h, w, b, 1.0, seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_chunking_does_not_change_result(backend):
    h, w, b = _inputs(21, 19, 131, bias=True, seed=2)
    full = de.teacher_targets(h, w, 5, bias=b, backend=backend)
    chunked = de.teacher_targets(h, w, 5, bias=b, backend=backend, chunk_rows=8)
    assert torch.equal(full.ids, chunked.ids)
    torch.testing.assert_close(full.logprobs, chunked.logprobs, atol=1e-6, rtol=0)


def test_topk_k_equals_V_is_the_full_distribution():
    h, w, _ = _inputs(5, 11, 23, seed=3)
    t = de.teacher_targets(h, w, 23, backend="torch")
    assert torch.allclose(t.logprobs.double().exp().sum(1), torch.ones(5, dtype=F64), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------
def _check_sample_rows(t: TeacherTargets, k: int):
    ids, lp = t.ids.long(), t.logprobs.double()
    slot = ids >= 0
    assert not bool(torch.isnan(lp).any())
    assert bool((lp[~slot] == float("-inf")).all())
    counts = torch.where(slot, (lp.exp() * k).round(), torch.zeros_like(lp))
    # every log-prob is log(count / k) for an integer count >= 1, the counts sum to k
    assert bool((counts[slot] >= 1).all())
    torch.testing.assert_close(lp[slot], torch.log(counts[slot] / k), atol=1e-6, rtol=0)
    assert bool((counts.sum(1) == k).all())
    # slots filled first, sorted by count descending; ids unique
    assert bool((slot[:, 1:] <= slot[:, :-1]).all())
    assert bool((counts[:, 1:] <= counts[:, :-1]).all())
    for r in range(ids.shape[0]):
        got = ids[r][slot[r]].tolist()
        assert len(got) == len(set(got))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_equals_dense_inverse_cdf_for_the_same_uniforms(backend):
    N, k, V, T = 13, 16, 101, 1.3
    h, w, b = _inputs(N, 37, V, bias=True, seed=4)
    got = de.teacher_targets(h, w, k, bias=b, temperature=T, method="sample",
                             generator=torch.Generator().manual_seed(7), backend=backend)
    _check_sample_rows(got, k)
    _check_sample_vs_inverse_cdf(got, h, w, b, T, seed=7)


def _check_strided_topk(backend, h, w, b, how_h, how_w, k, atol):
    t = de.teacher_targets(strided(h, how_h), strided(w, how_w), k, bias=strided(b), temperature=1.3,
                           backend=backend, chunk_rows=5 if h.device.type == "cpu" else None)
    _check_topk(t, h, w, b, k, 1.3, atol=atol)


def _check_sample_vs_inverse_cdf(got: TeacherTargets, h, w, b, T, seed):
    """The draws equal the dense float64 inverse CDF's for the uniforms of generator seed ``seed``."""
    N, k = got.ids.shape
    u = draw_uniforms(N, k, torch.Generator().manual_seed(seed), torch.device("cpu"))
    ref_ids, ref_lp = merge_draws(R.dense_sample_reference(h, w, u, b, T), w.shape[0])
    # a uniform within float rounding (~1e-6) of a CDF boundary may land on the neighbour: allow one row
    same = (got.ids == ref_ids).all(1) & (got.logprobs == ref_lp).all(1)
    assert int((~same).sum()) <= 1, f"rows differing from the float64 inverse CDF: {(~same).nonzero().flatten().tolist()}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_reproducible_by_seed(backend):
    h, w, _ = _inputs(13, 37, 101, seed=5)
    run = lambda seed: de.teacher_targets(h, w, 12, method="sample", backend=backend,  # noqa: E731
                                          generator=torch.Generator().manual_seed(seed))
    a, b, c = run(11), run(11), run(12)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.ids, c.ids)
    # chunking draws the uniforms once for all rows, so it does not change the result either
    d = de.teacher_targets(h, w, 12, method="sample", backend=backend, chunk_rows=3,
                           generator=torch.Generator().manual_seed(11))
    assert torch.equal(a.ids, d.ids) and torch.equal(a.logprobs, d.logprobs)


def _estimate(t: TeacherTargets, V: int) -> torch.Tensor:
    """Mean over rows of exp(logprob) scattered over the vocabulary, [V] float64."""
    slot = t.ids >= 0
    p = torch.zeros(t.ids.shape[0], V, dtype=F64)
    p.scatter_add_(1, t.ids.long().clamp(min=0), torch.where(slot, t.logprobs.double().exp(), torch.zeros((), dtype=F64)))
    return p.mean(0)


def _unbiased_stats(est: torch.Tensor, p: torch.Tensor, n_draws: int):
    """(max |est − p| / σ, chi-square / its 5-sigma bound) with σ = sqrt(p(1 − p)/n)."""
    sigma = (p * (1 - p) / n_draws).sqrt().clamp(min=1e-12)
    z = ((est - p).abs() / sigma).max().item()
    keep = p * n_draws >= 5
    chi2 = (((est - p)[keep] * n_draws) ** 2 / (p[keep] * n_draws)).sum().item()
    df = int(keep.sum()) - 1
    return z, chi2 / (df + 5 * math.sqrt(2 * df))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_is_unbiased(backend, monkeypatch):
    # one teacher row repeated: N·k i.i.d. draws from the same distribution
    V, k, N = 101, 16, 2048
    if backend == "triton":  # the interpreter's cost is per program: larger row blocks, same kernel code
        from distill_engine.kernels import teacher_targets as K

        monkeypatch.setattr(K, "_INTERP", dict(BM=256, BV=64, BD=16, split_tiles=1))
    h1, w, b = _inputs(1, 23, V, bias=True, scale=1.5, seed=6)
    h = h1.expand(N, -1).contiguous()
    T = 1.2
    t = de.teacher_targets(h, w, k, bias=b, temperature=T, method="sample", backend=backend,
                           generator=torch.Generator().manual_seed(123))
    _check_sample_rows(t, k)
    p = R.dense_teacher_logprobs(h1, w, b, T)[0].exp()  # [V]
    n = N * k
    z, chi = _unbiased_stats(_estimate(t, V), p, n)
    assert z < 5.0, f"an id's frequency is {z:.1f} standard errors from its probability"
    assert chi < 1.0, f"chi-square {chi:.2f}x its 5-sigma bound"
    # power: the same statistic rejects a biased estimate (top-k renormalised, the biased alternative)
    tk = de.teacher_targets(h1, w, k, bias=b, temperature=T, backend="torch")
    biased = torch.zeros(V, dtype=F64).scatter_(0, tk.ids[0].long(), torch.softmax(tk.logprobs[0].double(), 0))
    assert _unbiased_stats(biased, p, n)[0] > 5.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_extreme_logits_no_nan(backend):
    h, w, _ = _inputs(7, 16, 101, scale=3000.0, seed=8)  # logits ~ ±1e4: one id holds all the mass
    t = de.teacher_targets(h, w, 8, method="sample", backend=backend, generator=torch.Generator().manual_seed(0))
    _check_sample_rows(t, 8)
    p_top = R.dense_teacher_logprobs(h, w).exp().max(dim=1)
    sure = p_top.values > 1 - 1e-9  # rows where every draw must be the arg-max
    assert int(sure.sum()) >= 5
    assert torch.equal(t.ids[sure, 0].long(), p_top.indices[sure])
    assert bool((t.logprobs[sure, 0] == 0).all()) and bool((t.ids[sure, 1:] == -1).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_extreme_logits_finite(backend):
    h, w, _ = _inputs(7, 16, 101, scale=3000.0, seed=8)
    t = de.teacher_targets(h, w, 4, backend=backend)
    assert bool(torch.isfinite(t.logprobs).all())
    _check_topk(t, h, w, None, 4, 1.0, atol=2e-3)


# ----------------------------------------------------------------------------------------------
# the result type and the core op
# ----------------------------------------------------------------------------------------------
def test_teacher_targets_helpers():
    h, w, _ = _inputs(10, 8, 50, seed=9)
    t = de.teacher_targets(h, w, 4, backend="torch")
    assert isinstance(t, de.TeacherTargets) and len(t) == 10 and t.k == 4 and t.device.type == "cpu"
    assert t.to("cpu").ids.data_ptr() == t.ids.data_ptr()
    part = t[2:5]
    assert len(part) == 3 and torch.equal(part.ids, t.ids[2:5]) and part.vocab_size == 50
    assert len(t[3]) == 1 and len(t[-1]) == 1 and torch.equal(t[-1].ids, t.ids[-1:])
    both = TeacherTargets.cat([t[:4], t[4:]])
    assert torch.equal(both.ids, t.ids) and torch.equal(both.logprobs, t.logprobs)
    assert bool(t.mask.all())
    t.validate()
    with pytest.raises(ValueError, match="k"):
        TeacherTargets.cat([t, de.teacher_targets(h, w, 3, backend="torch")])
    with pytest.raises(ValueError, match="unique"):
        TeacherTargets(torch.tensor([[1, 1]], dtype=torch.int32), torch.tensor([[-1.0, -2.0]])).validate()
    with pytest.raises(ValueError, match="logprobs"):
        TeacherTargets(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 4))


@pytest.mark.parametrize("method,tail", [("topk", "bucket"), ("sample", "renormalize")])
def test_targets_feed_fused_distill_loss(method, tail):
    V = 97
    ht, wt, _ = _inputs(12, 24, V, seed=10)
    hs, ws, _ = _inputs(12, 16, V, seed=11)
    t = de.teacher_targets(ht, wt, 8, method=method, backend="torch",
                           generator=torch.Generator().manual_seed(0) if method == "sample" else None)
    hs.requires_grad_(True)
    loss = de.fused_distill_loss(hs, ws, t.ids, t.logprobs, tail=tail, backend="torch")  # validates the targets
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0 and torch.isfinite(hs.grad).all()


def test_empty_batch():
    h, w, _ = _inputs(0, 8, 20)
    t = de.teacher_targets(h, w, 3, backend="torch")
    assert t.ids.shape == (0, 3) and t.logprobs.shape == (0, 3)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def test_bad_input_raises_value_error_naming_the_argument():
    h, w, b = _inputs(6, 8, 20, bias=True)
    with pytest.raises(ValueError, match="k must lie in"):
        de.teacher_targets(h, w, 0)
    with pytest.raises(ValueError, match="k must lie in"):
        de.teacher_targets(h, w, 21)
    with pytest.raises(ValueError, match="k must be an int"):
        de.teacher_targets(h, w, 2.0)
    for T in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            de.teacher_targets(h, w, 2, temperature=T)
    with pytest.raises(ValueError, match="method"):
        de.teacher_targets(h, w, 2, method="nucleus")
    with pytest.raises(ValueError, match="backend"):
        de.teacher_targets(h, w, 2, backend="cuda")
    with pytest.raises(ValueError, match="generator"):
        de.teacher_targets(h, w, 2, generator=torch.Generator())  # generator with method="topk"
    with pytest.raises(ValueError, match="generator"):
        de.teacher_targets(h, w, 2, method="sample", generator=123)
    with pytest.raises(ValueError, match="weight"):
        de.teacher_targets(h, w[:, :5], 2)
    with pytest.raises(ValueError, match="weight"):
        de.teacher_targets(h, w.double(), 2)
    with pytest.raises(ValueError, match="weight has dtype"):
        de.teacher_targets(h, w.bfloat16(), 2)
    with pytest.raises(ValueError, match="bias"):
        de.teacher_targets(h, w, 2, bias=b[:5])
    with pytest.raises(ValueError, match="bias has dtype"):
        de.teacher_targets(h, w, 2, bias=b.bfloat16())
    with pytest.raises(ValueError, match="hidden"):
        de.teacher_targets(h[None], w, 2)
    with pytest.raises(ValueError, match="hidden"):
        de.teacher_targets(h.long(), w, 2)
    with pytest.raises(ValueError, match="chunk_rows"):
        de.teacher_targets(h, w, 2, chunk_rows=0)
    with pytest.raises(ValueError, match="on meta"):
        de.teacher_targets(h, w.to("meta"), 2)


@pytest.mark.parametrize("what", ["hidden", "weight", "bias"])
def test_non_finite_inputs_report_the_first_row(what):
    h, w, b = _inputs(9, 8, 20, bias=True)
    bad = {"hidden": h, "weight": w, "bias": b}[what]
    if what == "bias":
        bad[7] = float("nan")
        match = "bias contains non-finite"
    else:
        bad[5, 3] = float("inf")
        bad[7, 1] = float("nan")
        match = f"{what} contains non-finite values \\(first at row 5\\)"
    for backend in TORCH_CPU:
        with pytest.raises(ValueError, match=match):
            de.teacher_targets(h, w, 3, bias=b, backend=backend)


def test_overflowing_logits_raise_instead_of_nan():
    h, w, _ = _inputs(4, 8, 20)
    h[2] = 3e38  # finite, but the logits overflow fp32
    for backend in TORCH_CPU:
        with pytest.raises(ValueError, match="row 2"):
            de.teacher_targets(h, w, 3, backend=backend)


def test_backend_requests_that_cannot_run():
    h, w, _ = _inputs(4, 8, 20)
    if not HAS_CPU_EXT:
        with pytest.raises(ValueError, match="not built"):
            de.teacher_targets(h, w, 3, backend="cpu")


# ----------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,k", [(torch.float32, 1), (torch.float32, 64), (torch.float32, 200),
                                     (torch.bfloat16, 64), (torch.bfloat16, 100), (torch.bfloat16, 256),
                                     (torch.float16, 64), (torch.bfloat16, 300)])
def test_cuda_triton_topk(dtype, k):
    h, w, b = _inputs(517, 256, 5003, dtype=dtype, bias=True, scale=2.0, seed=12, device="cuda")
    t = de.teacher_targets(h, w, k, bias=b, temperature=1.3, backend="triton")
    assert t.ids.is_cuda
    _check_topk(t, h, w, b, k, 1.3, atol=2e-4 if dtype == torch.float32 else 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("how_h,how_w", [("t", "rows"), ("cols", "t")])
def test_cuda_triton_topk_strided(how_h, how_w):
    h, w, b = _inputs(517, 256, 5003, dtype=torch.bfloat16, bias=True, scale=2.0, seed=18, device="cuda")
    _check_strided_topk("triton", h, w, b, how_h, how_w, 64, 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("group_m", ["0", "1", "8"])
def test_cuda_triton_topk_grid_orders(monkeypatch, group_m):
    monkeypatch.setenv("DISTILL_ENGINE_TT_GROUP_M", group_m)
    h, w, b = _inputs(517, 256, 5003, dtype=torch.bfloat16, bias=True, scale=2.0, seed=13, device="cuda")
    t = de.teacher_targets(h, w, 64, bias=b, temperature=1.3, backend="triton")
    _check_topk(t, h, w, b, 64, 1.3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [64, 256])
def test_cuda_triton_cublas_logits_mode(monkeypatch, k):
    monkeypatch.setenv("DISTILL_ENGINE_TT_LOGITS", "cublas")
    h, w, b = _inputs(517, 256, 5003, dtype=torch.bfloat16, bias=True, scale=2.0, seed=16, device="cuda")
    t = de.teacher_targets(h, w, k, bias=b, backend="triton")
    _check_topk(t, h, w, b, k, 1.0, atol=2e-2)  # bf16-rounded logits when torch lacks fp32-output GEMMs


@pytest.mark.gpu
def test_cuda_triton_topk_merge_paths_agree():
    from distill_engine.kernels import teacher_targets as K

    if not _backend.cuda_extension_has("tt_topk_merge"):
        pytest.skip("extension built without CUDA")
    h, w, b = _inputs(300, 128, 4099, dtype=torch.bfloat16, bias=True, seed=13, device="cuda")
    pm, ps, cv, ci, *_ = K._split_pass(h, w, b, 64, 1.0, True)
    ids_c, lp_c, lse_c = K.merge_candidates(cv, ci, pm, ps, 64)
    lse_t = K._combine_lse(pm, ps)
    vals, pos = torch.topk(cv, 64, dim=1)
    torch.testing.assert_close(lse_c, lse_t, atol=1e-4, rtol=0)
    torch.testing.assert_close(lp_c, vals - lse_t[:, None], atol=1e-4, rtol=0)
    assert torch.equal(ids_c.sort(1).values, ci.gather(1, pos).sort(1).values)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_cuda_triton_sample(dtype):
    N, k, V = 257, 32, 5003
    h, w, b = _inputs(N, 128, V, dtype=dtype, bias=True, seed=14, device="cuda")
    gen = lambda: torch.Generator(device="cuda").manual_seed(5)  # noqa: E731
    t1 = de.teacher_targets(h, w, k, bias=b, method="sample", generator=gen(), backend="triton")
    t2 = de.teacher_targets(h, w, k, bias=b, method="sample", generator=gen(), backend="triton")
    assert torch.equal(t1.ids, t2.ids) and torch.equal(t1.logprobs, t2.logprobs)
    _check_sample_rows(t1.cpu(), k)
    u = draw_uniforms(N, k, gen(), torch.device("cuda")).cpu()
    ref_ids, ref_lp = merge_draws(R.dense_sample_reference(h.cpu(), w.cpu(), u, b.cpu(), 1.0), V)
    same = (t1.ids.cpu() == ref_ids).all(1) & (t1.logprobs.cpu() == ref_lp).all(1)
    assert int((~same).sum()) <= 3
