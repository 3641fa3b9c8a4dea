"""The trainer as users launch it: every configuration starts in a FRESH set of processes from the shell command
a user types (``torchrun`` / ``deepspeed`` + ``python -m distill_engine.cli train --config X.yaml``), never after
another configuration in the same process — DeepSpeed and transformers keep process-wide state (communication
back-end, the ZeRO-3 loading switch) that hid a ZeRO-3 start-up bug from an earlier in-process suite.

The matrix: ZeRO 0, 1, 2, 3 × teacher source colocated / cache / stream; a ZeRO-3 teacher; a ZeRO-3 student
built without ``zero.Init``; stop + ``--resume`` under ZeRO-3 (bit-identical to the uninterrupted run); the
README's tiny example at ZeRO-3; two nodes simulated on this machine (torchrun ``--nnodes 2`` and the deepspeed
launcher's ``--hostfile --no_ssh``) writing to separate directories, as nodes with local disks do, including
a resume and stream mode with the teacher ranks on the second node.

Each launch runs a few optimizer steps of tiny models on variable-length samples (no packing, so the token
weighting across micro-batches and ranks matters), and several checks read the same launch's outputs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List, Optional

import pytest
import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_models import STUDENT_CFG, make_tiny_setup, write_jsonl  # noqa: E402

from launch_env import free_port as _free_port, launch_env as _env  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BIN = os.path.dirname(sys.executable)
pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed", reason="the launch matrix runs DeepSpeed")

STEPS = 4






def _tool(name: str) -> List[str]:
    """The console script a user types (``torchrun``, ``deepspeed``) from this interpreter's environment."""
    path = os.path.join(BIN, name)
    if name == "torchrun" and not os.path.exists(path):
        return [sys.executable, "-m", "torch.distributed.run"]
    if not os.path.exists(path):
        pytest.skip(f"{name} launcher not installed next to {sys.executable}")
    return [path]


CLI = ["-m", "distill_engine.cli"]


def _torchrun(nproc: int, *, nnodes: int = 1, node_rank: int = 0, port: int) -> List[str]:
    cmd = _tool("torchrun") + ["--nproc_per_node", str(nproc)]
    if nnodes > 1:
        cmd += ["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--master_addr", "127.0.0.1"]
    return cmd + ["--master_port", str(port)] + CLI


def _run(cmds: List[List[str]], root: str, log: str, timeout: int = 240) -> List[subprocess.CompletedProcess]:
    """Start every command at once (the nodes of one job), wait for all; fail with their logs."""
    procs = []
    for i, c in enumerate(cmds):
        out = open(os.path.join(root, f"{log}.{i}.log"), "w+")
        procs.append((subprocess.Popen(c, env=_env(root), stdout=out, stderr=subprocess.STDOUT, cwd=root), out))
    results = []
    try:
        for p, out in procs:
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    finally:
        for p, out in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            out.seek(0)
            text = out.read()
            out.close()
            results.append(subprocess.CompletedProcess(p.args, p.returncode, text, ""))
    for r in results:
        assert r.returncode == 0, f"{log}: `{' '.join(r.args)}` exited {r.returncode}:\n{r.stdout[-5000:]}"
    return results


def _summary(res: subprocess.CompletedProcess) -> dict:
    for line in reversed(res.stdout.strip().splitlines()):
        if line.startswith("{") and '"role": "student"' in line:
            return json.loads(line)
    raise AssertionError(f"no run summary in the output:\n{res.stdout[-3000:]}")


def _losses(out_dir: str) -> List[float]:
    return [json.loads(line)["loss"] for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def _weights(final_dir: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(final_dir, "model.safetensors"))


# ---------------------------------------------------------------------------------------------- set-up
@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Tiny teacher/student directories, variable-length data, and a writer of one YAML per configuration."""
    root = str(tmp_path_factory.mktemp("launch"))
    paths = make_tiny_setup(root)
    paths["data"] = write_jsonl(os.path.join(root, "varlen.jsonl"), 64, seed=3, vary_length=True)
    base = {
        "run": {"seed": 7, "progress": "false", "tensorboard": False},
        "student": {"path": paths["student"]},
        "teacher": {"source": "colocated", "path": paths["teacher"], "k": 8, "cache_shard_samples": 16},
        "loss": {"temperature": 1.0, "ce_weight": 0.25},
        "data": {"train_files": [paths["data"]], "seq_len": 32, "packing": False},
        "train": {"micro_batch_size": 2, "grad_accum": 2, "max_steps": STEPS, "lr": 3e-3, "warmup_steps": 1,
                  "log_every": 1, "save_every": 2, "grad_clip": 0.0, "heartbeat_timeout_s": 30,
                  "dist_timeout_s": 120,
                  "deepspeed": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
    }

    def config(name: str, **sections) -> str:
        cfg = json.loads(json.dumps(base))
        cfg["run"]["output_dir"] = os.path.join(root, name)
        for sec, vals in sections.items():
            cfg[sec] = dict(cfg.get(sec, {}), **vals)
        path = os.path.join(root, f"{name}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        return path

    return {"root": root, "paths": paths, "config": config, "runs": {}}


def _launch(lab, name: str, stage: int, *, source: str = "colocated", launcher: str = "torchrun",
            extra: Optional[dict] = None, args: Optional[List[str]] = None) -> dict:
    """One configuration, one fresh launch (memoized per module: later checks reuse its outputs)."""
    if name in lab["runs"]:
        return lab["runs"][name]
    root = lab["root"]
    sections = dict(extra or {})
    sections["train"] = dict(sections.get("train", {}), zero_stage=stage)
    teacher = dict(sections.get("teacher", {}), source=source)
    if source == "cache":
        teacher["cache_dir"] = _cache(lab)
    sections["teacher"] = teacher
    cfg = lab["config"](name, **sections)
    port = _free_port()
    if source == "stream":
        cmd = _torchrun(3, port=port) + ["train", "--config", cfg, "--teacher-ranks", "1"]
    elif launcher == "deepspeed":
        cmd = _tool("deepspeed") + ["--num_gpus", "2", "--master_port", str(port), "--module", "distill_engine.cli",
                                    "train", "--config", cfg]
    else:
        cmd = _torchrun(2, port=port) + ["train", "--config", cfg]
    res = _run([cmd + (args or [])], root, name)[0]
    out = {"summary": _summary(res), "dir": os.path.join(root, name), "log": res.stdout}
    lab["runs"][name] = out
    return out


def _cache(lab) -> str:
    """The teacher cache, written once by a 2-rank ``distill-engine cache`` launch."""
    cache_dir = os.path.join(lab["root"], "cache")
    if not os.path.isfile(os.path.join(cache_dir, "manifest.json")):
        cfg = lab["config"]("cache_write", teacher={"cache_dir": cache_dir})
        _run([_torchrun(2, port=_free_port()) + ["cache-teacher", "--config", cfg]], lab["root"], "cache_write")
    return cache_dir


# ---------------------------------------------------------------------------------------------- the matrix
def _check_run(run: dict, stage: int, source: str) -> None:
    s = run["summary"]
    assert s["zero_stage"] == stage and s["teacher_source"] == source and s["steps"] == STEPS, s
    losses = _losses(run["dir"])
    assert len(losses) == STEPS and all(l == l and l > 0 for l in losses), losses
    w = _weights(s["final_model"])  # ZeRO-3 saves gather every partition
    assert w["model.embed_tokens.weight"].shape == (STUDENT_CFG["vocab_size"], STUDENT_CFG["hidden_size"])
    ck = os.path.join(run["dir"], "checkpoints")
    assert open(os.path.join(ck, "latest")).read().strip() == f"step{STEPS:08d}"


# ZeRO-2 runs also carry a feature (hidden-state) loss: colocated and streamed teacher hidden states.
FEATURES = {"loss": {"features": {"kind": "cosine", "weight": 0.1, "layer_map": [[1, 1]]}}}


def _colocated(lab, stage: int) -> dict:
    # ZeRO-1 through the deepspeed launcher (told the process count with --num_gpus on CPU), the rest torchrun
    return _launch(lab, f"colocated_z{stage}", stage, launcher="deepspeed" if stage == 1 else "torchrun",
                   extra=FEATURES if stage == 2 else None)


def _check_features(run: dict) -> None:
    rows = [json.loads(line) for line in open(os.path.join(run["dir"], "metrics.jsonl"))]
    assert all(r.get("feature_loss", 0) > 0 for r in rows), rows


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_colocated(lab, stage):
    run = _colocated(lab, stage)
    _check_run(run, stage, "colocated")
    if stage == 2:
        _check_features(run)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_cache(lab, stage):
    run = _launch(lab, f"cache_z{stage}", stage, source="cache")
    _check_run(run, stage, "cache")
    # fp16-packed cached targets: the first loss equals the colocated teacher's to packing precision
    ref = _losses(_colocated(lab, 0)["dir"])[0]
    assert abs(_losses(run["dir"])[0] - ref) <= 2e-3 * abs(ref)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stream(lab, stage):
    """2 student ranks + 1 teacher rank (``--teacher-ranks 1``); at ZeRO-3 the teacher rank is partitioned too."""
    extra = {"teacher": {"zero3": True}} if stage == 3 else FEATURES if stage == 2 else None
    run = _launch(lab, f"stream_z{stage}", stage, source="stream", extra=extra)
    _check_run(run, stage, "stream")
    if stage == 2:
        _check_features(run)  # the teacher ranks stream hidden states too
        return
    ref = _losses(_colocated(lab, 0)["dir"])[0]
    assert abs(_losses(run["dir"])[0] - ref) <= 2e-3 * abs(ref)


# Tolerances of ZeRO-3 vs ZeRO-0, both fp32. The first loss depends only on the (identical) initial weights and
# targets: it may differ by summation order alone (~1e-7 relative; bound 1e-6). The weights after STEPS AdamW
# steps differ by the order of float32 additions in ZeRO-3's reduce-scatter (~1e-7 relative per gradient
# element). Adam divides each gradient by its own running RMS, so the error stays ~lr·1e-7 per step where
# gradients are large, but is amplified where a coordinate's gradient is itself near rounding level: measured
# 6e-5 of the largest update of the tensor (5.5e-7 absolute) on this test's run. Bound: 5e-4 of the update.
def test_zero3_equals_zero0(lab):
    r0, r3 = _colocated(lab, 0), _colocated(lab, 3)
    l0, l3 = _losses(r0["dir"]), _losses(r3["dir"])
    assert abs(l0[0] - l3[0]) <= 1e-6 * abs(l0[0]), (l0[0], l3[0])
    w0, w3 = _weights(r0["summary"]["final_model"]), _weights(r3["summary"]["final_model"])
    init = _weights(lab["paths"]["student"])
    for k, v in w0.items():
        upd = (v - init[k]).abs().max()
        assert upd > 0, k
        err = (w3[k] - v).abs().max()
        assert err <= 5e-4 * upd + 1e-7, f"{k}: ZeRO-3 weights differ from ZeRO-0 by {err:.3e} (update {upd:.3e})"


def test_zero1_agrees_with_zero0(lab):
    """ZeRO-1 (deepspeed launcher) takes the same first step as ZeRO-0 (torchrun)."""
    ref, got = _losses(_colocated(lab, 0)["dir"])[0], _losses(_colocated(lab, 1)["dir"])[0]
    assert abs(got - ref) <= 1e-6 * abs(ref), (got, ref)


def test_zero3_teacher_partitioned(lab):
    """``teacher.zero3: true``: the teacher loads partitioned for inference, and its targets are the plainly
    loaded teacher's (same first loss as ZeRO-0 with a plain teacher)."""
    run = _launch(lab, "colocated_z3_teacher_zero3", 3, extra={"teacher": {"zero3": True}})
    _check_run(run, 3, "colocated")
    ref = _losses(_colocated(lab, 0)["dir"])[0]
    assert abs(_losses(run["dir"])[0] - ref) <= 1e-6 * abs(ref)


def test_zero3_student_without_zero_init(lab):
    """``student.init`` with ``student.zero_init: false``: built whole, then partitioned by deepspeed.initialize."""
    init = {k: v for k, v in STUDENT_CFG.items()}
    run = _launch(lab, "colocated_z3_init_nozeroinit", 3,
                  extra={"student": {"path": None, "init": init, "zero_init": False}, "data": {"tokenizer": "byte"}})
    _check_run(run, 3, "colocated")


def test_zero3_resume_is_bit_identical(lab):
    """Stop at step 2 of the ZeRO-3 run, ``--resume`` in a new launch: the same losses and final weights."""
    straight = _colocated(lab, 3)
    _launch(lab, "z3_resume", 3, extra={"run": {"stop_at_step": 2}})
    resumed = _launch(lab, "z3_resume_2", 3, args=["--resume"],
                      extra={"run": {"output_dir": os.path.join(lab["root"], "z3_resume")}})
    assert resumed["summary"]["start_step"] == 2
    assert _losses(straight["dir"]) == _losses(os.path.join(lab["root"], "z3_resume"))
    a, b = _weights(straight["summary"]["final_model"]), _weights(resumed["summary"]["final_model"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_readme_tiny_example_zero3(tmp_path):
    """The README's command, as written, switched to ZeRO-3 (student.init built partitioned by zero.Init)."""
    cfg = os.path.join(REPO, "examples", "tiny_cpu.yaml")
    cmd = _torchrun(2, port=_free_port()) + ["train", "--config", cfg, "--set", "train.zero_stage=3",
                                             "--set", "train.max_steps=3", "--set", "train.save_every=0",
                                             "--set", "data.max_samples=64", "--output-dir", str(tmp_path / "out")]
    s = _summary(_run([cmd], str(tmp_path), "readme_z3")[0])
    assert s["zero_stage"] == 3 and s["steps"] == 3 and os.path.isfile(os.path.join(s["final_model"], "config.json"))


# ---------------------------------------------------------------------------------------------- two nodes
def _two_node_dirs(lab, name: str) -> List[str]:
    return [os.path.join(lab["root"], f"{name}_node{n}") for n in (0, 1)]


def _two_nodes(lab, name: str, cmd_of, stage: int, *, extra=None, resume_from: Optional[str] = None) -> list:
    """Both "nodes" of one job on this machine, each writing to its own directory (node-local disks)."""
    outs = _two_node_dirs(lab, resume_from or name)
    port = _free_port()
    cmds = []
    for n in (0, 1):
        sections = dict(extra or {})
        sections["run"] = dict(sections.get("run", {}), output_dir=outs[n])
        sections["train"] = dict(sections.get("train", {}), zero_stage=stage)
        cfg = lab["config"](f"{name}_node{n}", **sections)
        cmds.append(cmd_of(n, port) + ["train", "--config", cfg] + (["--resume"] if resume_from else []))
    return _run(cmds, lab["root"], name, timeout=300)


def _ds_hostfile(lab) -> str:
    path = os.path.join(lab["root"], "hostfile")
    with open(path, "w") as f:
        f.write("node-a slots=2\nnode-b slots=2\n")
    return path


def test_two_nodes_resume_on_node_local_disks(lab):
    """4 student ranks on 2 simulated nodes, ZeRO-2, separate output directories: the deepspeed launcher
    (``--hostfile --no_ssh --node_rank``) runs straight through; torchrun ``--nnodes 2`` stops at step 2 and
    resumes. Every node holds complete checkpoints of its own, and the final weights are bit-identical."""
    hf = _ds_hostfile(lab)
    ds = lambda n, port: _tool("deepspeed") + ["--hostfile", hf, "--no_ssh", "--node_rank", str(n), "--master_addr",
                                               "127.0.0.1", "--master_port", str(port), "--module", "distill_engine.cli"]
    tr = lambda n, port: _torchrun(2, nnodes=2, node_rank=n, port=port)
    straight = _two_nodes(lab, "twonode_straight", ds, 2)
    _two_nodes(lab, "twonode_resume", tr, 2, extra={"run": {"stop_at_step": 2}})
    resumed = _two_nodes(lab, "twonode_resume_b", tr, 2, resume_from="twonode_resume")
    s_straight, s_resumed = _summary(straight[0]), _summary(resumed[0])
    assert s_resumed["start_step"] == 2 and s_resumed["steps"] == STEPS
    for d in _two_node_dirs(lab, "twonode_resume"):
        ck = os.path.join(d, "checkpoints")
        assert open(os.path.join(ck, "latest")).read().strip() == f"step{STEPS:08d}", d
        assert os.path.isfile(os.path.join(ck, f"step{STEPS:08d}", "trainer_state.json")), d
        assert not [n for n in os.listdir(ck) if n.startswith(".staging")], os.listdir(ck)
    node1 = os.listdir(os.path.join(_two_node_dirs(lab, "twonode_resume")[1], "checkpoints", f"step{STEPS:08d}"))
    assert any("rank_2_" in n for n in node1) and any("rank_3_" in n for n in node1), node1
    a, b = _weights(s_straight["final_model"]), _weights(s_resumed["final_model"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(_two_node_dirs(lab, "twonode_straight")[0]) == _losses(_two_node_dirs(lab, "twonode_resume")[0])


def test_two_nodes_stream_teachers_on_second_node(lab):
    """``--teacher-ranks 2`` on 2 nodes × 2 processes: the students on node 0, the teacher ranks on node 1;
    ZeRO-3 students. The losses equal the one-node stream run's up to the fp16 packing of the targets."""
    tr = lambda n, port: _torchrun(2, nnodes=2, node_rank=n, port=port)
    res = _two_nodes(lab, "twonode_stream", lambda n, port: tr(n, port), 3,
                     extra={"teacher": {"source": "stream", "ranks": 2}})
    s = _summary(res[0])
    assert s["teacher_source"] == "stream" and s["steps"] == STEPS
    got = _losses(_two_node_dirs(lab, "twonode_stream")[0])
    ref = _losses(_colocated(lab, 0)["dir"])
    assert abs(got[0] - ref[0]) <= 2e-3 * abs(ref[0]), (got, ref)
