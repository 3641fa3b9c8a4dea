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


@pytest.mark.parametrize("transform", [(None, None), (None, 2.0), (0.7, 3.0)])  # (logit_scale, softcap)
def test_sampled_reverse_kl_head_value_and_gradient(transform):
    """Value = Σ (log p_S(x) − log p_T(x)); gradient = Σ r·∇ log p_S(x) (score function, r detached); log p_S on
    the student family's transformed logits (soft-cap / scale)."""
    g = torch.Generator().manual_seed(0)
    N, d, V = 9, 8, 37
    lm = torch.nn.Linear(d, V, bias=False)
    with torch.no_grad():
        lm.weight.copy_(torch.randn(V, d, generator=g))
    head = op.OnPolicyHeadLoss(lm, divergence="forward_kl", beta=0.5, temperature=1.0, ce_weight=0.0,
                               tail="bucket", backend="torch", zero3=False, logit_scale=transform[0],
                               softcap=transform[1])
    head.sampled = True
    h = torch.randn(N, d, generator=g, requires_grad=True)
    x = torch.randint(0, V, (N, 1), generator=g)
    lp_t = torch.log_softmax(torch.randn(N, V, generator=g), 1).gather(1, x)
    loss, rkl = head(h, x.int(), lp_t, x[:, 0], True, True)
    loss.backward()
    h64 = h.detach().double().requires_grad_(True)
    w64 = lm.weight.detach().double().requires_grad_(True)
    lp_s = dense_logprobs_at(h64, w64, x, logit_scale=transform[0], softcap=transform[1])[:, 0]
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
])
def test_on_policy_config_errors(extra, msg):
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    raw.update(extra)
    with pytest.raises(ValueError, match=msg) as exc:
        from_dict(raw)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("teacher", [{"path": "t", "zero3": True}, {"path": "t", "source": "stream", "ranks": 1}])
def test_sampled_reverse_kl_accepts_stream_and_zero3_teachers(teacher):
    """Both score the sampled tokens inside the teacher's TeacherHead (a stream teacher rank sends them back; a
    ZeRO-3 teacher engine gathers its lm_head for the forward), so neither is refused."""
    cfg = from_dict(dict(BASE, loss={"on_policy": {"objective": "sampled_reverse_kl"}}, teacher=teacher))
    assert cfg.loss.on_policy.objective == "sampled_reverse_kl"


def test_on_policy_config_defaults():
    raw = dict(BASE, loss={"on_policy": {"fraction": 0.25}}, data={"train_files": ["x.jsonl"], "prompt_field": "q"})
    cfg = from_dict(raw)
    o = cfg.loss.on_policy
    assert (o.fraction, o.objective, o.gather_for_generation, o.top_p) == (0.25, "divergence", True, 1.0)
    assert cfg.data.prompt_field == "q" and from_dict(BASE).data.prompt_field == "prompt"
    assert from_dict(BASE).loss.on_policy is None


def _jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_load_prompts_aligned_with_texts_and_empty_prompt_named(tmp_path):
    from distill_engine.data.dataset import load_prompts, load_texts

    a = _jsonl(tmp_path / "a.jsonl", [{"text": "one", "prompt": "p1"}, {"text": "", "prompt": "dropped"},
                                      {"text": "two", "prompt": "p2"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"text": "three", "prompt": "p3"}])
    assert load_texts([a, b]) == ["one", "two", "three"]
    assert load_prompts([a, b]) == ["p1", "p2", "p3"]  # the row without text is dropped from both
    assert load_prompts([a, b], prompt_field="question") is None  # no such column: first tokens as prompts
    txt = tmp_path / "c.txt"
    txt.write_text("plain text\n")
    assert load_prompts([str(txt)]) is None
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "x", "prompt": "ok"}, {"text": "y", "prompt": ""}])
    for files, row, name in (([a, bad], 1, bad), ([bad], 1, bad)):
        with pytest.raises(ValueError, match=rf"data.prompt_field: row {row} of '{name}' has an empty") as exc:
            load_prompts(files)
        assert "\n" not in str(exc.value)
    missing = _jsonl(tmp_path / "m.jsonl", [{"text": "x", "prompt": "ok"}, {"text": "y"}])
    with pytest.raises(ValueError, match="row 1 of .*m.jsonl.* empty, missing or non-string 'prompt'"):
        load_prompts([missing])


def test_prompt_table_packing_map_and_left_truncation():
    from distill_engine.data.dataset import tokenize
    from distill_engine.data.tokenizer import byte_level_tokenizer

    tok = byte_level_tokenizer()
    samples = tokenize(["aaaa", "bb", "cccccc"], tok, seq_len=4, packing=True)  # docs of 5, 3, 7 tokens with eos
    assert samples.doc_index.tolist() == [0, 0, 2]  # the document of each block's first token
    with pytest.warns(UserWarning, match="1 of 2 prompts are longer than loss.on_policy.prompt_tokens=3"):
        table = op.PromptTable(["xy", "unused", "uvwxyz"], samples.doc_index, tok, 3)
    b = Batch(torch.zeros(3, 4, dtype=torch.long), None, torch.zeros(3, 3, dtype=torch.long),
              torch.tensor([2, 0, 1]), 0)
    ids = lambda text: list(tok([text])["input_ids"][0])  # noqa: E731
    assert [p.tolist() for p in table.of(b)] == [ids("xyz"), ids("xy"), ids("xy")]  # the last 3 tokens kept
    unpacked = tokenize(["aaaa", "b", "cc"], tok, seq_len=8, packing=False)
    assert unpacked.doc_index.tolist() == [0, 1, 2]


def test_rollout_continues_the_prompt_column(model):
    """On-policy micro-steps generate from the column's prompts; off-policy ones keep the sample text."""
    from distill_engine.data.dataset import tokenize
    from distill_engine.data.loader import collate
    from distill_engine.data.tokenizer import byte_level_tokenizer

    tok = byte_level_tokenizer()
    samples = tokenize(["the alpha sees", "the beta", "a gamma sees"], tok, seq_len=16, packing=False)
    with pytest.warns(UserWarning, match="1 of 3 prompts are longer"):
        table = op.PromptTable(["Q: one?", "Q: two, longer?", "Q3"], samples.doc_index, tok, 8)
    cfg = from_dict(dict(BASE, loss={"on_policy": {"fraction": 0.5, "prompt_tokens": 8, "max_new_tokens": 5}}))
    onp = op.OnPolicy(cfg, model, rank=0, device=torch.device("cpu"), zero3=False, eos_id=None, pad_id=256,
                      prompts=table)
    on = next(t for t in range(50) if onp.is_on(t))
    off = next(t for t in range(50) if not onp.is_on(t))
    batch = collate(samples, [1, 2, 0], on, 256)
    r = onp.rollout(batch)
    for row, doc in enumerate([1, 2, 0]):
        p = list(tok(["Q: one?", "Q: two, longer?", "Q3"][doc])["input_ids"])[-8:]
        assert r.input_ids[row, :len(p)].tolist() == p  # the prompt (left-truncated to 8 tokens) ...
        lab = r.labels[row]
        assert (lab[:len(p) - 1] == IGNORE_INDEX).all() and (lab[len(p) - 1:len(p) + 4] != IGNORE_INDEX).all()
    assert r.n_valid == 3 * 5  # ... and loss on the 5 generated tokens only
    same = collate(samples, [1, 2, 0], off, 256)
    assert onp.rollout(same) is same


GEMMA2 = dict(model_type="gemma2", vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
              final_logit_softcapping=2.0, sliding_window=16, initializer_range=0.3, pad_token_id=256,
              bos_token_id=0, eos_token_id=256)


def _gemma2(seed):
    from transformers import CONFIG_MAPPING

    from distill_engine.trainer.families import init_config, model_from_config

    if "gemma2" not in CONFIG_MAPPING:
        pytest.skip("gemma2 is not in the installed transformers")
    cfg = init_config(dict(GEMMA2), "student")
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return model_from_config(cfg).float().eval()


def test_generation_samples_from_the_soft_capped_distribution(monkeypatch):
    """A Gemma-2-like student: the logits sampled from are the model's own (soft-capped) logits."""
    m = _gemma2(0)
    seen = []
    real = op.sample_next
    monkeypatch.setattr(op, "sample_next", lambda logits, *a: seen.append(logits.clone()) or real(logits, *a))
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10])]
    op.generate(m, prompts, max_new_tokens=1, temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(0),
                eos_id=None, pad_id=256, device="cpu")
    with torch.no_grad():
        want = m(input_ids=torch.stack(prompts)).logits[:, -1]  # HF: 2·tanh(l/2)
    assert want.abs().max() <= 2.0 and (want - m.lm_head(m.model(torch.stack(prompts))[0][:, -1])).abs().max() > 1e-2
    torch.testing.assert_close(seen[0], want, rtol=1e-5, atol=1e-5)


def test_sampled_reverse_kl_teacher_scores_with_its_family_transform():
    """ColocatedTeacher.score (the teacher's TeacherHead, as the trainer and a stream teacher rank build it): log
    p_T(x) at the sampled tokens from the Gemma-2 teacher's soft-capped logits (= HF's)."""
    from distill_engine.teacher.colocated import ColocatedTeacher, TeacherHead

    teacher = _gemma2(2)
    head = TeacherHead(teacher, k=4, temperature=1.3, method="topk")
    src = ColocatedTeacher(head, device=torch.device("cpu"), seed=0, dp_rank=0, method="topk")
    tmpl = Batch(torch.zeros(2, 4, dtype=torch.long), None, torch.zeros(2, 3, dtype=torch.long),
                 torch.tensor([0, 1]), 3)
    b = op.build_batch([torch.tensor([3, 4, 5]), torch.tensor([6])], [torch.tensor([7, 8]), torch.tensor([9, 10, 11])],
                       tmpl, pad_id=256)
    tb = src.score(b)
    with torch.no_grad():
        logits = teacher(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1].double()
    lp = torch.log_softmax(logits / 1.3, -1).reshape(-1, 257)[b.valid_index]  # [n, V]
    want = lp.gather(1, b.labels.reshape(-1)[b.valid_index][:, None])
    assert tb.ids[:, 0].tolist() == [7, 8, 9, 10, 11]
    torch.testing.assert_close(tb.logprobs.double(), want, rtol=1e-5, atol=1e-5)


def test_sampled_reverse_kl_trains_a_gemma2_student_on_column_prompts(tmp_path):
    """End to end, in process (engine: torch): Gemma-2-like student and teacher (both soft-capped), objective
    sampled_reverse_kl, prompts from the data's prompt column."""
    import distill_engine as de

    _gemma2(0)  # skips without gemma2
    data = _jsonl(tmp_path / "d.jsonl", [{"text": f"the text number {i} goes on", "prompt": f"Q{i}: say"}
                                         for i in range(8)])
    summary = de.train({
        "run": {"output_dir": str(tmp_path / "out"), "progress": "false", "tensorboard": False, "seed": 3},
        "student": {"init": dict(GEMMA2), "init_seed": 0},
        "teacher": {"init": dict(GEMMA2, hidden_size=48), "init_seed": 1, "k": 4},
        "loss": {"on_policy": {"fraction": 1.0, "objective": "sampled_reverse_kl", "prompt_tokens": 8,
                               "max_new_tokens": 4}},
        "data": {"train_files": [data], "tokenizer": "byte", "seq_len": 16, "packing": False},
        "train": {"engine": "torch", "micro_batch_size": 2, "max_steps": 2, "lr": 1e-3, "warmup_steps": 1,
                  "log_every": 1, "save_every": 0, "save_final": False, "device": "cpu"},
    })
    assert summary["on_policy_micro_batches"] == 2 and summary["steps"] == 2
    assert summary["on_policy_prompts"] == "column"
    assert all(math.isfinite(x) for x in (summary["first_loss"], summary["final_loss"]))
