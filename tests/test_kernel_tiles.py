"""The shared Triton building blocks (distill_engine/kernels/_tiles.py) on their own edge cases.

The tile GEMM is exercised through every kernel's own tests (loss, teacher targets, projection); here: the
guarded online log-sum-exp step on rows whose leading tiles hold no mass at all (through the rest-mass
reduction ``buf_lse``, the one caller that meets such rows), the split merge in both orientations its callers
use, and the one-line errors of the host checks. Interpreted on CPU (TRITON_INTERPRET=1, tests/conftest.py).
"""
import pytest
import torch

pytest.importorskip("triton")

from distill_engine.kernels import _tiles  # noqa: E402
from distill_engine.kernels import distill_loss as K  # noqa: E402

F64 = torch.float64


def test_online_lse_guard_rows_without_mass():
    # V prime; the interpreter's rest-LSE tile is 64 columns, so rows 1-2 start with whole -inf tiles
    c, V, T = 7, 211, 0.7
    gen = torch.Generator().manual_seed(3)
    buf = torch.randn(c, V, generator=gen) * 4.0
    buf[0] = float("-inf")                               # no mass at all: -inf, not NaN
    buf[1, :150] = float("-inf")                         # two whole -inf tiles, then mass
    buf[2, :-1] = float("-inf")                          # only the last column
    buf[3, torch.randperm(V, generator=gen)[:100]] = float("-inf")   # scattered (the teacher ids)
    buf[4] *= 1e3                                        # large logits: the shift keeps exp finite
    out = K.buf_lse(buf, T)
    ref = torch.logsumexp(buf.to(F64) / T, dim=1)
    assert out[0].item() == float("-inf")
    assert torch.isfinite(out[1:]).all()
    assert ((out[1:].to(F64) - ref[1:]).abs() / ref[1:].abs().clamp_min(1.0)).max().item() < 1e-6


@pytest.mark.parametrize("n_split", [1, 3, 8])
def test_combine_lse_merges_splits_in_either_layout(n_split):
    gen = torch.Generator().manual_seed(n_split)
    c, V = 5, 97
    z = torch.randn(c, V, generator=gen) * 30.0           # [c, V]
    parts = torch.tensor_split(z, n_split, dim=1)
    pm = torch.stack([p.max(dim=1).values for p in parts], dim=1)                                # [c, S]
    ps = torch.stack([torch.exp(p - p.max(dim=1, keepdim=True).values).sum(dim=1) for p in parts], dim=1)
    ref = torch.logsumexp(z.to(F64), dim=1)
    rows = _tiles.combine_lse(pm, ps, dim=1)              # teacher top-k layout [c, S]
    cols = _tiles.combine_lse(pm.t().contiguous(), ps.t().contiguous(), dim=0)   # loss layout [S, c]
    assert rows.dtype == torch.float32 and torch.equal(rows, cols)
    assert ((rows.to(F64) - ref).abs() / ref.abs()).max().item() < 1e-6


def test_host_checks_name_the_fix(monkeypatch):
    monkeypatch.setenv("DISTILL_ENGINE_TT_LOGITS", "bogus")
    with pytest.raises(ValueError, match="DISTILL_ENGINE_TT_LOGITS must be 'triton' or 'cublas'"):
        _tiles.logits_mode("DISTILL_ENGINE_TT_LOGITS")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"^teacher_targets: backend='triton' needs CUDA tensors .*TRITON_INTERPRET=1"):
        _tiles.check_device(torch.zeros(2), "teacher_targets")
    assert _tiles.dot_mode(torch.zeros(1)) == 1 and _tiles.dot_mode(torch.zeros(1, dtype=torch.bfloat16)) == 2
