"""The Module faces added for issue 11: FusedProjectionLoss (one projection pair) and TeacherTargetExtractor
equal their functional ops and the float64 references; bad options fail at construction with a ValueError."""
from __future__ import annotations

import pytest
import torch

import distill_engine as de
import distill_engine.functional as DF
from distill_engine.reference.projection_loss import dense_projection_loss


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_fused_projection_loss_module_equals_reference(kind):
    torch.manual_seed(0)
    m = de.FusedProjectionLoss(7, 11, kind=kind, backend="torch")
    h = torch.randn(3, 5, 7).requires_grad_()
    t = torch.randn(3, 5, 11)
    mask = torch.rand(3, 5) > 0.3
    loss = m(h, t, mask)
    loss.backward()
    h64 = h.detach().double().requires_grad_()
    w64 = m.proj.weight.detach().double().requires_grad_()
    b64 = m.proj.bias.detach().double().requires_grad_()
    ref = dense_projection_loss(h64, w64, t.double(), proj_bias=b64, kind=kind, mask=mask)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for got, want in ((h.grad, h64.grad), (m.proj.weight.grad, w64.grad), (m.proj.bias.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_teacher_target_extractor_equals_functional():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(6, 5, generator=g), torch.randn(23, 5, generator=g)
    ext = de.TeacherTargetExtractor(4, temperature=0.8, backend="torch")
    got = ext(h, w)
    want = DF.teacher_targets(h, w, 4, temperature=0.8, backend="torch")
    assert torch.equal(got.ids, want.ids) and torch.equal(got.logprobs, want.logprobs)
    ref = torch.log_softmax(h.double() @ w.double().t() / 0.8, -1).topk(4, -1).values
    torch.testing.assert_close(got.logprobs.double(), ref, rtol=1e-5, atol=1e-6)


def test_faces_reject_bad_options():
    with pytest.raises(ValueError, match="kind"):
        de.FusedProjectionLoss(4, 4, kind="l1")
    with pytest.raises(ValueError, match="student_dim"):
        de.FusedProjectionLoss(0, 4)
    with pytest.raises(ValueError, match="method"):
        de.TeacherTargetExtractor(4, method="beam")
    with pytest.raises(ValueError, match="k must"):
        de.TeacherTargetExtractor(0)
