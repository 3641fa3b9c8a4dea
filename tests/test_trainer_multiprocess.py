"""The trainer end to end, the checks that complement the launch matrix (tests/test_launch_matrix.py). Every
configuration runs in its own fresh launch:

* ``grad_check`` (torchrun, 2 ranks, one configuration): the reduced ZeRO-3 gradients of one optimizer step
  (accumulation 4 × micro-batch 1, variable-length samples) equal a single-process token-weighted reference.
* a long stream run (3 processes started with the CLI: 2 students + 1 teacher rank) whose teacher rank freezes:
  the students must exit with a clear error within a bounded time.
* the CLI on ``examples/tiny_cpu.yaml`` (one process), and teacher ``none``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_models import make_tiny_setup, write_jsonl  # noqa: E402

from launch_env import free_port as _free_port, launch_env as _env  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "_trainer_worker.py")
pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed", reason="the multi-process trainer tests run DeepSpeed")






def _torchrun(scenario: str, root: str, nproc: int, timeout: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), WORKER, scenario, root]
    res = subprocess.run(cmd, env=_env(root), timeout=timeout, capture_output=True, text=True)
    assert res.returncode == 0, f"{scenario} failed (rc {res.returncode}):\n{(res.stdout + res.stderr)[-6000:]}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("trainer_mp"))
    paths = make_tiny_setup(root)
    paths["data_varlen"] = write_jsonl(os.path.join(root, "data_varlen.jsonl"), 64, seed=3, vary_length=True)
    json.dump(paths, open(os.path.join(root, "paths.json"), "w"))
    return root, paths


# ---------------------------------------------------------------------------------------------- gradients
@pytest.fixture(scope="module")
def grad_results(tiny):
    root, _ = tiny
    _torchrun("grad_check", root, 2, timeout=600)
    return torch.load(os.path.join(root, "grad_check.pt"), weights_only=False)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def test_zero3_gradients_match_token_weighted_reference(grad_results):
    """ZeRO-3 (gathered, tied lm_head), accumulation 4 × micro-batch 1 over 2 ranks == a single-process
    reference: every valid token of the optimizer step weighs the same, across micro-batches and ranks."""
    ref, got = grad_results["reference"], grad_results["grads"]
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    for k, v in ref.items():
        assert got[k] is not None, f"no gradient for {k}"
        assert v.abs().max() > 0
        err = _rel_err(got[k], v)
        assert err < 1e-4, f"gradient of {k} off by {err:.2e} relative"


# ---------------------------------------------------------------------------------------------- stream mode
@pytest.fixture(scope="module")
def stream_results(tiny):
    """3 processes started directly with the CLI and one YAML (no launcher that would kill the others for us):
    2 students + 1 teacher rank, a long stream run whose teacher rank freezes mid-run."""
    import yaml

    from tiny_models import base_config

    root, paths = tiny
    cfg = base_config(paths, os.path.join(root, "long_stream"),
                      teacher={"source": "stream", "path": paths["teacher"], "k": 8, "ranks": 1, "prefetch": 2},
                      train={"zero_stage": 2, "max_steps": 100000, "save_final": False, "heartbeat_timeout_s": 8,
                             "dist_timeout_s": 300})
    cfg_path = os.path.join(root, "long_stream.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(cfg, f)
    port = _free_port()
    procs, logs = [], []
    for rank in range(3):
        env = _env(root)
        env.update(RANK=str(rank), WORLD_SIZE="3", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = open(os.path.join(root, f"stream_rank{rank}.log"), "w+")
        procs.append(subprocess.Popen([sys.executable, "-m", "distill_engine.cli", "train", "--config", cfg_path],
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    metrics = os.path.join(root, "long_stream", "metrics.jsonl")
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            if any(p.poll() is not None for p in procs):
                break
            if os.path.exists(metrics) and len(open(metrics).readlines()) >= 2:
                break
            time.sleep(0.5)
        started = all(p.poll() is None for p in procs)
        killed_at = time.time()
        if started:
            # The teacher rank freezes mid-run (SIGSTOP: connections stay open, so no transport error ever
            # comes — the case that hangs a job forever). The heartbeat watchdog must stop the students. (A
            # SIGKILLed rank closes its sockets and the stream reports it at once, as StreamBroken.)
            procs[2].send_signal(signal.SIGSTOP)
        codes = []
        for p in procs[:2]:
            try:
                codes.append(p.wait(timeout=120))
            except subprocess.TimeoutExpired:
                codes.append(None)
        exit_s = time.time() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        texts = []
        for log in logs:
            log.seek(0)
            texts.append(log.read())
            log.close()
    return root, started, codes, exit_s, texts


def test_hung_teacher_rank_stops_students_with_clear_error(stream_results):
    _, started, codes, exit_s, texts = stream_results
    assert started, "the stream launch ended early:\n" + "\n---\n".join(t[-3000:] for t in texts)
    assert all(c is not None and c != 0 for c in codes), f"students did not exit after the teacher froze: {codes}"
    assert exit_s < 60, exit_s  # heartbeat_timeout_s = 8 in this launch
    for t in texts[:2]:
        assert "teacher rank 0 (global rank 2)" in t and "died or hung" in t, t[-2000:]


# ---------------------------------------------------------------------------------------------- CLI + example
def test_cli_runs_the_tiny_example(tmp_path):
    out = tmp_path / "tiny"
    cmd = [sys.executable, "-m", "distill_engine.cli", "train", "--config", os.path.join(REPO, "examples", "tiny_cpu.yaml"),
           "--output-dir", str(out), "--set", "train.max_steps=3", "--set", "train.save_every=0",
           "--set", f"loss.backend={os.environ.get('DE_TEST_BACKEND', 'auto')}", "--set", "data.max_samples=64"]
    res = subprocess.run(cmd, env=_env(str(tmp_path)), capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and os.path.isfile(os.path.join(summary["final_model"], "config.json"))
    bad = subprocess.run([sys.executable, "-m", "distill_engine.cli", "train", "--config",
                          os.path.join(REPO, "examples", "tiny_cpu.yaml"), "--set", "train.lrr=1"],
                         env=_env(str(tmp_path)), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown config key 'train.lrr' (did you mean 'train.lr'?)" in bad.stderr
