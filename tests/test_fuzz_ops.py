"""Property-based fuzzing of every public op's argument space (hypothesis, derandomized, bounded examples):
shapes including 0 and 1, float32/bfloat16, non-contiguous views, ±1e4-scaled hidden states, NaN/±inf
entries, duplicate and out-of-range ids, the torch and C++ backends (and Triton, interpreted, on a few).

The property: each call either raises ValueError, or matches the float64 dense reference within the dtype's
tolerance — never a NaN, a wrong number or another exception. Clean inputs at a normal scale must not raise.
"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import distill_engine as de  # noqa: E402
from distill_engine.ops import packing as P  # noqa: E402
from distill_engine.ops.teacher_targets import TeacherTargets  # noqa: E402
from distill_engine.reference.distill_loss import dense_distill_loss  # noqa: E402
from distill_engine.reference.projection_loss import dense_projection_loss  # noqa: E402
from distill_engine.reference.teacher_targets import dense_teacher_logprobs  # noqa: E402
from op_testing import available, strided  # noqa: E402

N_EXAMPLES = int(os.environ.get("DE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=N_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


BACKENDS = available("fused_distill_loss")  # triton interpreted on CPU (TRITON_INTERPRET=1, set in conftest)
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
FAULTS = ["none", "none", "none", "nan_hidden", "inf_weight", "nan_bias", "pos_lp", "nan_lp", "inf_lp", "dup_ids",
          "bad_id"]


def _view(x: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as ``x`` in a non-contiguous layout (or as is)."""
    if how == "transposed" and x.dim() == 2:
        return strided(x, "t")
    if how == "strided" and x.dim():
        return strided(x, "cols")
    return x


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
    got, ref = got.double(), ref.double()
    if not bool(torch.isfinite(ref).all()):
        return False  # a non-finite reference must have been refused
    return bool(((got - ref).abs() <= tol * (1 + ref.abs())).all())


@st.composite
def distill_case(draw):
    N = draw(st.sampled_from([0, 1, 2, 5]))
    d = draw(st.sampled_from([1, 3, 8]))
    V = draw(st.sampled_from([1, 2, 7, 13]))
    k = draw(st.integers(1, min(V, 4)))
    return dict(N=N, d=d, V=V, k=k, dtype=draw(st.sampled_from(DTYPES)), backend=draw(st.sampled_from(BACKENDS)),
                scale=draw(st.sampled_from([1.0, 1.0, 1e4, -1e4])), view=draw(st.sampled_from(["plain", "transposed", "strided"])),
                fault=draw(st.sampled_from(FAULTS)), bias=draw(st.booleans()), labels=draw(st.booleans()),
                divergence=draw(st.sampled_from(["forward_kl", "reverse_kl", "jsd"])),
                tail=draw(st.sampled_from(["bucket", "renormalize"])), temperature=draw(st.sampled_from([1.0, 2.0])),
                empty=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def _distill_inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    N, d, V, k = c["N"], c["d"], c["V"], c["k"]
    h = torch.randn(N, d, generator=g) * c["scale"] / math.sqrt(d)
    w = torch.randn(V, d, generator=g) / math.sqrt(d)
    b = torch.randn(V, generator=g) * 0.1 if c["bias"] else None
    t_lp = torch.log_softmax(torch.randn(N, V, generator=g) * 2, dim=1)  # a teacher distribution
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)]) if N else torch.zeros(0, k, dtype=torch.long)
    lp = t_lp.gather(1, ids) if N else torch.zeros(0, k)
    if c["empty"] and N and k > 1:  # empty slots come last
        ids[0, k - 1], lp[0, k - 1] = -1, float("-inf")
    labels = torch.randint(0, V, (N,), generator=g) if c["labels"] else None
    if labels is not None and N > 1:
        labels[1] = -100
    f = c["fault"]
    if N:
        if f == "nan_hidden":
            h[N - 1, 0] = float("nan")
        elif f == "pos_lp":
            lp[0, 0] = 0.5
        elif f == "nan_lp":
            lp[0, 0] = float("nan")
        elif f == "inf_lp":
            lp[0, 0] = float("inf")
        elif f == "dup_ids" and k > 1:
            ids[0, 1] = ids[0, 0]
        elif f == "bad_id":
            ids[0, 0] = V
    if f == "inf_weight":
        w[V - 1, 0] = float("inf")
    if f == "nan_bias" and b is not None:
        b[0] = float("nan")
    dt = c["dtype"]
    h, w = h.to(dt), w.to(dt)
    b = b.to(dt) if b is not None else None
    return _view(h, c["view"]), _view(w, c["view"]), ids, _view(lp, c["view"]), labels, b


@FUZZ
@given(distill_case())
def test_fuzz_fused_distill_loss(c):
    h, w, ids, lp, labels, b = _distill_inputs(c)
    kw = dict(labels=labels, bias=b, divergence=c["divergence"], temperature=c["temperature"], tail=c["tail"],
              ce_weight=0.3 if labels is not None else 0.0)
    if c["divergence"] == "reverse_kl" and c["tail"] == "renormalize":
        kw["tail"] = "bucket"
    hh = h.detach().clone().requires_grad_(True)
    try:
        got = de.fused_distill_loss(hh, w, ids, lp, backend=c["backend"], **kw)
    except ValueError:
        event("refused")
        return
    event("matched the reference")
    clean = c["fault"] == "none" or (c["fault"] == "dup_ids" and c["k"] == 1) or (c["fault"] == "nan_bias" and b is None)
    ref_h = h.detach().double().clone().requires_grad_(True)
    ref = dense_distill_loss(ref_h, w.double(), ids, lp.double(), **{**kw, "bias": None if b is None else b.double()})
    assert not (c["fault"] in ("nan_hidden", "inf_weight", "pos_lp", "nan_lp", "inf_lp", "bad_id") and c["N"] > 0), \
        f"fault {c['fault']} was not refused (loss {float(got)})"
    tol = TOL[c["dtype"]]
    assert _close(got.detach(), ref.detach(), tol), (float(got), float(ref), c)
    if c["N"] and c["dtype"] == torch.float32 and clean and abs(c["scale"]) == 1.0:
        got.backward()
        ref.backward()
        assert _close(hh.grad, ref_h.grad, 1e-4), c


@st.composite
def targets_case(draw):
    V = draw(st.sampled_from([1, 2, 7, 13]))
    return dict(N=draw(st.sampled_from([0, 1, 3])), d=draw(st.sampled_from([1, 4])), V=V, k=draw(st.integers(1, V)),
                dtype=draw(st.sampled_from(DTYPES)), backend=draw(st.sampled_from(BACKENDS)),
                scale=draw(st.sampled_from([1.0, 1e4, -1e4])), view=draw(st.sampled_from(["plain", "transposed", "strided"])),
                fault=draw(st.sampled_from(["none", "none", "nan_hidden", "inf_weight", "nan_bias"])),
                bias=draw(st.booleans()), temperature=draw(st.sampled_from([0.5, 1.0])),
                method=draw(st.sampled_from(["topk", "sample"])), seed=draw(st.integers(0, 2**16)))


@FUZZ
@given(targets_case())
def test_fuzz_teacher_targets(c):
    g = torch.Generator().manual_seed(c["seed"])
    N, d, V, k = c["N"], c["d"], c["V"], c["k"]
    h = torch.randn(N, d, generator=g) * c["scale"] / math.sqrt(d)
    w = torch.randn(V, d, generator=g)
    b = torch.randn(V, generator=g) if c["bias"] else None
    if c["fault"] == "nan_hidden" and N:
        h[0, 0] = float("nan")
    if c["fault"] == "inf_weight":
        w[0, d - 1] = float("-inf")
    if c["fault"] == "nan_bias" and b is not None:
        b[V - 1] = float("nan")
    h, w = _view(h.to(c["dtype"]), c["view"]), _view(w.to(c["dtype"]), c["view"])
    b = None if b is None else b.to(c["dtype"])
    gen = torch.Generator().manual_seed(1) if c["method"] == "sample" else None
    try:
        t = de.teacher_targets(h, w, k, bias=b, temperature=c["temperature"], method=c["method"], generator=gen,
                               backend=c["backend"])
    except ValueError:
        assert c["fault"] != "none" or abs(c["scale"]) > 1, c
        event("refused")
        return
    event("matched the reference")
    ref = dense_teacher_logprobs(h, w, None if b is None else b, c["temperature"])  # [N, V] float64
    assert bool(torch.isfinite(ref).all()), f"non-finite teacher logits were not refused: {c}"
    assert t.ids.shape == (N, k) and t.logprobs.shape == (N, k)
    slot = t.ids >= 0
    assert bool(((t.ids >= -1) & (t.ids < V)).all())
    tol = TOL[c["dtype"]] * 10  # bf16 logits of ±1e4-scaled states: relative rounding of the inputs
    if c["method"] == "topk":
        assert bool(slot.all())
        got = t.logprobs.double()
        want = ref.gather(1, t.ids.long())
        assert _close(got, want, tol), c
        top = ref.topk(k, dim=1).values
        assert _close(got.sort(1, descending=True).values, top, tol), c  # ties may swap ids, not values
    else:  # sampled: ids unique per row, log(count / k) with counts summing to k
        for r in range(N):
            ids_r = t.ids[r][slot[r]]
            assert ids_r.unique().numel() == ids_r.numel()
            counts = (t.logprobs[r][slot[r]].double().exp() * k).round()
            assert int(counts.sum()) == k and bool((counts >= 1).all())


@st.composite
def projection_case(draw):
    return dict(N=draw(st.sampled_from([0, 1, 4])), d_s=draw(st.sampled_from([1, 3, 6])),
                d_t=draw(st.sampled_from([1, 5])), dtype=draw(st.sampled_from(DTYPES)),
                backend=draw(st.sampled_from(BACKENDS)), kind=draw(st.sampled_from(["mse", "cosine"])),
                scale=draw(st.sampled_from([1.0, 1e4, -1e4])), view=draw(st.sampled_from(["plain", "transposed", "strided"])),
                fault=draw(st.sampled_from(["none", "none", "nan_student", "inf_teacher", "nan_weight"])),
                bias=draw(st.booleans()), mask=draw(st.booleans()), reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                seed=draw(st.integers(0, 2**16)))


@FUZZ
@given(projection_case())
def test_fuzz_fused_projection_loss(c):
    g = torch.Generator().manual_seed(c["seed"])
    N, ds, dt = c["N"], c["d_s"], c["d_t"]
    h = torch.randn(N, ds, generator=g) * c["scale"]
    W = torch.randn(dt, ds, generator=g) / math.sqrt(ds)
    t = torch.randn(N, dt, generator=g)
    b = torch.randn(dt, generator=g) if c["bias"] else None
    m = (torch.arange(N) % 2 == 0) if c["mask"] else None
    if N and c["fault"] == "nan_student":
        h[0, 0] = float("nan")
    if N and c["fault"] == "inf_teacher":
        t[0, 0] = float("inf")
    if c["fault"] == "nan_weight":
        W[0, 0] = float("nan")
    dtp = c["dtype"]
    h, W, t = (_view(x.to(dtp), c["view"]) for x in (h, W, t))
    b = None if b is None else _view(b.to(dtp), c["view"])
    try:
        got = de.fused_projection_loss(h, W, t, proj_bias=b, kind=c["kind"], mask=m, reduction=c["reduction"],
                                       backend=c["backend"])
    except ValueError:
        assert c["fault"] != "none", c
        event("refused")
        return
    event("matched the reference")
    ref = dense_projection_loss(h.double(), W.double(), t.double(), proj_bias=None if b is None else b.double(),
                                kind=c["kind"], mask=m, reduction=c["reduction"])
    assert c["fault"] == "none" or c["N"] == 0, f"fault {c['fault']} was not refused: {c}"
    # the tolerance is relative to |loss|: it covers the 1e8-sized squared errors of ±1e4-scaled states
    assert _close(got, ref, TOL[dtp] * (10 if abs(c["scale"]) > 1 and dtp == torch.bfloat16 else 1)), (got, ref, c)


@st.composite
def pack_case(draw):
    V = draw(st.sampled_from([1, 2, 7, 300]))
    return dict(N=draw(st.sampled_from([0, 1, 4])), V=V, k=draw(st.integers(1, min(V, 5))),
                fmt=draw(st.sampled_from(["float16", "bfloat16", "uint8", "float32"])), bitpack=draw(st.booleans()),
                fault=draw(st.sampled_from(["none", "none", "empty", "pos", "nan", "inf", "neg_inf_slot", "bad_id"])),
                view=draw(st.sampled_from(["plain", "strided"])), seed=draw(st.integers(0, 2**16)))


@FUZZ
@given(pack_case())
def test_fuzz_pack_unpack(c):
    from test_packing import _bound

    g = torch.Generator().manual_seed(c["seed"])
    N, V, k = c["N"], c["V"], c["k"]
    lp_full = torch.log_softmax(torch.randn(N, V, generator=g) * 3, dim=1)
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(N)]).int() if N else torch.zeros(0, k, dtype=torch.int32)
    lp = lp_full.gather(1, ids.long()) if N else torch.zeros(0, k)
    f = c["fault"]
    if N:
        if f == "empty":
            ids[0, k - 1:], lp[0, k - 1:] = -1, float("-inf")
        elif f == "pos":
            lp[0, 0] = 0.5
        elif f == "nan":
            lp[N - 1, k - 1] = float("nan")
        elif f == "inf":
            lp[0, 0] = float("inf")
        elif f == "neg_inf_slot":
            lp[0, 0] = float("-inf")
        elif f == "bad_id":
            ids[0, 0] = V
    t = TeacherTargets(_view(ids, c["view"]), _view(lp, c["view"]), V)
    try:
        p = de.pack_targets(t, c["fmt"], bitpack_ids=c["bitpack"])
    except ValueError:
        assert f in ("pos", "nan", "inf", "bad_id") and N, c
        event("refused")
        return
    event("matched the reference")
    assert f not in ("pos", "nan", "inf", "bad_id") or N == 0, f"invalid targets were packed: {c}"
    for src in (p, p.to_bytes()):
        u = de.unpack_targets(src)
        assert torch.equal(u.ids, ids)
        slot = ids >= 0
        assert bool((u.logprobs[~slot] == float("-inf")).all())
        fin = slot & torch.isfinite(lp)
        err = torch.where(fin, (u.logprobs - lp).abs(), torch.zeros_like(lp)).amax(1) if N else torch.zeros(0)
        floor = torch.full_like(lp, P.U8_FLOOR)
        assert bool((err <= _bound(TeacherTargets(ids, torch.where(fin | ~slot, lp, floor), V), c["fmt"])).all()), c
        if f == "neg_inf_slot" and N:  # a filled slot of probability 0 stays (numerically) 0
            assert float(u.logprobs[0, 0]) <= P.U8_FLOOR + 1e-3 and math.exp(float(u.logprobs[0, 0])) < 1e-6
