"""The engine's GKD loss equals TRL's ``GKDTrainer.generalized_jsd_loss`` on one fixed batch (k = V: no truncation).

TRL is a benchmark peer only (requirements-bench.txt); the test skips when it is not installed.

Definitions compared (both: M = β·P_teacher + (1−β)·Q_student, JSD_β = β·KL(P‖M) + (1−β)·KL(Q‖M), both
distributions at temperature T; TRL's β = 0 is KL(P‖Q) = the engine's forward_kl, β = 1 is KL(Q‖P) = reverse_kl).
Differences, matched here: the engine scales the divergence by T² (Hinton's gradient-magnitude correction) and
TRL does not, so engine = T² · TRL; TRL's ``batchmean`` with labels divides by the number of unmasked positions,
the engine's ``mean`` by the number of rows whose label is not ignore_index — the same count.
"""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_models import STUDENT_CFG, TEACHER_CFG  # noqa: E402

import distill_engine as de  # noqa: E402

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl_gkd = pytest.importorskip("trl.experimental.gkd", reason="TRL (benchmark peer) not installed")


@pytest.fixture(scope="module")
def batch():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(**STUDENT_CFG)).eval()
    teacher = LlamaForCausalLM(LlamaConfig(**TEACHER_CFG)).eval()
    g = torch.Generator().manual_seed(1)
    B, L, P = 3, 14, 4
    ids = torch.randint(0, 256, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 10:] = 0  # a shorter sequence (right padding)
    labels = ids[:, 1:].clone()
    labels[:, :P - 1] = -100  # loss over the continuation only, as on-policy
    labels[mask[:, 1:] == 0] = -100
    with torch.no_grad():
        hs = student.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]  # [B, L-1, d_s]
        ht = teacher.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]  # [B, L-1, d_t]
    return dict(hs=hs, ht=ht, Ws=student.lm_head.weight.detach(), Wt=teacher.lm_head.weight.detach(), labels=labels)


def _engine(b, divergence, beta, T):
    V = b["Wt"].shape[0]
    rows = (b["labels"].reshape(-1) != -100).nonzero().squeeze(1)
    ht = b["ht"].reshape(-1, b["ht"].shape[-1]).index_select(0, rows)
    tt = de.teacher_targets(ht, b["Wt"], V, temperature=T)  # k = V: the full teacher distribution
    h = b["hs"].reshape(-1, b["hs"].shape[-1]).clone().requires_grad_(True)
    loss = de.fused_distill_loss(h.index_select(0, rows), b["Ws"], tt.ids, tt.logprobs, divergence=divergence,
                                 beta=beta, temperature=T, tail="bucket", reduction="mean")
    loss.backward()
    return loss, h.grad


def _trl(b, beta, T):
    h = b["hs"].reshape(-1, b["hs"].shape[-1]).clone().requires_grad_(True)
    s_logits = (h @ b["Ws"].t()).reshape(*b["hs"].shape[:2], -1)  # [B, L-1, V]
    t_logits = b["ht"] @ b["Wt"].t()
    loss = trl_gkd.GKDTrainer.generalized_jsd_loss(s_logits, t_logits, labels=b["labels"], beta=beta,
                                                    temperature=T, reduction="batchmean")
    loss.backward()
    return loss, h.grad


@pytest.mark.parametrize("divergence,beta,T", [("jsd", 0.5, 1.0), ("jsd", 0.1, 2.0), ("jsd", 0.9, 0.7),
                                               ("forward_kl", 0.0, 1.0), ("reverse_kl", 1.0, 1.5)])
def test_gkd_loss_equals_trl_generalized_jsd(batch, divergence, beta, T):
    ours, g_ours = _engine(batch, divergence, beta, T)
    theirs, g_theirs = _trl(batch, beta, T)
    assert float(theirs.detach()) > 0
    torch.testing.assert_close(ours, theirs * T * T, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_ours, g_theirs * T * T, rtol=1e-5, atol=1e-7)
