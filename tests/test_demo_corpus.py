"""Pieces of the embedded demo: the standard-library corpus (slicing, determinism, splits) and its tokenizer.
The full demo is not run here (minutes); `distill-engine demo --preset smoke` is exercised by test_demo_smoke."""
from __future__ import annotations

import os
import textwrap

import pytest

from distill_engine.data.stdlib_corpus import (CODE, DOCS, CorpusConfig, build_corpus, corpus_fingerprint,
                                               list_source_files, split_source, stdlib_root, train_tokenizer)

SAMPLE = textwrap.dedent('''\
    #!/usr/bin/env python3
    # -*- coding: utf-8 -*-
    """Module docstring: what this module does."""

    import os  # trailing comment about os

    URL = "http://example.com/#anchor"  # a '#' inside a string is not a comment
    HELP = """not a docstring: an assigned string"""


    class Box:
        """A box that holds one value."""

        # a full-line comment
        # that continues here
        def get(self):
            \'\'\'Return the value.\'\'\'
            return call(
                "positional string",
            )
    ''')


def test_split_source_separates_code_from_docs_and_comments():
    code, docs = split_source(SAMPLE)
    for gone in ("Module docstring", "A box that holds", "Return the value", "trailing comment", "full-line comment",
                 "usr/bin/env", "coding"):
        assert gone not in code, gone
    for kept in ('URL = "http://example.com/#anchor"', 'HELP = """not a docstring', "class Box:", "def get(self):",
                 '"positional string",', "import os\n"):
        assert kept in code, kept
    paragraphs = docs.split("\n\n")
    assert paragraphs == ["Module docstring: what this module does.", "trailing comment about os",
                          "a '#' inside a string is not a comment", "A box that holds one value.",
                          "a full-line comment that continues here", "Return the value."]
    assert "not a docstring" not in docs and "coding" not in docs and "/usr/bin" not in docs


def _fake_stdlib(root):
    files = {
        "alpha.py": '"""Alpha docs."""\nx = 1  # set x\n',
        "beta.py": "def f():\n    '''Beta docs.'''\n    return 2\n",
        "gamma.py": "# gamma comment\ny = 3\n",
        "delta.py": "z = [1, 2, 3]\n",
        "pkg/__init__.py": '"""Package docs."""\n',
        "pkg/mod.py": "def g(a):\n    return a * 2  # double\n",
        "email/__init__.py": '"""Email package."""\nimport os\n',
        "email/parser.py": "class Parser:\n    pass\n",
        "json/__init__.py": "def loads(s):\n    return s\n",
        "test/test_alpha.py": "assert True\n",
        "pkg/tests/test_mod.py": "assert True\n",
        "site-packages/third/x.py": "third = 1\n",
        "notes.txt": "not python\n",
    }
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return root


def test_source_listing_is_sorted_and_skips_tests_and_site_packages(tmp_path):
    root = _fake_stdlib(str(tmp_path))
    files = list_source_files(root)
    assert files == sorted(files)
    assert "test/test_alpha.py" not in files and "pkg/tests/test_mod.py" not in files
    assert not any(f.startswith("site-packages") for f in files) and "notes.txt" not in files
    assert "pkg/mod.py" in files and "email/parser.py" in files


def test_corpus_slices_and_splits(tmp_path):
    root = _fake_stdlib(str(tmp_path))
    cfg = CorpusConfig(held_out_packages=("email", "json"), eval_fraction=0.3, seed=1)
    docs = build_corpus(cfg, root=root)
    assert {d.slice for d in docs} == {CODE, DOCS, "email", "json"}
    for d in docs:
        if d.slice in ("email", "json"):
            assert d.path.startswith(d.slice + "/")
        else:
            assert not d.path.startswith(("email/", "json/"))
    # each slice splits by file: train and eval never share a file, and a slice with 2+ files has both
    for s in (CODE, DOCS, "email"):
        train = {d.path for d in docs if d.slice == s and d.split == "train"}
        held = {d.path for d in docs if d.slice == s and d.split == "eval"}
        assert train and held and not train & held, s
    code_text = "".join(d.text for d in docs if d.slice == CODE)
    docs_text = " ".join(d.text for d in docs if d.slice == DOCS)
    assert "Alpha docs" not in code_text and "Alpha docs" in docs_text and "set x" in docs_text
    # deterministic: same config, same corpus; another seed, another split
    assert corpus_fingerprint(build_corpus(cfg, root=root)) == corpus_fingerprint(docs)
    other = build_corpus(CorpusConfig(held_out_packages=("email", "json"), eval_fraction=0.3, seed=2), root=root)
    assert sorted((d.slice, d.path) for d in other) == sorted((d.slice, d.path) for d in docs)
    # a cap on training characters drops whole documents, never held-out ones
    capped = build_corpus(CorpusConfig(held_out_packages=("email", "json"), eval_fraction=0.3, seed=1,
                                       max_chars={CODE: 1}), root=root)
    assert sum(d.slice == CODE and d.split == "train" for d in capped) == 1
    assert [d for d in capped if d.split == "eval"] == [d for d in docs if d.split == "eval"]


def test_corpus_config_errors(tmp_path):
    root = _fake_stdlib(str(tmp_path))
    with pytest.raises(ValueError, match="not top-level packages"):
        build_corpus(CorpusConfig(held_out_packages=("nosuchpkg",)), root=root)
    with pytest.raises(ValueError, match="slice names"):
        build_corpus(CorpusConfig(held_out_packages=("code",)), root=root)
    with pytest.raises(ValueError, match="eval_fraction"):
        build_corpus(CorpusConfig(eval_fraction=1.5), root=root)
    with pytest.raises(ValueError, match="does not exist"):
        build_corpus(CorpusConfig(), root=str(tmp_path / "missing"))


@pytest.fixture(scope="module")
def real_corpus():
    return build_corpus(CorpusConfig(max_chars={CODE: 250_000, DOCS: 150_000}))


def test_real_stdlib_corpus(real_corpus):
    names = {d.slice for d in real_corpus}
    assert names == {CODE, DOCS, "email", "json", "xml"}
    for s in names:
        assert any(d.split == "eval" and d.slice == s for d in real_corpus), s
        assert any(d.split == "train" and d.slice == s for d in real_corpus), s
    assert all(not d.path.startswith(("test/", "email/")) for d in real_corpus if d.slice in (CODE, DOCS))
    assert os.path.isdir(stdlib_root())


def test_tokenizer_vocabulary_round_trip_and_determinism(real_corpus, tmp_path):
    texts = [d.text for d in real_corpus if d.split == "train"][:200]
    tok = train_tokenizer(texts, vocab_size=8192, out_dir=str(tmp_path / "tok"))
    assert len(tok) == 8192 >= 8000
    sample = "def f(x):\n\tif x:  # naïve ünïcode → ok\n        return {'a': 1}\n"
    ids = tok(sample)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id is not None and tok.pad_token_id is not None
    assert tok.decode(ids, skip_special_tokens=True) == sample  # byte level: exact round trip
    held = next(d.text for d in real_corpus if d.split == "eval" and d.slice == CODE)
    assert len(held.encode()) / len(tok(held)["input_ids"]) > 2.5  # merges were learned: > 2.5 bytes per token
    again = train_tokenizer(texts, vocab_size=8192)
    assert again.get_vocab() == tok.get_vocab()
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert loaded(sample)["input_ids"] == ids


@pytest.mark.slow
def test_demo_smoke_preset_end_to_end(tmp_path, capsys):
    """`distill-engine demo --preset smoke`: every stage of the demo through the real CLI, trainer and eval,
    with tiny models and a few steps (too short for the effects; the default preset is run by hand)."""
    import json

    from distill_engine.cli import main
    from distill_engine.eval.demo import PRESETS, _prepare_corpus, _prepare_teacher, _prepare_tokenizer

    out = tmp_path / "demo"
    rc = main(["demo", "--preset", "smoke", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc in (0, 1)  # 1: the smoke run is too short to show both effects, which the demo then says
    assert "[8/10] eval" in printed and "| `code` | distilled on |" in printed and "(b) coverage warning" in printed
    assert "[7/10] on-policy vs off-policy, seeds 0, 1" in printed
    assert "[9/10] eval: the on-policy and off-policy continuations" in printed
    assert "| 1 | on-policy (GKD) |" in printed and "On the on-policy metric" in printed
    assert "[10/10] retrieval" in printed and "| relation_student |" in printed and "Retrieval recall@1: teacher" in printed
    report = json.loads((out / "report" / "report.json").read_text())
    assert [s["name"] for s in report["slices"]] == ["code", "docs_comments", "email", "json", "xml"]
    assert report["distill_slices"] == ["code"] and report["models"] == ["student", "baseline"]
    assert set(report["retrieval"]["models"]) == {"teacher", "student", "baseline", "relation_student"}
    rel_metrics = [json.loads(x) for x in open(out / "runs" / "student_relation" / "metrics.jsonl") if x.strip()]
    assert any("relation_loss" in r for r in rel_metrics)
    op = json.loads((out / "report" / "on_policy.json").read_text())
    assert [pr["seed"] for pr in op["pairs"]] == [0, 1] and op["settings"]["on_policy_seeds"] == [0, 1]
    for pr in op["pairs"]:
        # both continuations start from the seed's distilled student and train a similar student-token budget
        assert pr["start"].endswith("final") and all(pr["trained_tokens"][k] > 0 for k in ("off", "on"))
        assert pr["trained_tokens"]["on"] <= 1.1 * pr["trained_tokens"]["off"]
        assert all(pr["metrics"][k]["on_policy_tokens"] > 0 for k in ("off", "on"))
    on_rows = [json.loads(x) for x in open(out / "runs" / "seed1_onpolicy" / "metrics.jsonl") if x.strip()]
    assert on_rows, "the on-policy continuation logged no step"
    for name in ("on_policy.md", "report.md", "kl_by_slice.png", "agreement_by_slice.png", "training_curves.png", "retrieval.png"):
        assert (out / "report" / name).is_file(), name
    # the teacher is cached under a key of everything that shapes it: a second preparation is a cache hit
    p = PRESETS["smoke"]
    corpus, _ = _prepare_corpus(p, str(out))
    tok, tok_dir, tok_cached = _prepare_tokenizer(p, corpus, str(out))
    path, cached = _prepare_teacher(p, corpus, tok, tok_dir, str(out), retrain=False)
    assert tok_cached and cached and os.path.isfile(os.path.join(path, "config.json"))


def test_on_policy_comparison_budget_and_verdicts():
    """The demo's on-policy continuation trains as many student tokens as the off-policy one, and the summary
    counts per seed which student did better on each measure (here: random metrics, the verdict recomputed)."""
    import dataclasses
    import random

    from distill_engine.eval.demo import PRESETS
    from distill_engine.eval.demo_onpolicy import comparison_lines, on_policy_steps

    for lam in (1.0, 0.5, 0.25):
        p = dataclasses.replace(PRESETS["default"], on_policy_fraction=lam)
        per_step = lam * p.on_policy_new + (1 - lam) * (p.seq_len - 1)
        off_tokens = p.continue_steps * (p.seq_len - 1)
        assert abs(on_policy_steps(p) * per_step - off_tokens) <= per_step / 2
    rng = random.Random(7)

    def metrics():
        return {"teacher_nll": rng.uniform(5, 6), "student_nll": rng.uniform(4, 5), "teacher_nll_distill": 5.0,
                "kl_distill": rng.uniform(0.2, 0.4), "on_policy_tokens": 100}

    pairs = [{"seed": s, "metrics": {"off": metrics(), "on": metrics()}, "trained_tokens": {"off": 10, "on": 9}}
             for s in range(3)]
    text = "\n".join(comparison_lines(pairs, ["code"]))
    won = [pr["seed"] for pr in pairs if pr["metrics"]["on"]["teacher_nll"] < pr["metrics"]["off"]["teacher_nll"]]
    assert f"did better on {len(won)} of 3 seeds" in text
    if 0 < len(won) < 3:
        assert f"(seed {', '.join(map(str, won))})" in text
    assert text.count("| on-policy (GKD) |") == 3 and text.count("| off-policy |") == 3
