"""On-policy distillation pieces: KV-cache generation, rollout batches, the λ mix, the sampled reverse-KL head,
config validation. The multi-process launches are in tests/test_onpolicy_launch.py."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_models import STUDENT_CFG  # noqa: E402

from distill_engine.data.loader import IGNORE_INDEX, Batch  # noqa: E402
from distill_engine.reference.logprobs_at import dense_logprobs_at  # noqa: E402
from distill_engine.trainer import onpolicy as op  # noqa: E402
from distill_engine.trainer.config import from_dict  # noqa: E402


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(STUDENT_CFG, initializer_range=0.5)  # peaked distributions: greedy choices are clear
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def _greedy_reference(model, prompt, n):
    """Full recompute per step, one unpadded prompt at a time: no KV cache, no padding, no position ids."""
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=seq[None]).logits[0, -1]
            seq = torch.cat([seq, logits.argmax()[None]])
    return seq[len(prompt):]


def test_kv_cache_generation_matches_full_recompute(model):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g) for n in (5, 2, 7)]  # ragged: left padding
    gen = op.generate(model, prompts, max_new_tokens=6, temperature=1.0, top_p=1e-9,  # nucleus of one: greedy
                      generator=torch.Generator().manual_seed(0), eos_id=None, pad_id=256, device="cpu")
    for p, out in zip(prompts, gen):
        assert torch.equal(out, _greedy_reference(model, p, 6))


def test_sampling_is_deterministic_per_seed_step_rank(model):
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]
    kw = dict(max_new_tokens=8, temperature=1.3, top_p=0.9, eos_id=None, pad_id=256, device="cpu")
    a = op.generate(model, prompts, generator=op.rollout_generator(7, 3, 0), **kw)
    b = op.generate(model, prompts, generator=op.rollout_generator(7, 3, 0), **kw)
    c = op.generate(model, prompts, generator=op.rollout_generator(7, 3, 1), **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_eos_cuts_the_continuation(model):
    prompts = [torch.tensor([1, 2, 3])]
    ref = op.generate(model, prompts, max_new_tokens=5, temperature=1.0, top_p=1e-9,
                      generator=torch.Generator(), eos_id=None, pad_id=256, device="cpu")[0]
    eos = int(ref[1])  # pretend the second greedy token is the eos
    out = op.generate(model, prompts, max_new_tokens=5, temperature=1.0, top_p=1e-9,
                      generator=torch.Generator(), eos_id=eos, pad_id=256, device="cpu")[0]
    assert out.tolist() == ref[:2].tolist()


def test_top_p_never_samples_outside_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([op.sample_next(logits, 1.0, 0.7, g) for _ in range(400)])
    assert set(draws.flatten().tolist()) == {0, 1}  # 0.5 + 0.3 ≥ 0.7: tokens 2, 3 are cut
    frac0 = float((draws == 0).float().mean())
    assert abs(frac0 - 0.5 / 0.8) < 0.08  # renormalized inside the nucleus


def test_build_batch_labels_only_generated_tokens():
    tmpl = Batch(torch.zeros(2, 4, dtype=torch.long), None, torch.zeros(2, 3, dtype=torch.long),
                 torch.tensor([0, 1]), 5)
    prompts = [torch.tensor([10, 11, 12]), torch.tensor([20])]
    gens = [torch.tensor([13, 14]), torch.tensor([21, 22, 23])]
    b = op.build_batch(prompts, gens, tmpl, pad_id=0)
    assert b.input_ids.tolist() == [[10, 11, 12, 13, 14], [20, 21, 22, 23, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    I = IGNORE_INDEX
    assert b.labels.tolist() == [[I, I, 13, 14], [21, 22, 23, I]]
    assert b.micro_step == 5 and b.n_valid == 5


def test_prompts_of_uses_first_tokens_and_keeps_one_target():
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    b = Batch(ids, mask, ids[:, 1:], torch.tensor([0, 1]), 0)
    p = op.prompts_of(b, 3)
    assert p[0].tolist() == [1, 2, 3] and p[1].tolist() == [6]


def test_mix_fraction_is_seeded_and_shared():
    on = [op.is_on_policy(7, t, 0.3) for t in range(2000)]
    assert on == [op.is_on_policy(7, t, 0.3) for t in range(2000)]
    assert abs(sum(on) / 2000 - 0.3) < 0.04
    assert not any(op.is_on_policy(7, t, 0.0) for t in range(50))
    assert all(op.is_on_policy(7, t, 1.0) for t in range(50))


def test_sampled_reverse_kl_head_value_and_gradient():
    """Value = Σ (log p_S(x) − log p_T(x)); gradient = Σ r·∇ log p_S(x) (score function, r detached)."""
    g = torch.Generator().manual_seed(0)
    N, d, V = 9, 8, 37
    lm = torch.nn.Linear(d, V, bias=False)
    with torch.no_grad():
        lm.weight.copy_(torch.randn(V, d, generator=g))
    head = op.OnPolicyHeadLoss(lm, divergence="forward_kl", beta=0.5, temperature=1.0, ce_weight=0.0,
                               tail="bucket", backend="torch", zero3=False)
    head.sampled = True
    h = torch.randn(N, d, generator=g, requires_grad=True)
    x = torch.randint(0, V, (N, 1), generator=g)
    lp_t = torch.log_softmax(torch.randn(N, V, generator=g), 1).gather(1, x)
    loss, rkl = head(h, x.int(), lp_t, x[:, 0], True, True)
    loss.backward()
    h64 = h.detach().double().requires_grad_(True)
    w64 = lm.weight.detach().double().requires_grad_(True)
    lp_s = dense_logprobs_at(h64, w64, x)[:, 0]
    r = (lp_s - lp_t[:, 0].double()).detach()
    (r * lp_s).sum().backward()
    torch.testing.assert_close(loss.double(), r.sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rkl.double(), r.sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lm.weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-6)


BASE = {"student": {"path": "s"}, "teacher": {"path": "t"}, "data": {"train_files": ["x.jsonl"]}}


@pytest.mark.parametrize("extra,msg", [
    ({"loss": {"on_policy": {"fraction": 1.5}}}, "loss.on_policy.fraction must be in"),
    ({"loss": {"on_policy": {"top_p": 0.0}}}, "loss.on_policy.top_p"),
    ({"loss": {"on_policy": {"max_new_tokens": 0}}}, "loss.on_policy.max_new_tokens"),
    ({"loss": {"on_policy": {"objective": "ppo"}}}, "loss.on_policy.objective"),
    ({"loss": {"on_policy": {"fractoin": 0.5}}}, "did you mean 'loss.on_policy.fraction'"),
    ({"loss": {"on_policy": {}}, "teacher": {"source": "cache", "cache_dir": "c"}}, "teacher.source: cache"),
    ({"loss": {"on_policy": {}}, "teacher": "none"}, "teacher.source is none"),
    ({"loss": {"on_policy": {"objective": "sampled_reverse_kl"}}, "teacher": {"path": "t", "zero3": True}},
     "teacher.zero3"),
    ({"loss": {"on_policy": {"objective": "sampled_reverse_kl"}}, "teacher": {"path": "t", "source": "stream",
                                                                               "ranks": 1}}, "teacher.source: colocated"),
])
def test_on_policy_config_errors(extra, msg):
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    raw.update(extra)
    with pytest.raises(ValueError, match=msg) as exc:
        from_dict(raw)
    assert "\n" not in str(exc.value)


def test_on_policy_config_defaults():
    raw = dict(BASE, loss={"on_policy": {"fraction": 0.25}}, data={"train_files": ["x.jsonl"], "prompt_field": "q"})
    cfg = from_dict(raw)
    o = cfg.loss.on_policy
    assert (o.fraction, o.objective, o.gather_for_generation, o.top_p) == (0.25, "divergence", True, 1.0)
    assert cfg.data.prompt_field == "q" and from_dict(BASE).data.prompt_field == "prompt"
    assert from_dict(BASE).loss.on_policy is None


def test_prompt_column_is_refused_not_ignored(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "abc", "prompt": "a"}\n')
    with pytest.raises(ValueError, match="data.prompt_field: .* has a 'prompt' column") as exc:
        op.check_prompt_column([str(f)], "prompt")
    assert "\n" not in str(exc.value)
    op.check_prompt_column([str(f)], "question")  # a name the data does not use: fine
