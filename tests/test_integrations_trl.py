"""TRL hook: the fused generalized JSD equals TRL's own dense ``GKDTrainer.generalized_jsd_loss`` (k = V, no
truncation), loss and gradients, and ``FusedGKDTrainer.compute_loss`` equals ``GKDTrainer.compute_loss``."""
from __future__ import annotations

import os
import types

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKDTrainer lives in trl.experimental
pytest.importorskip("trl")
pytest.importorskip("accelerate")

from test_integrations_hf import tiny_llama  # noqa: E402


def _rel(a, b):
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


@pytest.mark.parametrize("beta,temperature,use_num_items", [(0.0, 1.0, False), (0.3, 2.0, True), (1.0, 0.7, False),
                                                            (0.5, 1.0, False)])
def test_fused_jsd_equals_trl_dense(beta, temperature, use_num_items):
    from trl.experimental.gkd import GKDTrainer

    from distill_engine.integrations.trl import fused_generalized_jsd_loss

    g = torch.Generator().manual_seed(7)
    B, L, d_s, d_t, V = 2, 9, 12, 20, 53  # prime V
    h_s = torch.randn(B, L, d_s, generator=g, dtype=torch.float64)
    w_s = torch.randn(V, d_s, generator=g, dtype=torch.float64) * 0.5
    h_t = torch.randn(B, L, d_t, generator=g, dtype=torch.float64)
    w_t = torch.randn(V, d_t, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :3] = -100  # prompt / padding positions
    labels[1, -1] = -100
    n_items = torch.tensor(40) if use_num_items else None

    def dense(hs, ws):
        return GKDTrainer.generalized_jsd_loss(hs @ ws.t(), h_t @ w_t.t(), labels, beta=beta, temperature=temperature,
                                               num_items_in_batch=n_items)

    hs32, ws32 = h_s.float().requires_grad_(), w_s.float().requires_grad_()
    fused = fused_generalized_jsd_loss(hs32, ws32, h_t.float(), w_t.float(), labels, beta=beta,
                                       temperature=temperature, num_items_in_batch=n_items, backend="torch",
                                       validate=True)
    fused.backward()
    hs64, ws64 = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    ref = dense(hs64, ws64)
    ref.backward()
    assert ref.item() > 0
    assert abs(fused.item() - ref.item()) <= 1e-5 * abs(ref.item()), (fused.item(), ref.item())
    assert _rel(hs32.grad.double(), hs64.grad) <= 1e-5
    assert _rel(ws32.grad.double(), ws64.grad) <= 1e-5


def test_fused_gkd_compute_loss_equals_trl(tmp_path):
    """The two compute_loss methods on the same batch (``self`` stands in for the trainer: the methods read only
    the attributes given here)."""
    from trl.experimental.gkd import GKDTrainer

    from distill_engine.integrations.trl import FusedGKDTrainer

    student, teacher = tiny_llama(0, 32), tiny_llama(1, 48)
    teacher.requires_grad_(False)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 97, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # the prompt
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    fake = types.SimpleNamespace(teacher_model=teacher, beta=0.4, temperature=1.0, k=None, tail="bucket",
                                 backend="torch", generalized_jsd_loss=GKDTrainer.generalized_jsd_loss,
                                 accelerator=types.SimpleNamespace(unwrap_model=lambda m: m))
    student.zero_grad()
    ref = GKDTrainer.compute_loss(fake, student, batch)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    fused = FusedGKDTrainer.compute_loss(fake, student, batch)
    fused.backward()
    assert abs(fused.item() - ref.item()) <= 1e-5 * abs(ref.item()), (fused.item(), ref.item())
    for n, p in student.named_parameters():
        assert _rel(p.grad, ref_grads[n]) <= 1e-4, n


def test_bad_beta_is_one_line_error():
    from distill_engine.integrations.trl import fused_generalized_jsd_loss

    with pytest.raises(ValueError, match="beta must be in"):
        fused_generalized_jsd_loss(torch.zeros(1, 2, 4), torch.zeros(5, 4), torch.zeros(1, 2, 4), torch.zeros(5, 4),
                                   beta=1.5)
