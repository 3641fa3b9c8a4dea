"""torch.library registration: ``opcheck`` on every registered op (schema, fake tensors, autograd registration,
AOT dispatch), equality with the eager ops and the float64 references, and a tiny HF student's training step
compiled with ``torch.compile(fullgraph=True)`` around model + fused loss: zero graph breaks, eager gradients."""
from __future__ import annotations

import os

import pytest
import torch

from distill_engine.ops import library as L
from distill_engine.reference.distill_loss import dense_distill_loss
from distill_engine.reference.projection_loss import dense_projection_loss

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _distill_inputs(N=7, d=5, V=31, k=4, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, requires_grad=True)
    w = (torch.randn(V, d, generator=g) * 0.5).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.1).requires_grad_() if bias else None
    lp_full = torch.log_softmax(torch.randn(N, V, generator=g) * 2, -1)
    lp, ids = lp_full.topk(k, -1)
    ids[1, -1] = -1  # an empty slot
    labels = torch.randint(0, V, (N,), generator=g)
    labels[2] = -100  # an ignored row
    return h, w, b, ids, lp, labels


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_fused_distill_loss(reduction, bias):
    h, w, b, ids, lp, labels = _distill_inputs(bias=bias)
    rest = torch.log1p(-lp.exp().sum(1).clamp(max=0.999))  # [N] the teacher's rest log-mass
    args = (h, w, b, ids, lp, rest, labels, "jsd", 0.3, 2.0, 0.25, "bucket", -100, reduction, "torch", True, True)
    torch.library.opcheck(torch.ops.distill_engine.fused_distill_loss.default, args, test_utils=OPCHECK_TESTS)
    if reduction == "none":
        grad_rows = torch.randn(h.shape[0])
        plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args[:13])  # no double backward
        torch.library.opcheck(torch.ops.distill_engine.fused_distill_loss_backward.default,
                              (grad_rows,) + plain + ("torch",),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("divergence,backend", [("forward_kl", "torch"), ("reverse_kl", "torch"), ("jsd", "torch"),
                                                ("jsd", "cpu"), ("forward_kl", "triton")])
def test_library_distill_equals_reference(reduction, divergence, backend):
    h, w, b, ids, lp, labels = _distill_inputs(N=9, d=6, V=37, seed=1)
    kw = dict(labels=labels, bias=b, divergence=divergence, temperature=1.5, ce_weight=0.2, reduction=reduction)
    out = L.fused_distill_loss(h, w, ids, lp, backend=backend, **kw)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)) if reduction == "none" else None
    grads = torch.autograd.grad(out, (h, w, b), cot)
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (h, w, b))
    ref = dense_distill_loss(h64, w64, ids, lp, **{**kw, "bias": b64})
    ref_grads = torch.autograd.grad(ref, (h64, w64, b64), None if cot is None else cot.double())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_library_distill_with_rest_equals_eager(reduction):
    """teacher_rest_logprob passes through the custom op exactly as through the eager op."""
    from distill_engine.ops.distill_loss import fused_distill_loss

    h, w, b, ids, lp, labels = _distill_inputs(N=8, d=5, V=29, seed=3)
    rest = torch.log1p(-lp.exp().sum(1).clamp(max=0.999)) - 0.01  # [N] a rest mass that is not 1 − Σp
    kw = dict(labels=labels, bias=b, divergence="reverse_kl", reduction=reduction, backend="torch",
              teacher_rest_logprob=rest)
    out = L.fused_distill_loss(h, w, ids, lp, **kw)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)) if reduction == "none" else None
    grads = torch.autograd.grad(out, (h, w, b), cot)
    ref = fused_distill_loss(h, w, ids, lp, **kw)
    ref_grads = torch.autograd.grad(ref, (h, w, b), cot)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-7)


def test_opcheck_teacher_targets_and_equality():
    from distill_engine.ops.teacher_targets import teacher_targets

    g = torch.Generator().manual_seed(4)
    h, w, b = torch.randn(6, 5, generator=g), torch.randn(29, 5, generator=g), torch.randn(29, generator=g)
    for method, seed in (("topk", None), ("sample", 11)):
        torch.library.opcheck(torch.ops.distill_engine.teacher_targets.default,
                              (h, w, b, 5, 1.3, method, seed, "torch", True),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    t_lib = L.teacher_targets(h, w, 5, bias=b, temperature=1.3, backend="torch")
    t_eager = teacher_targets(h, w, 5, bias=b, temperature=1.3, backend="torch")
    assert torch.equal(t_lib.ids, t_eager.ids) and torch.equal(t_lib.logprobs, t_eager.logprobs)
    assert torch.equal(t_lib.rest_logprob, t_eager.rest_logprob)
    ref = torch.log_softmax((h.double() @ w.double().t() + b.double()) / 1.3, -1).gather(1, t_lib.ids.long())
    torch.testing.assert_close(t_lib.logprobs.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_opcheck_projection_and_equality(kind, reduction):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 5, 7, generator=g).transpose(0, 1).requires_grad_()  # [5, 2, 7] non-contiguous
    w = (torch.randn(11, 7, generator=g) * 0.3).requires_grad_()
    b = (torch.randn(11, generator=g) * 0.1).requires_grad_()
    t = torch.randn(5, 2, 11, generator=g)
    mask = torch.ones(5, 2, dtype=torch.bool)
    mask[3, 1] = False
    args = (h, w, t, b, mask, kind, reduction, "torch", True)
    torch.library.opcheck(torch.ops.distill_engine.fused_projection_loss.default, args, test_utils=OPCHECK_TESTS)
    out = L.fused_projection_loss(h, w, t, proj_bias=b, kind=kind, mask=mask, reduction=reduction, backend="torch")
    cot = torch.randn(out.shape, generator=g) if reduction == "none" else None
    grads = torch.autograd.grad(out, (h, w, b), cot)
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (h, w, b))
    ref = dense_projection_loss(h64, w64, t.double(), proj_bias=b64, kind=kind, mask=mask, reduction=reduction)
    ref_grads = torch.autograd.grad(ref, (h64, w64, b64), None if cot is None else cot.double())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-6)


def test_bad_option_is_value_error_through_the_op():
    h, w, b, ids, lp, labels = _distill_inputs()
    with pytest.raises(ValueError, match="divergence"):
        L.fused_distill_loss(h, w, ids, lp, divergence="kl")


def test_compiled_hf_training_step_fullgraph_equals_eager():
    """torch.compile(fullgraph=True) over a tiny Llama student's base model + the fused loss on its lm_head:
    compiles with zero graph breaks (fullgraph raises on any) and gives the eager gradients. Inductor by default
    (DISTILL_ENGINE_COMPILE_BACKEND=aot_eager skips code generation, e.g. without a C++ compiler)."""
    pytest.importorskip("transformers")
    import torch._dynamo
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=53, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=False)
    student = LlamaForCausalLM(cfg).float()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 53, (2, 8), generator=g)
    t_lp, t_ids = torch.log_softmax(torch.randn(14, 53, generator=g), -1).topk(6, -1)  # [2·7, 6]
    labels = ids[:, 1:].reshape(-1)

    def step(input_ids):
        hs = student.model(input_ids=input_ids, use_cache=False).last_hidden_state  # [B, L, d]
        h = hs[:, :-1].reshape(-1, hs.shape[-1])  # [B·(L−1), d]
        return L.fused_distill_loss(h, student.lm_head.weight, t_ids, t_lp, labels=labels, ce_weight=0.5,
                                    backend="torch", validate=False)

    def grads_of(fn):
        student.zero_grad()
        loss = fn(ids)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in student.parameters()]

    eager_loss, eager_grads = grads_of(step)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(step)(ids)
    assert explain.graph_break_count == 0, explain.break_reasons
    backend = os.environ.get("DISTILL_ENGINE_COMPILE_BACKEND", "inductor")
    comp_loss, comp_grads = grads_of(torch.compile(step, fullgraph=True, backend=backend))
    torch.testing.assert_close(comp_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for a, e in zip(comp_grads, eager_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
