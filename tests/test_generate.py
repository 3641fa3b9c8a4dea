"""Black-box generation: per-row sampling is a correct draw, output is resumable without duplicates or
losses, and bad input fails with a clear error."""
from __future__ import annotations

import json

import pytest
import torch

from _eval_tiny import make_llama, make_tokenizer, save_model
from distill_engine.eval import generate
from distill_engine.eval.generate import _RowwiseSampler

PROMPTS = ["def add(a, b):", "The quick brown", "import os", "class Box:", "A parser reads", "for i in",
           "Return the number", "while n"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tok = make_tokenizer(root / "tok")
    path = save_model(make_llama(len(tok), hidden=32, seed=5), tok, root / "teacher")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return path, str(prompts), root


def _rows(path):
    return [json.loads(l) for l in open(path)]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.8)])
def test_rowwise_sampler_draws_from_the_warped_distribution(temperature, top_k, top_p):
    z = torch.tensor([2.0, 1.5, 0.3, 0.0, -1.0, -3.0], dtype=torch.float64)
    n = 6000
    sampler = _RowwiseSampler(list(range(n)), temperature, top_k, top_p)
    picks = sampler(None, z.float().expand(n, -1).clone()).argmax(dim=1)
    freq = torch.bincount(picks, minlength=len(z)).double() / n
    # expected: softmax(z/T) restricted to the top-k ids / the nucleus, renormalized
    p = torch.softmax(z / temperature, 0)
    keep = torch.ones_like(p, dtype=torch.bool)
    if top_k:
        keep &= p >= p.topk(top_k).values[-1]
    if top_p < 1.0:
        sp, order = p.sort(descending=True)
        keep_sorted = (sp.cumsum(0) - sp) < top_p
        keep &= torch.zeros_like(keep).scatter(0, order, keep_sorted)
    q = torch.where(keep, p, torch.zeros_like(p))
    q = q / q.sum()
    sigma = (q * (1 - q) / n).sqrt()
    assert torch.all((freq - q).abs() <= 5 * sigma + 1e-12), (freq, q)
    assert torch.all(freq[~keep] == 0)


def test_generate_writes_every_prompt_once(teacher, tmp_path):
    path, prompts, _ = teacher
    out = tmp_path / "gen.jsonl"
    s = generate(path, prompts, str(out), max_new_tokens=6, batch_size=3, temperature=0.9, top_k=20, progress=False)
    rows = _rows(out)
    assert s["written"] == len(PROMPTS) == len(rows) and s["remaining"] == 0
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(len(PROMPTS))]
    for r, prompt in zip(rows, PROMPTS):
        assert r["prompt"] == prompt and r["text"] == prompt + r["completion"]
        assert r["finish_reason"] in ("stop", "length") and 0 <= r["completion_tokens"] <= 6
    # a rerun finds nothing to do and changes nothing
    before = out.read_bytes()
    assert generate(path, prompts, str(out), max_new_tokens=6, batch_size=3, temperature=0.9, top_k=20,
                    progress=False)["written"] == 0
    assert out.read_bytes() == before


def test_interrupted_run_resumes_without_duplicates_or_losses(teacher, tmp_path):
    path, prompts, _ = teacher
    opts = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3, progress=False)
    full = tmp_path / "full.jsonl"
    generate(path, prompts, str(full), batch_size=3, **opts)

    part = tmp_path / "part.jsonl"
    assert generate(path, prompts, str(part), batch_size=3, limit=4, **opts)["written"] == 4  # stopped early
    with open(part, "a") as f:
        f.write('{"id": "p4", "prompt": "A pars')  # a kill in the middle of an append
    s = generate(path, prompts, str(part), batch_size=2, **opts)  # other batching on resume
    assert s["already_present"] == 4 and s["written"] == len(PROMPTS) - 4 and s["dropped_partial_bytes"] > 0
    rows = _rows(part)
    assert sorted(r["id"] for r in rows) == sorted(f"p{i}" for i in range(len(PROMPTS)))  # none lost, none twice
    # per-row generators: each row's completion is the one the uninterrupted run sampled
    assert {r["id"]: r["completion"] for r in rows} == {r["id"]: r["completion"] for r in _rows(full)}


def test_greedy_is_batch_independent(teacher, tmp_path):
    path, prompts, _ = teacher
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    generate(path, prompts, str(a), max_new_tokens=5, temperature=0, batch_size=1, progress=False)
    generate(path, prompts, str(b), max_new_tokens=5, temperature=0, batch_size=8, progress=False)
    assert [r["completion"] for r in _rows(a)] == [r["completion"] for r in _rows(b)]


def test_resume_with_other_settings_refuses(teacher, tmp_path):
    path, prompts, _ = teacher
    out = tmp_path / "gen.jsonl"
    generate(path, prompts, str(out), max_new_tokens=4, limit=2, progress=False)
    with pytest.raises(ValueError, match="other teacher/sampling settings"):
        generate(path, prompts, str(out), max_new_tokens=4, temperature=0.5, progress=False)


def test_text_prompts_use_line_index_ids(teacher, tmp_path):
    path, _, _ = teacher
    txt = tmp_path / "prompts.txt"
    txt.write_text("hello\n\nworld\n")
    out = tmp_path / "gen.jsonl"
    generate(path, str(txt), str(out), max_new_tokens=3, progress=False)
    assert [(r["id"], r["prompt"]) for r in _rows(out)] == [("0", "hello"), ("1", "world")]


def test_generate_bad_input(teacher, tmp_path):
    path, prompts, root = teacher
    out = str(tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match="no 'question' column"):
        generate(path, prompts, out, prompt_column="question", progress=False)
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n')
    with pytest.raises(ValueError, match="appears twice"):
        generate(path, str(dup), out, progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        generate(path, str(empty), out, progress=False)
    with pytest.raises(ValueError, match="holds no model"):
        generate(str(root / "tok"), prompts, out, progress=False)
    with pytest.raises(ValueError, match="is a directory"):
        generate(path, prompts, str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="top_p"):
        generate(path, prompts, out, top_p=0.0, progress=False)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "zzz", "prompt": "x", "settings": None}) + "\n")
    with pytest.raises(ValueError, match="other teacher/sampling settings"):
        generate(path, prompts, str(other), progress=False)


def test_black_box_distillation_trains_a_student_on_teacher_text(teacher, tmp_path):
    """generate → train with `teacher: none` on the completions → the student moves toward the teacher."""
    import distill_engine as de
    from distill_engine.eval import evaluate
    from transformers import AutoConfig

    path, prompts, _ = teacher
    many = tmp_path / "prompts.jsonl"
    many.write_text("".join(json.dumps({"id": f"{r}-{i}", "prompt": p}) + "\n"
                            for r in range(4) for i, p in enumerate(PROMPTS)))
    out = tmp_path / "teacher_text.jsonl"
    generate(path, str(many), str(out), max_new_tokens=24, temperature=1.0, batch_size=16, progress=False)

    tcfg = AutoConfig.from_pretrained(path)
    init = {"vocab_size": tcfg.vocab_size, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 128,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False}

    def run(steps, name):
        summary = de.train({
            "run": {"output_dir": str(tmp_path / name), "progress": "false", "tensorboard": False, "seed": 0},
            "student": {"init": init, "init_seed": 3},
            "teacher": "none",
            "data": {"train_files": [str(out)], "text_field": "text", "tokenizer": path, "seq_len": 24},
            "train": {"engine": "torch", "micro_batch_size": 4, "max_steps": steps, "lr": 3e-3, "warmup_steps": 1,
                      "device": "cpu"},
        })
        return summary, str(tmp_path / name / "final")

    _, before = run(1, "init")          # one tiny step: essentially the initial student, saved the same way
    summary, after = run(40, "trained")
    assert summary["final_loss"] < summary["first_loss"]
    held = tmp_path / "held.jsonl"      # fresh teacher text the student never saw
    generate(path, [{"id": f"h{i}", "prompt": p} for i, p in enumerate(PROMPTS)], str(held), max_new_tokens=24,
             seed=99, progress=False)
    ppl = [evaluate(path, s, str(held), progress=False, objective_k=0)["overall"]["student"]["ppl"] for s in (before, after)]
    # trained on nothing but the teacher's text, the student predicts unseen teacher text far better
    assert ppl[1] < 0.7 * ppl[0]


def test_cli_generate_and_eval(teacher, tmp_path, capsys):
    from distill_engine.cli import main

    path, prompts, _ = teacher
    out = tmp_path / "cli.jsonl"
    assert main(["generate", "--teacher", path, "--prompts", prompts, "--out", str(out), "--max-new-tokens", "4",
                 "--limit", "3", "--no-progress"]) == 0
    assert "3 rows written, 0 already present, 5 remaining of 8" in capsys.readouterr().out
    assert main(["generate", "--teacher", path, "--prompts", prompts, "--out", str(out), "--max-new-tokens", "4",
                 "--no-progress"]) == 0
    assert "5 rows written, 3 already present, 0 remaining of 8" in capsys.readouterr().out
    report = tmp_path / "report"
    assert main(["eval", "--teacher", path, "--student", path, "--data", str(out), "--max-length", "16",
                 "--out", str(report), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| `all` |" in printed and (report / "report.md").is_file()
    assert main(["eval", "--teacher", path, "--student", path, "--data", str(out), "--slice-column", "domain"]) == 2
    assert "slice column 'domain' does not exist" in capsys.readouterr().err
