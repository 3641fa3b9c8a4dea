"""`distill-engine eval --retrieval PAIRS.jsonl`: recall@1/@10 and MRR against a direct computation, the
teacher-vs-student similarity gap, report.json/report.md/retrieval.png from the CLI, and one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from _eval_tiny import TEXTS, make_llama, make_tokenizer, save_model
from distill_engine.eval.retrieval import _scores, evaluate_retrieval, load_pairs

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("retr")
    tok = make_tokenizer()
    V = len(tok)
    teacher = save_model(make_llama(V, hidden=48, seed=1), tok, root / "teacher")
    student = save_model(make_llama(V, hidden=32, seed=2), tok, root / "student")
    pairs = root / "pairs.jsonl"
    with open(pairs, "w") as f:
        for q, p in zip(TEXTS["prose"], TEXTS["code"]):
            f.write(json.dumps({"query": q, "positive": p}) + "\n")
    return root, teacher, student, str(pairs)


def test_scores_by_hand():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.5, 0.2, 0.3], [0.0, 0.0, 0.1]], dtype=torch.float64)
    # ranks of the positives: 1, 3, 1
    s = _scores(sim)
    assert s["recall@1"] == pytest.approx(2 / 3) and s["recall@10"] == 1.0
    assert s["mrr"] == pytest.approx((1 + 1 / 3 + 1) / 3)


def test_metrics_and_teacher_self(setup):
    root, teacher, student, pairs = setup
    r = evaluate_retrieval(teacher, student, pairs, baseline=teacher, pooling="mean")
    assert r["n_pairs"] == 6 and set(r["models"]) == {"teacher", "student", "baseline"}
    t, b = r["models"]["teacher"], r["models"]["baseline"]
    assert b["mean_abs_sim_diff_vs_teacher"] == 0.0 and b["mrr"] == t["mrr"]
    assert r["models"]["student"]["mean_abs_sim_diff_vs_teacher"] > 0
    for m in r["models"].values():
        assert 0 <= m["recall@1"] <= m["recall@10"] <= 1 and 1 / 6 <= m["mrr"] <= 1


def test_cli_writes_report(setup, tmp_path):
    root, teacher, student, pairs = setup
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "rep"
    cmd = [sys.executable, "-m", "distill_engine.cli", "eval", "--teacher", teacher, "--student", student,
           "--retrieval", pairs, "--retrieval-pooling", "last", "--out", str(out), "--device", "cpu"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.load(open(out / "report.json"))
    assert rep["retrieval"]["pooling"] == "last" and "recall@1" in rep["retrieval"]["models"]["student"]
    md = open(out / "report.md").read()
    assert "## Retrieval (6 query → positive pairs" in md and "| student |" in md
    assert os.path.getsize(out / "retrieval.png") > 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "positive": "b"}\n{"query": "a"}\n')
    res = subprocess.run(cmd[:8] + ["--retrieval", str(bad), "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and f"{bad}:2 needs non-empty string fields 'query' and 'positive'" in res.stderr
    assert "Traceback" not in res.stderr


def test_load_pairs_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_pairs(str(tmp_path / "nope.jsonl"))
    p = tmp_path / "x.jsonl"
    p.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"x.jsonl:1 is not valid JSON"):
        load_pairs(str(p))
    p.write_text('{"query": "a", "positive": "b"}\n')
    with pytest.raises(ValueError, match="has 1 pair"):
        load_pairs(str(p))


def test_function_pairs_and_clean_files():
    from distill_engine.data.retrieval_pairs import clean_files, function_pairs
    from distill_engine.data.stdlib_corpus import Document

    src = ('import os\n\n'
           '@decorator\n'
           'def join(a, b):\n'
           '    """Join two path parts into one path.\n\n    More text here.\n    """\n'
           '    x = os.path.join(a, b)\n'
           '    return x\n\n'
           'def short():\n    """Too short."""\n    return 1\n\n'
           'class C:\n'
           '    async def fetch(self, url):\n'
           '        """Fetch the resource at the given url and return its bytes."""\n'
           '        data = await get(url)\n'
           '        return data\n')
    pairs = function_pairs(src, "m.py")
    assert [p["name"] for p in pairs] == ["join", "fetch"]
    assert pairs[0]["query"] == "Join two path parts into one path."
    assert pairs[0]["positive"] == "@decorator\ndef join(a, b):\n    x = os.path.join(a, b)\n    return x\n"
    assert '"""' not in pairs[1]["positive"] and "await get(url)" in pairs[1]["positive"]
    docs = [Document("code", "a.py", "", "eval"), Document("docs_comments", "a.py", "", "train"),
            Document("code", "b.py", "", "eval"), Document("docs_comments", "b.py", "", "eval"),
            Document("json", "json/x.py", "", "eval"), Document("code", "c.py", "", "train")]
    assert clean_files(docs) == ["b.py", "json/x.py"]  # a.py's docstrings are trained on: not clean


def test_demo_retrieval_pairs_never_leak():
    """The default demo corpus: no pair comes from a file that any slice trains on."""
    from distill_engine.data.retrieval_pairs import retrieval_pairs
    from distill_engine.data.stdlib_corpus import CorpusConfig, build_corpus
    from distill_engine.eval.demo import PRESETS

    p = PRESETS["default"]
    docs = build_corpus(CorpusConfig(held_out_packages=p.held_out_packages, seed=p.seed, max_chars=dict(p.max_chars)))
    pairs = retrieval_pairs(docs, max_pairs=p.retrieval_pairs, seed=p.seed)
    trained = {d.path for d in docs if d.split == "train"}
    train_text = "\n".join(d.text for d in docs if d.split == "train")
    assert len(pairs) == p.retrieval_pairs
    assert not {q["path"] for q in pairs} & trained
    assert sum(q["query"] in train_text for q in pairs) <= len(pairs) // 20  # only generic phrases may recur
