"""Single-process parts of the trainer: config schema and overrides, data sharding and packing, the vocabulary
check, the teacher cache (round trip, corruption, manifest mismatch, killed writer), the CLI registry."""
from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_models import STUDENT_CFG, TEACHER_CFG, base_config, make_tiny_setup  # noqa: E402

from distill_engine.trainer.config import load_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("trainer_unit"))
    return root, make_tiny_setup(root, n_lines=60)


# ---------------------------------------------------------------------------------------------- config
def _cfg(**kw):
    base = {"student": {"path": "s"}, "teacher": {"path": "t"}, "data": {"train_files": ["a.jsonl"]}}
    base.update(kw)
    return base


@pytest.mark.parametrize("raw, overrides, message", [
    (_cfg(train={"lrr": 1}), [], "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
    (_cfg(), ["trian.lr=1"], "unknown config key 'trian'"),
    (_cfg(train={"zero_stage": 4}), [], "train.zero_stage: must be one of 0, 1, 2, 3, got 4"),
    (_cfg(train={"lr": "fast"}), [], "train.lr: expected a number, got 'fast'"),
    (_cfg(train={"micro_batch_size": 0}), [], "train.micro_batch_size must be > 0"),
    (_cfg(loss={"divergence": "kl"}), [], "loss.divergence: must be one of"),
    (_cfg(loss={"divergence": "reverse_kl", "tail": "renormalize"}), [], "loss.divergence: reverse_kl is undefined"),
    (_cfg(loss={"ce_weight": 1.5}), [], "loss.ce_weight must be in [0, 1]"),
    (_cfg(teacher={"source": "cache"}), [], "teacher.cache_dir is not set"),
    (_cfg(teacher={"source": "stream", "path": "t"}), [], "pass --teacher-ranks R"),
    (_cfg(teacher={"source": "cache", "cache_dir": "c"}, loss={"features": {"kind": "mse"}}), [],
     "loss.features needs the teacher's hidden states"),
    ({"teacher": {"path": "t"}, "data": {"train_files": ["a"]}}, [], "student.path is not set"),
    (_cfg(data={"train_files": []}), [], "data.train_files is empty"),
    (_cfg(), ["train.lr"], "--set expects key=value"),
])
def test_config_errors_name_the_key(raw, overrides, message):
    with pytest.raises(ValueError) as e:
        load_config(raw, overrides)
    assert message in str(e.value)


def test_config_overrides_and_shorthands(tmp_path):
    c = load_config(_cfg(), ["train.lr=1e-4", "train.zero_stage=3", "loss.features={kind: cosine, weight: 0.5}",
                             "run.resume=auto", "train.betas=[0.9, 0.99]"])
    assert c.train.lr == 1e-4 and c.train.zero_stage == 3 and c.run.resume == "auto"
    assert c.loss.features.kind == "cosine" and c.loss.features.weight == 0.5 and c.train.betas == [0.9, 0.99]
    assert load_config(_cfg(teacher="none")).teacher.source == "none"
    # relative paths in a YAML file resolve against the file's directory
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "sub" / "run.yaml").write_text("student: {path: s}\nteacher: none\ndata: {train_files: [d.jsonl]}\n")
    c = load_config(str(tmp_path / "sub" / "run.yaml"))
    assert c.data.train_files == [str(tmp_path / "sub" / "d.jsonl")]


def test_example_configs_are_valid():
    ex = os.path.join(REPO, "examples")
    names = sorted(f for f in os.listdir(ex) if f.endswith(".yaml"))
    assert "tiny_cpu.yaml" in names and len(names) >= 4
    for f in names:
        load_config(os.path.join(ex, f))


# ---------------------------------------------------------------------------------------------- data
def test_plan_is_deterministic_and_shards_disjointly():
    from distill_engine.data import MicroBatchPlan

    plans = [MicroBatchPlan(101, micro_batch_size=3, dp_size=4, dp_rank=r, seed=5) for r in range(4)]
    assert plans[0].per_epoch == 101 // 12
    for t in (0, 1, plans[0].per_epoch - 1, plans[0].per_epoch, 3 * plans[0].per_epoch + 2):
        ids = [plans[r].sample_ids(t) for r in range(4)]
        flat = sum(ids, [])
        assert len(set(flat)) == 12 and all(len(x) == 3 for x in ids)  # one global micro-batch, no overlap
        again = MicroBatchPlan(101, micro_batch_size=3, dp_size=4, dp_rank=2, seed=5).sample_ids(t)
        assert again == ids[2]  # a pure function of (seed, step): what resume relies on
    e0 = sum((plans[r].sample_ids(t) for r in range(4) for t in range(plans[0].per_epoch)), [])
    assert len(set(e0)) == len(e0) == plans[0].per_epoch * 12  # an epoch visits each sample at most once
    assert plans[0].sample_ids(0) != plans[0].sample_ids(plans[0].per_epoch)  # new order next epoch
    with pytest.raises(ValueError, match="fewer than one global micro-batch"):
        MicroBatchPlan(5, micro_batch_size=3, dp_size=2, dp_rank=0, seed=0)


def test_tokenize_pack_and_collate(tiny):
    from distill_engine.data import IGNORE_INDEX, collate, load_texts, tokenize
    from distill_engine.data.tokenizer import byte_level_tokenizer

    root, paths = tiny
    tok = byte_level_tokenizer()
    texts = load_texts([paths["data"]])
    packed = tokenize(texts, tok, seq_len=16, packing=True)
    assert all(len(packed.sample(i)) == 16 for i in range(len(packed)))
    flat = np.concatenate([np.asarray(tok(t)["input_ids"] + [tok.eos_token_id]) for t in texts])
    assert np.array_equal(packed.tokens, flat[: len(packed) * 16])  # documents back to back, eos between
    loose = tokenize(texts, tok, seq_len=16, packing=False)
    assert len(loose) == len(texts) and packed.fingerprint() != loose.fingerprint()
    b = collate(loose, [0, 1], 7, tok.pad_token_id)
    assert b.labels.shape == (2, b.input_ids.shape[1] - 1) and b.micro_step == 7
    assert b.n_valid == sum(loose.rows(i) for i in (0, 1))
    assert (b.labels[b.labels != IGNORE_INDEX] == b.input_ids[:, 1:][b.labels != IGNORE_INDEX]).all()
    import datasets

    pq = os.path.join(root, "docs.parquet")
    datasets.Dataset.from_dict({"body": texts[:5]}).to_parquet(pq)
    assert load_texts([pq], text_field="body") == texts[:5]
    with pytest.raises(ValueError, match="data.text_field: column 'text' not found"):
        load_texts([pq])
    text_file = os.path.join(root, "plain.txt")
    open(text_file, "w").write("one document\nwith two lines\n")
    assert load_texts([text_file]) == ["one document\nwith two lines\n"]
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_texts([_touch(os.path.join(root, "data.xyz"))])


def _touch(p):
    open(p, "w").write("x")
    return p


def test_vocabulary_mismatch_is_refused():
    from transformers import LlamaConfig

    from distill_engine.data import check_shared_vocab
    from distill_engine.data.tokenizer import byte_level_tokenizer

    tok = byte_level_tokenizer()
    s = LlamaConfig(**STUDENT_CFG)
    t = LlamaConfig(**dict(TEACHER_CFG, vocab_size=300))
    with pytest.raises(ValueError, match="teacher vocab_size=300 .* differs from student vocab_size=257"):
        check_shared_vocab(tok, s, t)
    with pytest.raises(ValueError, match="tokenizer has 257 tokens but the student's embedding has vocab_size=200"):
        check_shared_vocab(tok, LlamaConfig(**dict(STUDENT_CFG, vocab_size=200)))
    other = byte_level_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="teacher's tokenizer .* differs"):
        check_shared_vocab(tok, s, LlamaConfig(**TEACHER_CFG), other)
    check_shared_vocab(tok, s, LlamaConfig(**TEACHER_CFG), byte_level_tokenizer())


# ---------------------------------------------------------------------------------------------- teacher cache
def _write(tiny, cache_dir, **over):
    from transformers import AutoModelForCausalLM

    from distill_engine.data import load_texts, tokenize
    from distill_engine.data.tokenizer import byte_level_tokenizer
    from distill_engine.teacher.cache import manifest_fields, model_fingerprint, write_cache
    from distill_engine.teacher.colocated import TeacherHead

    root, paths = tiny
    cfg = load_config(base_config(paths, os.path.join(root, "o"),
                                  teacher={"source": "cache", "path": paths["teacher"], "k": over.get("k", 8),
                                           "cache_dir": cache_dir}))
    tok = byte_level_tokenizer()
    samples = tokenize(load_texts([paths["data"]]), tok, seq_len=32)
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype=torch.float32)
    head = TeacherHead(teacher, k=cfg.teacher.k, temperature=1.0, method="topk", backend="torch")
    calls = []

    def runner(*a):
        calls.append(1)
        if over.get("die_after") is not None and len(calls) > over["die_after"]:
            raise KeyboardInterrupt("writer killed")
        return head(*a)

    fields = manifest_fields(cfg, tok, samples, model_fingerprint(paths["teacher"], None))
    man = write_cache(cache_dir, runner=runner, samples=samples, fields=fields, pad_id=tok.pad_token_id, batch_size=4,
                      shard_samples=8, logprob_dtype=over.get("logprob_dtype", "float16"), vocab_size=257,
                      bitpack_ids=over.get("bitpack", False),
                      rank=0, world=1, zero3=False, device=torch.device("cpu"), teacher_info={}, log=lambda m: None)
    return cfg, tok, samples, head, man, calls


def test_cache_round_trip_matches_teacher(tiny, tmp_path):
    from distill_engine.data.loader import MicroBatchPlan, collate
    from distill_engine.teacher.cache import CacheTeacher, expected_manifest

    cache = str(tmp_path / "cache")
    cfg, tok, samples, head, man, _ = _write(tiny, cache, bitpack=True)
    assert len(man["shards"]) == -(-len(samples) // 8) and man["num_samples"] == len(samples)
    plan = MicroBatchPlan(len(samples), micro_batch_size=2, dp_size=1, dp_rank=0, seed=3)
    src = CacheTeacher(cache, expect=expected_manifest(cfg, tok, samples), samples=samples, plan=plan, prefetch=2)
    src.start(0, 4)
    for t in range(4):
        b = collate(samples, plan.sample_ids(t), t, tok.pad_token_id)
        got = src.get(b)
        ids, lps, _, rest = head(b.input_ids, b.attention_mask, b.valid_index, None)[:4]
        assert got.micro_step == t and torch.equal(got.ids, ids)
        assert (got.logprobs - lps).abs().max() < 2e-3  # fp16 packing
        assert torch.equal(got.rest_logprob, rest)  # the exact teacher rest log-mass, stored in fp32 (format v2)
    assert man["rest_logprob"] is True
    src.close()


def test_cache_float32_round_trip_is_bit_identical(tiny, tmp_path):
    """teacher.logprob_dtype: float32 — the cache gives back exactly the teacher's targets (exactness checks)."""
    from distill_engine.data.loader import MicroBatchPlan, collate
    from distill_engine.teacher.cache import CacheTeacher, expected_manifest

    cache = str(tmp_path / "cache32")
    cfg, tok, samples, head, man, _ = _write(tiny, cache, logprob_dtype="float32")
    cfg.teacher.logprob_dtype = "float32"
    plan = MicroBatchPlan(len(samples), micro_batch_size=3, dp_size=1, dp_rank=0, seed=5)
    src = CacheTeacher(cache, expect=expected_manifest(cfg, tok, samples), samples=samples, plan=plan, prefetch=2)
    src.start(0, 3)
    for t in range(3):
        b = collate(samples, plan.sample_ids(t), t, tok.pad_token_id)
        ids, lps, _, rest = head(b.input_ids, b.attention_mask, b.valid_index, None)[:4]
        got = src.get(b)
        assert torch.equal(got.ids, ids) and torch.equal(got.rest_logprob, rest)
        assert torch.equal(got.logprobs.view(torch.int32), lps.float().view(torch.int32))  # bit for bit
    src.close()


def _expect_error(cache, cfg, tok, samples, match):
    from distill_engine.data.loader import MicroBatchPlan, collate
    from distill_engine.teacher.cache import CacheTeacher, expected_manifest

    plan = MicroBatchPlan(len(samples), micro_batch_size=2, dp_size=1, dp_rank=0, seed=3)
    with pytest.raises(ValueError, match=match):
        src = CacheTeacher(cache, expect=expected_manifest(cfg, tok, samples), samples=samples, plan=plan)
        src.start(0, 2 * len(samples))
        try:
            for t in range(len(samples) // 2):
                src.get(collate(samples, plan.sample_ids(t), t, tok.pad_token_id))
        finally:
            src.close()


def test_cache_corruption_and_mismatch_are_clear_errors(tiny, tmp_path):
    from distill_engine.data import load_texts, tokenize

    cache = str(tmp_path / "cache")
    cfg, tok, samples, _, man, _ = _write(tiny, cache)
    # manifest mismatch: k, temperature, data
    for override, field in (("teacher.k=16", "k is 8 in the cache but 16 here"),
                            ("loss.temperature=2.0", "temperature is 1.0 in the cache but 2.0 here")):
        other = load_config(cfg, [override])
        _expect_error(cache, other, tok, samples, field)
    fewer = tokenize(load_texts([tiny[1]["data"]]), tok, seq_len=24)
    _expect_error(cache, cfg, tok, fewer, "dataset_fingerprint")
    from distill_engine.data.tokenizer import byte_level_tokenizer

    tok2 = byte_level_tokenizer()
    tok2.add_tokens(["<x>"])
    _expect_error(cache, cfg, tok2, samples, "tokenizer_fingerprint .*set by data.tokenizer")
    # one flipped byte in a shard: its sha256 check fails when the shard is first used
    shard = os.path.join(cache, man["shards"][1]["file"])
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    _expect_error(cache, cfg, tok, samples, "fails its sha256 check")
    # ... and even with verification off, the packed buffer's own checksum catches it
    cfg_nv = load_config(cfg, ["teacher.cache_verify=none"])
    from distill_engine.data.loader import MicroBatchPlan
    from distill_engine.teacher.cache import CacheReader, expected_manifest

    r = CacheReader(cache, expect=expected_manifest(cfg_nv, tok, samples), verify="none")
    bad = [i for i in range(len(samples)) if int(r.index[i][0]) == 1]
    with pytest.raises(ValueError, match="corrupt packed teacher targets"):
        for i in bad:
            r.sample(i)
    r.close()
    # a truncated shard
    open(shard, "wb").write(bytes(data[:100]))
    _expect_error(cache, cfg, tok, samples, "truncated or overwritten")
    # no manifest (writer never finished)
    os.remove(os.path.join(cache, "manifest.json"))
    _expect_error(cache, cfg, tok, samples, "holds no manifest.json .* partial cache")


def test_killed_writer_resumes_and_never_trusts_half_shards(tiny, tmp_path):
    cache = str(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        _write(tiny, cache, die_after=5)  # 2 batches per shard: dies inside shard 3
    assert not os.path.exists(os.path.join(cache, "manifest.json"))
    written = sorted(f for f in os.listdir(cache) if f.startswith("shard-"))
    assert written == ["shard-00000.bin", "shard-00001.bin"]  # only whole shards, no temporary left behind
    assert not [f for f in os.listdir(cache) if f.startswith(".tmp")]
    # a shard file without its progress record (killed between the two renames) is redone, not trusted
    os.remove(os.path.join(cache, "progress", "shard-00001.bin.json"))
    open(os.path.join(cache, "shard-00001.bin"), "ab").write(b"garbage")
    _, _, samples, _, man, calls = _write(tiny, cache)
    n_shards = len(man["shards"])
    assert len(calls) == 2 * (n_shards - 1) - (1 if len(samples) % 8 and len(samples) % 8 <= 4 else 0)
    fresh = str(tmp_path / "fresh")
    _, _, _, _, man2, _ = _write(tiny, fresh)
    assert [s["sha256"] for s in man["shards"]] == [s["sha256"] for s in man2["shards"]]
    with pytest.raises(ValueError, match="partial teacher cache written with other settings"):
        shutil.rmtree(os.path.join(fresh, "shard-00000.bin"), ignore_errors=True)
        os.remove(os.path.join(fresh, "manifest.json"))
        _write(tiny, fresh, k=4)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_registry_and_parser():
    from distill_engine import cli

    assert {"train", "cache-teacher"} <= set(cli.COMMANDS)
    seen = {}
    cli.register("hello", "test command", lambda p: p.add_argument("--x", type=int),
                 lambda a: seen.setdefault("x", a.x) and 0)
    try:
        assert cli.main(["hello", "--x", "3"]) == 0 and seen["x"] == 3
        args = cli.build_parser().parse_args(["train", "--config", "c.yaml", "--set", "a.b=1", "--resume",
                                              "--teacher-ranks", "2"])
        assert cli._overrides(args) == ["a.b=1", "run.resume=true", "teacher.ranks=2", "teacher.source=stream"]
    finally:
        del cli.COMMANDS["hello"]
