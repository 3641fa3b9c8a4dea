"""``distill-engine eval``'s on-policy metric: the teacher's (and the student's) NLL of the student's own
continuations, per slice — checked against full-logit float64 recomputation of the same continuations."""
from __future__ import annotations

import json

import pytest
import torch

from _eval_tiny import make_llama, make_tokenizer, save_model, write_eval_data
from distill_engine.eval import evaluate
from distill_engine.eval.onpolicy import _generator
from distill_engine.trainer.onpolicy import generate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("op_eval")
    tok = make_tokenizer(root / "tok")
    v = len(tok)
    return tok, {"teacher": save_model(make_llama(v, hidden=48, seed=0), tok, root / "teacher"),
                 "student": save_model(make_llama(v, hidden=32, seed=1), tok, root / "student"),
                 "data": write_eval_data(root / "heldout.jsonl"), "root": root}


def test_on_policy_metric_matches_dense_recompute(tiny):
    from transformers import AutoModelForCausalLM

    tok, p = tiny
    out = p["root"] / "report"
    P, NEW, S = 3, 5, 2
    report = evaluate(p["teacher"], p["student"], p["data"], out_dir=str(out), max_length=64, batch_size=4,
                      progress=False, objective_k=0, on_policy_samples=S, on_policy_prompt_tokens=P,
                      on_policy_max_new_tokens=NEW)
    mt = AutoModelForCausalLM.from_pretrained(p["teacher"], dtype=torch.float32).eval()
    ms = AutoModelForCausalLM.from_pretrained(p["student"], dtype=torch.float32).eval()
    records = [json.loads(line) for line in open(p["data"])]
    for sid, sl in enumerate(report["slices"]):
        m = sl["student"]["on_policy"]
        # the same prompts (first P tokens of the slice's first S documents: each is one window here) and draws
        prompts = [torch.tensor(tok(r["text"])["input_ids"][:P]) for r in records if r["slice"] == sl["name"]][:S]
        gens = generate(ms, prompts, max_new_tokens=NEW, temperature=1.0, top_p=1.0, generator=_generator(0, sid),
                        eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, device="cpu")
        t_nll = s_nll = n = 0.0
        with torch.no_grad():
            for pr, g in zip(prompts, gens):
                seq = torch.cat([pr, g])[None]
                lt = torch.log_softmax(mt(seq).logits[0, :-1].double(), -1)[len(pr) - 1:]
                ls = torch.log_softmax(ms(seq).logits[0, :-1].double(), -1)[len(pr) - 1:]
                t_nll -= float(lt.gather(1, g[:, None]).sum())
                s_nll -= float(ls.gather(1, g[:, None]).sum())
                n += len(g)
        assert m["tokens"] == n and m["prompts"] == S
        assert m["teacher_nll"] == pytest.approx(t_nll / n, rel=1e-4)
        assert m["student_nll"] == pytest.approx(s_nll / n, rel=1e-4)
    assert report["overall"]["student"]["on_policy"]["tokens"] == sum(s["student"]["on_policy"]["tokens"]
                                                                      for s in report["slices"])
    md = (out / "report.md").read_text()
    assert "On-policy: the teacher's NLL" in md
    assert json.loads((out / "report.json").read_text())["slices"][0]["student"]["on_policy"]["prompts"] == S


def test_on_policy_eval_options_are_validated(tiny):
    tok, p = tiny
    with pytest.raises(ValueError, match="on_policy_samples must be an int ≥ 0"):
        evaluate(p["teacher"], p["student"], p["data"], progress=False, on_policy_samples=-1)
    with pytest.raises(ValueError, match="on_policy_max_new_tokens must be an int ≥ 1"):
        evaluate(p["teacher"], p["student"], p["data"], progress=False, on_policy_samples=1, on_policy_max_new_tokens=0)
