"""The shared op-test helpers (tests/op_testing.py) do what the op tests rely on: the metric sees a wrong entry,
the dtype table and the torch-in-dtype bound are applied, unavailable backends skip with a reason, and strided
views hold the same values in non-contiguous memory."""
import pytest
import torch

import op_testing as OT


def test_rel_err_is_max_abs_over_max_ref_with_a_floor():
    ref = torch.tensor([[4.0, -2.0], [1.0, 0.5]], dtype=torch.float64)
    got = ref.float().clone()
    got[1, 1] += 0.01
    assert OT.rel_err(got, ref) == pytest.approx(0.01 / 4.0, rel=1e-5)
    assert OT.rel_err(torch.full((3,), 1e-7), torch.zeros(3, dtype=torch.float64)) == pytest.approx(0.1)
    assert OT.rel_err(torch.zeros(0), torch.zeros(0)) == 0.0


def test_assert_close_to_ref_uses_the_dtype_table_and_the_torch_bound():
    ref = torch.linspace(-1, 1, 11, dtype=torch.float64)
    OT.assert_close_to_ref(ref.float() + 1e-5, ref, torch.float32)
    with pytest.raises(AssertionError, match="relative error"):
        OT.assert_close_to_ref(ref.float() + 1e-4, ref, torch.float32, what="x")
    OT.assert_close_to_ref(ref.float() + 1e-2, ref, torch.bfloat16)
    with pytest.raises(AssertionError, match="not finite"):
        OT.assert_close_to_ref(torch.full((11,), float("nan")), ref)
    with pytest.raises(AssertionError, match="shape"):
        OT.assert_close_to_ref(ref.float()[:5], ref)
    # a kernel as wrong as twice PyTorch-in-bf16 (plus the table) passes; one far worse does not
    torch_bf16 = ref.bfloat16()
    e_torch = OT.rel_err(torch_bf16, ref)
    assert e_torch > 0
    OT.assert_close_to_ref(ref.float() + 2 * e_torch, ref, torch.float32, torch_same_dtype=torch_bf16)
    with pytest.raises(AssertionError):
        OT.assert_close_to_ref(ref.float() + 3 * e_torch, ref, torch.float32, torch_same_dtype=torch_bf16)
    with pytest.raises(AssertionError, match="d_hidden"):
        OT.assert_all_close((ref.float(), ref.float() + 1), (ref, ref))


def test_backends_skip_with_the_reason(monkeypatch):
    monkeypatch.setitem(OT.CPU_SYMBOL, "no_such_op", "no_such_symbol")
    params = {p.id: p for p in OT.backends("no_such_op", ["torch", "cpu"])}
    assert not params["torch"].marks
    (mark,) = params["cpu"].marks
    assert mark.name == "skip" and "no_such_symbol" in mark.kwargs["reason"]
    assert OT.available("no_such_op", ["torch", "cpu"]) == ["torch"]
    with pytest.raises(pytest.skip.Exception, match="no_such_symbol"):
        OT.skip_unavailable("cpu", "no_such_op")


@pytest.mark.parametrize("how", ["cols", "rows", "t"])
def test_strided_views_hold_the_same_values(how):
    x = torch.randn(5, 7)
    x[1, 2] = float("-inf")
    v = OT.strided(x, how)
    assert not v.is_contiguous() and v.is_leaf and not v.requires_grad
    assert torch.equal(v, x) or torch.equal(v.nan_to_num(), x.nan_to_num())
    if how != "t":  # the gaps are NaN: reading the storage as contiguous poisons the result
        assert bool(torch.isnan(v.as_strided((v.numel(),), (1,))).any())
    ids = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    assert torch.equal(OT.strided(ids, how), ids) and not OT.strided(ids, how).is_contiguous()
    mask = torch.tensor([True, False, True])
    if how != "t":
        assert torch.equal(OT.strided(mask, how), mask) and not OT.strided(mask, how).is_contiguous()
    assert OT.strided(None) is None
    with pytest.raises(ValueError, match="how"):
        OT.strided(x, "diagonal")
