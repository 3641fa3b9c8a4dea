"""relation_loss (example-level relations) against the float64 dense oracle: every kind and reduction,
masks, temperature, fp32/bf16, strided inputs, the student gradient; pooling; bad input; and
gather_across_ranks on 2 gloo ranks launched fresh with torchrun against the single-process loss."""
import os
import subprocess
import sys

import pytest
import torch

from distill_engine.ops.relation import KINDS, pool_hidden, relation_loss
from distill_engine.reference.relation import dense_relation_loss
from op_testing import assert_close_to_ref, rel_err, strided

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
B, DS, DT = 11, 7, 13


def _inputs(dtype=torch.float32, seed=0, strided_views=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, DS, generator=g)
    t = torch.cat([s, s[:, :DT - DS]], 1) * 0.7 + 0.6 * torch.randn(B, DT, generator=g)
    s, t = s.to(dtype), t.to(dtype)
    if strided_views:  # the same values as non-contiguous views: column-major student, stride-2 teacher features
        s, t = strided(s, "t"), strided(t, "cols")
    return s.requires_grad_(), t


MASK = torch.tensor([True] * 4 + [False] + [True] * 5 + [False])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction,masked", [("mean", False), ("mean", True), ("sum", True), ("none", True)])
def test_matches_oracle(kind, reduction, masked):
    s, t = _inputs(seed=1)
    mask = MASK if masked else None
    out = relation_loss(s, t, kind=kind, temperature=0.3, mask=mask, reduction=reduction)
    ref = dense_relation_loss(s, t, kind=kind, temperature=0.3, mask=mask, reduction=reduction)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    go = torch.rand(out.shape, generator=torch.Generator().manual_seed(2)) + 0.5
    (g,) = torch.autograd.grad(out, (s,), go)
    (rg,) = torch.autograd.grad(ref, (s,), go.double())
    assert float(ref.detach().abs().sum()) > 0
    assert rel_err(out, ref) < 2e-5 and rel_err(g, rg) < 2e-5, (rel_err(out, ref), rel_err(g, rg))
    if masked:
        assert float(g[~MASK].abs().max()) == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_strided_and_chunked_angle(kind, monkeypatch):
    monkeypatch.setenv("DISTILL_ENGINE_RELATION_ANGLE_CHUNK_BYTES", "1")  # one vertex per chunk
    for dtype, strided_views in ((torch.bfloat16, False), (torch.float32, True)):
        s, t = _inputs(dtype, seed=3, strided_views=strided_views)
        mask = strided(MASK) if strided_views else None
        out = relation_loss(s, t, kind=kind, mask=mask)
        ref = dense_relation_loss(s, t, kind=kind, mask=mask)
        (g,) = torch.autograd.grad(out, (s,))
        (rg,) = torch.autograd.grad(ref, (s,))
        assert g.dtype == dtype
        assert_close_to_ref(out, ref, dtype, what=f"{kind}/{dtype}/strided={strided_views} loss")
        assert_close_to_ref(g, rg, dtype, what=f"{kind}/{dtype}/strided={strided_views} grad")


def test_equal_relations_give_zero_and_tiny_batches():
    s, _ = _inputs(seed=4)
    for kind in KINDS:
        # a scaled copy has the same cosines, normalized distances and angles
        assert abs(float(relation_loss(s, 3.0 * s.detach(), kind=kind).detach())) < 1e-6
        one = relation_loss(s[:1], s[:1].detach(), kind=kind)
        assert float(one.detach()) == 0.0
        (g,) = torch.autograd.grad(one, (s,))
        assert float(g.abs().sum()) == 0.0


def _dense_pool(h, am, pooling):
    """float64 per-row loop: the mean over valid positions, the last / first valid one, zeros without any."""
    out = torch.zeros(h.shape[0], h.shape[2], dtype=torch.float64)
    for r in range(h.shape[0]):
        pos = am[r].nonzero().flatten().tolist()
        if pos:
            out[r] = {"mean": lambda: h[r, pos].double().mean(0), "last": lambda: h[r, pos[-1]].double(),
                      "cls": lambda: h[r, pos[0]].double()}[pooling]()
    return out


@pytest.mark.parametrize("strided_views", [False, True])
def test_pooling(strided_views):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(3, 6, 4, generator=g)
    am = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    if strided_views:  # (L, d)-transposed storage and a stride-2 mask
        h, am = strided(h, "t"), strided(am)
    h.requires_grad_()
    up = torch.rand(3, 4, generator=g)
    for pooling in ("mean", "last", "cls"):
        out = pool_hidden(h, am, pooling=pooling)
        (gh,) = torch.autograd.grad(out, (h,), up)
        h64 = h.detach().double().requires_grad_()
        ref = _dense_pool(h64, am, pooling)
        (rg,) = torch.autograd.grad(ref, (h64,), up.double())
        assert_close_to_ref(out, ref, what=f"{pooling} pool")
        assert_close_to_ref(gh, rg, what=f"{pooling} pool grad")
        assert float(out[2].detach().abs().sum()) == 0.0
    assert torch.allclose(pool_hidden(h, pooling="mean"), h.mean(1))
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool_hidden(h, am, pooling="max")
    with pytest.raises(ValueError, match="attention_mask has shape"):
        pool_hidden(h, am[:, :5], pooling="mean")


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="cosine"), "kind must be one of"),
    (dict(reduction="avg"), "reduction must be one of"),
    (dict(temperature=0.0), "temperature must be a finite number > 0"),
    (dict(mask=torch.ones(B)), "mask must have dtype"),
    (dict(mask=torch.ones(B + 1, dtype=torch.bool)), "mask has shape"),
])
def test_bad_input(kwargs, match):
    s, t = _inputs()
    with pytest.raises(ValueError, match=match):
        relation_loss(s, t, **kwargs)


def test_gather_without_process_group_is_refused():
    """In a fresh process (this pytest process may hold a process group from an earlier in-process run)."""
    code = ("import torch, distill_engine as de\n"
            "try:\n    de.relation_loss(torch.randn(5, 4), torch.randn(5, 6), gather_across_ranks=True)\n"
            "except ValueError as e:\n    print('REFUSED', e)\n")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "REFUSED" in res.stdout and "gather_across_ranks=True needs torch.distributed" in res.stdout, \
        res.stdout + res.stderr[-2000:]


def test_bad_tensors():
    s, t = _inputs()
    with pytest.raises(ValueError, match="teacher_emb has 10 rows but student_emb has 11"):
        relation_loss(s, t[:-1])
    with pytest.raises(ValueError, match="student_emb must have 2 dimensions"):
        relation_loss(s[None], t)
    bad = t.clone()
    bad[3, 0] = float("nan")
    with pytest.raises(ValueError, match="teacher_emb contains non-finite values \\(first at row 3\\)"):
        relation_loss(s, bad)


@pytest.mark.slow
def test_gather_across_two_ranks(tmp_path):
    """Fresh `torchrun` processes (gloo): each rank's loss equals the single-process loss on the
    concatenated batch, and its row gradient equals world_size × that loss's gradient of its rows
    (every rank's loss copy sends gradient to the owner; DP averaging divides by world_size)."""
    sys.path.insert(0, HERE)
    import _relation_gather_worker as W

    env = dict(os.environ)
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(var, None)
    env.update(PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           os.path.join(HERE, "_relation_gather_worker.py"), str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    s, t, mask = W.global_batch()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for kind in KINDS:
        x = s.clone().requires_grad_()
        ref = relation_loss(x, t, kind=kind, temperature=0.5, mask=mask)
        ref.backward()
        lo = 0
        for r, n in enumerate(W.SIZES):
            loss, grad = ranks[r][kind]
            assert rel_err(loss, ref) < 1e-5, (kind, r)
            assert rel_err(grad, 2 * x.grad[lo:lo + n]) < 1e-5, (kind, r)
            lo += n
        assert float(x.grad.abs().sum()) > 0


def test_public_api_and_modules():
    import distill_engine as de
    import distill_engine.functional as DF

    s, t = _inputs(seed=6)
    a = de.relation_loss(s, t, kind="distance")
    b = de.RelationLoss(kind="distance")(s, t)
    c = DF.relation_loss(s, t, kind="distance")
    assert float(a.detach()) == float(b.detach()) == float(c.detach()) > 0
    S = torch.randn(2, 5, 8, requires_grad=True)
    T = torch.randn(2, 5, 4)
    x = de.token_relation_loss(S, T, relation_heads=2, backend="torch")
    y = de.TokenRelationLoss(relation_heads=2, backend="torch")(S, T)
    assert float(x.detach()) == float(y.detach()) > 0
    assert de.pool_hidden is DF.pool_hidden
    with pytest.raises(ValueError, match="relation_heads must be a positive int"):
        de.TokenRelationLoss(relation_heads=0)
