"""csrc/cpu/math.h: fast_expf, the one exp of every CPU kernel, against float64 exp over the whole fp32 range.

It is reached through the `_vexp` operator (torch.ops.distill_engine_C._vexp), which applies exactly the
inline function the kernels use.  Stated bound (csrc/cpu/math.h): <= 1 ulp of the true value for normal
results, <= one subnormal step (2^-149) below FLT_MIN, +inf exactly where float32 exp overflows, 0 for
-inf and anything below -104, NaN only for NaN.
"""
from __future__ import annotations

import pytest
import torch

from distill_engine import _backend

if not _backend.cpu_extension_has("_vexp"):
    pytest.skip("distill_engine._C is not built (run `make build`)", allow_module_level=True)

_C = _backend.cpu_extension()
TINY = torch.finfo(torch.float32).tiny
SPECIALS = [float("-inf"), -1e30, -200.0, -110.0, -104.0, -103.9, -103.28, -100.0, -87.5, -87.33, -10.0, -1e-30,
            -0.0, 0.0, 1e-30, 1e-7, 1.0, 10.0, 80.0, 88.72, 88.7228, 88.72283, 88.7229, 88.73, 1e30, float("inf")]


def _inputs() -> torch.Tensor:
    """Every 1024th fp32 bit pattern (both signs, every exponent), each moved by a random offset in its
    block of 1024 patterns, then a dense sweep of the range where the result is finite and non-zero."""
    g = torch.Generator().manual_seed(11)
    bits = torch.arange(0, 2**32, 1024, dtype=torch.int64) + torch.randint(0, 1024, (2**22,), generator=g)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    sweep = bits.view(torch.float32)
    sweep = sweep[~torch.isnan(sweep)]
    dense = torch.linspace(-105.0, 89.0, 1_000_001)
    return torch.cat([sweep, dense, torch.tensor(SPECIALS)])


def _ulp_error(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|y − ref| in units of the last place of the true value ref (float64, normal fp32 range)."""
    _, e = torch.frexp(ref)  # ref = m·2^e, m in [0.5, 1): one fp32 ulp is 2^(e − 24)
    return (y.double() - ref).abs() / torch.ldexp(torch.ones_like(ref), (e - 24))


def test_fast_expf_against_float64_over_the_fp32_range():
    x = _inputs()
    y = _C._vexp(x)
    ref = torch.exp(x.double())
    ref32 = ref.float()
    assert not torch.isnan(y).any(), "NaN from a non-NaN input"
    normal = torch.isfinite(ref32) & (ref32 >= TINY)
    err = _ulp_error(y[normal], ref[normal])
    assert err.max().item() <= 1.0, f"max error {err.max().item():.3f} ulp at x = {x[normal][err.argmax()].item()!r}"
    sub = ref32 < TINY  # subnormal or zero results
    assert ((y[sub].double() - ref[sub]).abs() / 2.0**-149).max().item() <= 1.0
    assert torch.equal(torch.isinf(y), torch.isinf(ref32)), "overflow must happen exactly where fp32 exp overflows"


def test_fast_expf_edges():
    x = torch.tensor([float("-inf"), -200.0, -104.0, -0.0, 0.0, float("inf"), float("nan")])
    y = _C._vexp(x)
    assert y[:3].tolist() == [0.0, 0.0, 0.0]
    assert y[3].item() == 1.0 and y[4].item() == 1.0
    assert y[5].item() == float("inf")
    assert torch.isnan(y[6])


def test_vexp_argument_checks():
    with pytest.raises(RuntimeError, match="x must"):
        _C._vexp(torch.zeros(3, dtype=torch.float64))
