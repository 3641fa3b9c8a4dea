"""loss.relation in the trainer: config validation, and fresh-process launches from the shell commands a user
types — torchrun + `python -m distill_engine.cli train --config X.yaml`: 2 student ranks with a colocated
teacher under DeepSpeed ZeRO-2 and gather_across_ranks, and 1 student + 1 stream teacher rank with MiniLM
token relations (the Q/K/V tensors travel in the stream payload)."""
import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from distill_engine.trainer.config import load_config
from tiny_models import base_config, make_tiny_setup

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("relation_tr"))
    return root, make_tiny_setup(root, n_lines=120)


@pytest.mark.parametrize("relation,source,match", [
    ({"kind": "cosine"}, "colocated", "loss.relation.kind: must be one of"),
    ({"kind": "similarity"}, "none", "loss.relation needs the teacher's states"),
    ({"kind": "token", "layer_map": "uniform"}, "colocated", "loss.relation.layer_map must be 'last'"),
    ({"kind": "token", "layer_map": [[0]]}, "colocated", "must be a non-empty list of"),
    ({"kind": "similarity", "temperature": 0}, "colocated", "loss.relation.temperature must be > 0"),
    ({"kind": "similarity", "relation_heads": 0}, "colocated", "loss.relation.relation_heads must be > 0"),
    ({"kind": "similarity", "gather": True}, "colocated", "unknown config key 'loss.relation.gather'"),
])
def test_config_validation(tiny, relation, source, match):
    root, paths = tiny
    cfg = base_config(paths, os.path.join(root, "v"), loss={"relation": relation})
    if source == "none":
        cfg["teacher"] = "none"
    with pytest.raises(ValueError, match=match):
        load_config(cfg)


def test_layer_map_range_is_checked_at_setup():
    from distill_engine.trainer.relation import layer_pairs

    assert layer_pairs("last", 2, 4) == [(1, 3)]
    with pytest.raises(ValueError, match=r"layer_map pair \[2, 0\] is out of range"):
        layer_pairs([[2, 0]], 2, 4)


def _env(root):
    env = dict(os.environ)
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(var, None)
    env.update(PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=os.path.join(root, "hf_datasets"), TRANSFORMERS_VERBOSITY="error")
    return env


def _port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(root, name, cfg, nproc, extra=()):
    path = os.path.join(root, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_port()), "-m", "distill_engine.cli", "train", "--config", path, *extra]
    res = subprocess.run(cmd, env=_env(root), capture_output=True, text=True, timeout=600, cwd=root)
    assert res.returncode == 0, f"{name} failed:\n{(res.stdout + res.stderr)[-5000:]}"
    rows = [json.loads(x) for x in open(os.path.join(cfg["run"]["output_dir"], "metrics.jsonl")) if x.strip()]
    return rows


@pytest.mark.slow
def test_two_ranks_colocated_zero2_gather(tiny):
    root, paths = tiny
    out = os.path.join(root, "coloc")
    cfg = base_config(paths, out, loss={"ce_weight": 0.5, "relation": {
        "kind": "similarity", "pooling": "mean", "weight": 2.0, "temperature": 0.5, "gather_across_ranks": True}},
        data={"packing": False}, train={"micro_batch_size": 3, "max_steps": 4, "zero_stage": 2})
    rows = _launch(root, "coloc", cfg, 2)
    rel = [r["relation_loss"] for r in rows if "relation_loss" in r]
    assert len(rel) == 4 and all(math.isfinite(x) and x > 0 for x in rel), rows
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert os.path.isfile(os.path.join(out, "final", "config.json"))


@pytest.mark.slow
def test_stream_teacher_token_relations(tiny):
    root, paths = tiny
    out = os.path.join(root, "stream")
    cfg = base_config(paths, out, loss={"relation": {"kind": "token", "layer_map": [[0, 0], [1, 1]],
                                                     "relation_heads": 4, "weight": 1.0}},
                      teacher={"source": "stream"}, data={"packing": False},
                      train={"micro_batch_size": 2, "max_steps": 3})
    rows = _launch(root, "stream", cfg, 2, ("--teacher-ranks", "1"))
    rel = [r["relation_loss"] for r in rows if "relation_loss" in r]
    assert len(rel) == 3 and all(math.isfinite(x) and x > 0 for x in rel), rows


def test_relation_codec_round_trip():
    import numpy as np
    import torch

    from distill_engine.teacher.relation_codec import pack_tensors, unpack_tensors

    ts = [torch.randn(3, 5), torch.randn(2, 4, 6).to(torch.bfloat16), torch.zeros(0, 7, dtype=torch.float16)]
    back = unpack_tensors(pack_tensors(ts), "test")
    assert [b.dtype for b in back] == [t.dtype for t in ts]
    assert all(torch.equal(a, b) for a, b in zip(ts, back))
    raw = pack_tensors(ts)
    with pytest.raises(RuntimeError, match="relation tensors truncated"):
        unpack_tensors(raw[:-4], "test")
    with pytest.raises(RuntimeError, match="unknown dtype code"):
        unpack_tensors(np.asarray([1, 9, 1, 1], dtype=np.int64).view(np.uint8), "test")
