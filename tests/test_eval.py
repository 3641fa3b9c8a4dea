"""Evaluation: exact chunked metrics against a float64 dense reference, the report and its flags, bad input."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from _eval_tiny import make_llama, make_tokenizer, save_model, write_eval_data
from distill_engine.eval import EvalConfig, evaluate
from distill_engine.eval.evaluate import _build_report, _Sums
from distill_engine.eval.metrics import engine_ops_available, objective_kl, token_metrics
from distill_engine.eval.report import summary_text, write_report


def dense_metrics(ht, wt, hs, ws, y, bt=None, bs=None, top=5):
    """float64 reference with full [N, V] logits."""
    zt = ht.double() @ wt.double().t() + (0 if bt is None else bt.double())
    zs = hs.double() @ ws.double().t() + (0 if bs is None else bs.double())
    lt, ls = torch.log_softmax(zt, -1), torch.log_softmax(zs, -1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    t_arg = zt.argmax(-1)
    top1 = zs.argmax(-1) == t_arg
    topk = (zs.topk(top, -1).indices == t_arg[:, None]).any(-1)
    return -lt.gather(1, y[:, None])[:, 0], -ls.gather(1, y[:, None])[:, 0], kl, top1, topk


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tiles", [(None, None), (5, 23), (1, 211), (64, 1)])
def test_token_metrics_match_dense(bias, tiles):
    g = torch.Generator().manual_seed(7 + bias)
    n, v, dt, ds = 37, 211, 24, 16  # V prime, nothing a multiple of the tiles
    ht, hs = torch.randn(n, dt, generator=g), torch.randn(n, ds, generator=g)
    wt, ws = torch.randn(v, dt, generator=g) * 0.6, torch.randn(v, ds, generator=g) * 0.6
    bt = torch.randn(v, generator=g) if bias else None
    bs = torch.randn(v, generator=g) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    m = token_metrics(ht, wt, hs, ws, y, teacher_bias=bt, student_bias=bs, chunk_rows=tiles[0], vocab_tile=tiles[1])
    ref = dense_metrics(ht, wt, hs, ws, y, bt, bs)
    torch.testing.assert_close(m.teacher_nll, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.student_nll, ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.kl, ref[2], rtol=1e-4, atol=2e-5)
    assert torch.equal(m.top1, ref[3]) and torch.equal(m.topk, ref[4])


def test_token_metrics_identical_models_and_bf16():
    g = torch.Generator().manual_seed(3)
    n, v, d = 19, 101, 12
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    m = token_metrics(h, w, h, w, y, vocab_tile=17)
    assert torch.all(m.kl.abs() < 1e-5) and m.top1.all() and m.topk.all()
    torch.testing.assert_close(m.teacher_nll, m.student_nll)
    # bf16 weights are upcast tile by tile: the result equals the fp32 computation on the upcast values
    hb, wb = h.bfloat16(), (w * 0.5).bfloat16()
    mb = token_metrics(hb, wb, h, w, y, chunk_rows=4, vocab_tile=30)
    ref = dense_metrics(hb.float(), wb.float(), h, w, y)
    torch.testing.assert_close(mb.kl, ref[2], rtol=1e-4, atol=2e-5)


def test_token_metrics_bad_input():
    h, w, y = torch.randn(4, 8), torch.randn(11, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="vocabulary"):
        token_metrics(h, w, h, torch.randn(12, 8), y)
    with pytest.raises(ValueError, match="labels"):
        token_metrics(h, w, h, w, torch.full((4,), 11))
    with pytest.raises(ValueError, match="student_hidden"):
        token_metrics(h, w, torch.randn(5, 8), w, y)


@pytest.mark.skipif(not engine_ops_available(), reason="de.teacher_targets is not built in this checkout yet")
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_objective_kl_is_a_lower_bound_and_exact_at_full_k(backend):
    g = torch.Generator().manual_seed(11)
    n, v, dt, ds = 23, 97, 16, 8
    ht, hs = torch.randn(n, dt, generator=g), torch.randn(n, ds, generator=g)
    wt, ws = torch.randn(v, dt, generator=g), torch.randn(v, ds, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    exact = token_metrics(ht, wt, hs, ws, y).kl
    for k in (1, 8, 40):
        bucket = objective_kl(ht, wt, hs, ws, k=k, backend=backend)
        assert torch.all(bucket <= exact + 1e-5), k
        assert torch.all(bucket >= -1e-6)
    full = objective_kl(ht, wt, hs, ws, k=v, backend=backend)
    torch.testing.assert_close(full, exact, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# end to end on tiny Hugging Face models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_eval")
    tok = make_tokenizer(root / "tok")
    v = len(tok)
    paths = {
        "teacher": save_model(make_llama(v, hidden=48, seed=0), tok, root / "teacher"),
        "student": save_model(make_llama(v, hidden=32, seed=1), tok, root / "student"),
        "baseline": save_model(make_llama(v, hidden=32, seed=2), tok, root / "baseline"),
        "other_vocab": save_model(make_llama(v + 5, hidden=32, seed=3), None, root / "other_vocab"),
        "data": write_eval_data(root / "heldout.jsonl"),
        "root": root,
    }
    return tok, paths


def _dense_slice_stats(tok, teacher, student, texts):
    from transformers import AutoModelForCausalLM

    mt = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    ms = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    t_nll = s_nll = kl = top1 = n = 0.0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text)["input_ids"]])
            lt = torch.log_softmax(mt(ids).logits[0, :-1].double(), -1)
            ls = torch.log_softmax(ms(ids).logits[0, :-1].double(), -1)
            y = ids[0, 1:]
            t_nll += float(-lt.gather(1, y[:, None]).sum())
            s_nll += float(-ls.gather(1, y[:, None]).sum())
            kl += float((lt.exp() * (lt - ls)).sum())
            top1 += float((lt.argmax(-1) == ls.argmax(-1)).sum())
            n += len(y)
    return {"teacher_ppl": math.exp(t_nll / n), "ppl": math.exp(s_nll / n), "kl": kl / n, "top1": top1 / n, "tokens": n}


def test_evaluate_matches_full_logits_per_slice(tiny):
    tok, p = tiny
    out = p["root"] / "report"
    report = evaluate(p["teacher"], p["student"], p["data"], baseline=p["baseline"], distill_slices=["code"],
                      out_dir=str(out), max_length=64, batch_size=3, chunk_rows=7, vocab_tile=50, progress=False)
    records = [json.loads(l) for l in open(p["data"])]
    for sl in report["slices"]:
        texts = [r["text"] for r in records if r["slice"] == sl["name"]]
        ref = _dense_slice_stats(tok, p["teacher"], p["student"], texts)
        assert sl["tokens"] == ref["tokens"]
        assert sl["teacher"]["ppl"] == pytest.approx(ref["teacher_ppl"], rel=1e-4)
        assert sl["student"]["ppl"] == pytest.approx(ref["ppl"], rel=1e-4)
        assert sl["student"]["kl"] == pytest.approx(ref["kl"], rel=1e-4, abs=1e-6)
        assert sl["student"]["top1"] == pytest.approx(ref["top1"])
        assert sl["student"]["ppl_ratio"] == pytest.approx(ref["ppl"] / ref["teacher_ppl"], rel=1e-4)
        assert sl["baseline"]["kl"] > 0
    assert [s["role"] for s in report["slices"]] == ["distill", "held_out"]
    # overall = token-weighted pool of the slices
    tot = sum(s["tokens"] for s in report["slices"])
    pooled_kl = sum(s["student"]["kl"] * s["tokens"] for s in report["slices"]) / tot
    assert report["overall"]["student"]["kl"] == pytest.approx(pooled_kl)
    # files: report.json equals the returned dict, report.md and the plots exist, nothing temporary left
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["slices"] == report["slices"]
    md = (out / "report.md").read_text()
    assert "| `code` | distilled on |" in md and "KL" in md
    for png in ("kl_by_slice.png", "agreement_by_slice.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]


def test_windows_cover_every_token_once(tiny):
    tok, p = tiny
    long = [evaluate(p["teacher"], p["student"], p["data"], max_length=L, progress=False, objective_k=0,
                     slice_column=None) for L in (64, 5)]
    # cutting documents into windows of 5 predicted tokens predicts each token once, as one long window does
    assert long[0]["overall"]["tokens"] == long[1]["overall"]["tokens"]
    assert long[0]["slices"][0]["name"] == "all"


def _synthetic(kls, distill, factor=2.0, t_ppl=10.0, s_ppl=None):
    """Build a report from per-slice KLs and perplexities, bypassing the models."""
    names = list(kls)
    n = len(names)
    tokens = torch.full((n,), 100.0, dtype=torch.float64)
    t_nll = torch.full((n,), 100.0 * math.log(t_ppl), dtype=torch.float64)
    sums = _Sums(n)
    sums.v["kl"] = torch.tensor([100.0 * kls[k] for k in names], dtype=torch.float64)
    s_ppl = s_ppl or {}
    sums.v["s_nll"] = torch.tensor([100.0 * math.log(s_ppl.get(k, 2 * t_ppl)) for k in names], dtype=torch.float64)
    cfg = EvalConfig(coverage_factor=factor, distill_slices=distill).validate()
    return _build_report(cfg, names, tokens, t_nll, {"student": sums}, False, 0, list(distill) if distill else None,
                         sources={"teacher": "t", "student": "s", "baseline": None, "data": "d"}, seconds=0.0)


def test_coverage_warning_and_suspicious_flags():
    r = _synthetic({"code": 0.10, "docs": 0.35, "pkg": 0.15}, ["code"], factor=2.0, s_ppl={"pkg": 8.0})
    kinds = {(f["kind"], f["slice"]) for f in r["flags"]}
    assert ("coverage_warning", "docs") in kinds          # 0.35 > 2 × 0.10
    assert ("coverage_warning", "pkg") not in kinds       # 0.15 ≤ 0.20
    assert ("coverage_warning", "code") not in kinds      # never on a distillation slice
    assert ("suspicious", "pkg") in kinds                 # student ppl 8 < teacher ppl 10
    assert r["findings"]["coverage_warnings"] == ["docs"] and r["findings"]["suspicious"] == ["pkg"]
    msg = next(f["message"] for f in r["flags"] if f["kind"] == "coverage_warning")
    assert "coverage warning" in msg and "3.5×" in msg and "distillation" in msg
    text = summary_text(r)
    assert "coverage warning — slice 'docs'" in text and "suspicious — slice 'pkg'" in text
    # a larger factor silences it; no distillation slices → no coverage analysis, said in words
    assert not [f for f in _synthetic({"code": 0.1, "docs": 0.35}, ["code"], factor=4.0)["flags"]]
    none = _synthetic({"code": 0.1, "docs": 0.35}, None)
    assert not none["flags"] and any("distill_slices" in n for n in none["notes"])


def test_training_curves_plot(tiny, tmp_path):
    r = _synthetic({"code": 0.1, "docs": 0.5}, ["code"])
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": i, "loss": 3.0 / (i + 1), "kl": 1.0 / (i + 1), "lr": 1e-3}) + "\n"
                               for i in range(10)) + '{"step": 10, "lo')  # a torn last line is skipped
    paths = write_report(r, str(tmp_path / "out"), metrics={"student": str(metrics)})
    assert open(paths["training_curves"], "rb").read(4) == b"\x89PNG"
    assert "training_curves.png" in (tmp_path / "out" / "report.md").read_text()


# ----------------------------------------------------------------------------------------------------------
# bad input → ValueError naming the problem


def test_mismatched_vocabularies(tiny):
    tok, p = tiny
    with pytest.raises(ValueError, match="different vocabularies"):
        evaluate(p["teacher"], p["other_vocab"], p["data"], tokenizer=p["teacher"], progress=False)
    # same size, different token → id mapping
    other_tok = make_tokenizer(p["root"] / "tok2", vocab_size=320)
    vocab = dict(other_tok.get_vocab())
    a, b = sorted(vocab, key=vocab.get)[300:302]
    raw = json.loads((p["root"] / "tok2" / "tokenizer.json").read_text())
    raw["model"]["vocab"][a], raw["model"]["vocab"][b] = raw["model"]["vocab"][b], raw["model"]["vocab"][a]
    stud = p["root"] / "student_swapped"
    save_model(make_llama(len(tok), seed=4), other_tok, stud)
    (stud / "tokenizer.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="tokenizers differ"):
        evaluate(p["teacher"], str(stud), p["data"], progress=False)


def test_bad_data_files(tiny, tmp_path):
    tok, p = tiny
    run = lambda data, **kw: evaluate(p["teacher"], p["student"], data, progress=False, **kw)  # noqa: E731
    files = [  # (file name, its bytes or None for no file, the message's key phrase)
        ("empty.jsonl", b"", "empty"),
        ("nope.jsonl", None, "does not exist"),
        ("", None, "directory"),  # tmp_path itself
        ("bad.jsonl", b'{"text": "ok"}\n{"text": broken\n', "line 2 is not valid JSON"),
        ("bin.txt", b"\xff\xfe\x00\x81garbage", "UTF-8"),
        ("blank.txt", b"\n\n  \n", "no records"),
    ]
    for name, content, match in files:
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ValueError, match=match):
            run(str(path))
    with pytest.raises(ValueError, match="slice column 'domain' does not exist"):
        run(p["data"], slice_column="domain")
    with pytest.raises(ValueError, match="text column 'body' is missing"):
        run(p["data"], text_column="body")
    with pytest.raises(ValueError, match="distill_slices"):
        run(p["data"], distill_slices=["nonexistent"])
    with pytest.raises(ValueError, match="coverage_factor"):
        run(p["data"], coverage_factor=0.5)
    with pytest.raises(ValueError, match="unknown option"):
        run(p["data"], coverage=2)


def test_checkpoint_path_without_model(tiny, tmp_path):
    tok, p = tiny
    empty = tmp_path / "empty_ckpt"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no model: config.json missing"):
        evaluate(p["teacher"], str(empty), p["data"], progress=False)
    ds = tmp_path / "ds_ckpt"
    (ds / "global_step10").mkdir(parents=True)
    (ds / "latest").write_text("global_step10")
    with pytest.raises(ValueError, match="DeepSpeed checkpoint"):
        evaluate(p["teacher"], str(ds), p["data"], progress=False)
    cfg_only = tmp_path / "cfg_only"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="model weights"):
        evaluate(str(cfg_only), p["student"], p["data"], progress=False)
    parent = tmp_path / "run_out"
    parent.mkdir()
    os.symlink(p["student"], parent / "final")
    with pytest.raises(ValueError, match="final"):  # points at the model directory inside
        evaluate(p["teacher"], str(parent), p["data"], progress=False)


def test_data_formats_and_public_name(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    import distill_engine as de
    from distill_engine.eval.data import read_records, slice_texts

    assert de.evaluate is evaluate
    rows = [{"text": "a b c", "slice": "x"}, {"text": "d e", "slice": "y"}, {"text": "f", "slice": "x"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert read_records(str(tmp_path / "d.parquet")) == rows
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert read_records(str(tmp_path / "d.json")) == rows
    (tmp_path / "d.txt").write_text("one\n\ntwo\n")
    assert read_records(str(tmp_path / "d.txt")) == [{"text": "one"}, {"text": "two"}]
    assert slice_texts(rows) == {"x": ["a b c", "f"], "y": ["d e"]}
    assert slice_texts(rows, slice_column=None) == {"all": ["a b c", "d e", "f"]}
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="not a readable parquet"):
        read_records(str(tmp_path / "bad.parquet"))
    (tmp_path / "d.csv").write_text("text\nx\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        read_records(str(tmp_path / "d.csv"))
