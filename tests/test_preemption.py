"""Preemption and kills on real 2-rank launches (torchrun + ``python -m distill_engine.cli train``, DeepSpeed
ZeRO-2 on CPU/gloo), each a fresh launch as a user would type it:

* SIGTERM to the whole launch (what a scheduler sends): both ranks finish the optimizer step, write a
  checkpoint and exit 143; ``--resume`` then ends bit-identical to an uninterrupted run.
* a seeded soak: SIGKILL at random points, resume each time; final weights bit-identical to the uninterrupted
  run, every metrics line present exactly once, every surviving checkpoint complete and verified.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_models import base_config, make_tiny_setup  # noqa: E402

from launch_env import free_port as _free_port, launch_env as _env  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed", reason="2-rank launches run DeepSpeed")

STEPS = 8
SOAK_KILLS = int(os.environ.get("DE_SOAK_KILLS", "10"))






def _cmd(config: str, *extra: str):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(_free_port()), "-m", "distill_engine.cli", "train", "--config", config, *extra]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("preempt"))
    paths = make_tiny_setup(root, n_lines=64)
    cfg = base_config(paths, os.path.join(root, "straight"), teacher="none",
                      train={"zero_stage": 2, "max_steps": STEPS, "save_every": 1, "micro_batch_size": 2,
                             "warmup_steps": 1, "heartbeat_timeout_s": 30})
    config = os.path.join(root, "run.yaml")
    yaml.safe_dump(cfg, open(config, "w"))
    res = subprocess.run(_cmd(config), env=_env(root), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return root, config


def _weights(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "final", "model.safetensors"))


def _metric_steps(out):
    return [json.loads(l)["step"] for l in open(os.path.join(out, "metrics.jsonl"))]


def _assert_same_run(out, straight):
    a, b = _weights(out), _weights(straight)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), "final weights differ"
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    ref = [json.loads(l) for l in open(os.path.join(straight, "metrics.jsonl"))]
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1)), [r["step"] for r in lines]
    assert [r["loss"] for r in lines] == [r["loss"] for r in ref]


def _wait_for_step(out, step, proc, timeout=300):
    path = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and len(open(path).read().splitlines()) >= step:
            return True
        time.sleep(0.05)
    return False


def _workers(launcher_pid: int):
    """{rank: pid} of the training processes torchrun started."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            env = open(f"/proc/{d}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if ppid == launcher_pid:
            for kv in env:
                if kv.startswith(b"RANK="):
                    out[int(kv[5:])] = int(d)
    return out


def _launch(config, out, root, name, *extra):
    log = open(os.path.join(root, f"{name}.log"), "w+")
    p = subprocess.Popen(_cmd(config, "--output-dir", out, *extra), env=_env(root), stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True)
    return p, log


def _finish(p, log, timeout=180):
    try:
        p.wait(timeout=timeout)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    log.seek(0)
    text = log.read()
    log.close()
    return text


def test_sigterm_checkpoints_exits_143_and_resumes_bit_identically(setup):
    """1. SIGTERM to the whole launch (scheduler-style: torchrun forwards it again, a duplicate within
    milliseconds that must not count as a second signal); 2. resumed, then SIGTERM to rank 1 only: rank 0
    stops at the same step, both checkpoint and exit 143; 3. resumed to the end: same weights and metrics."""
    from distill_engine.trainer import checkpoint as ckpt

    root, config = setup
    out = os.path.join(root, "sigterm")
    p, log = _launch(config, out, root, "sigterm1")
    assert _wait_for_step(out, 2, p), "the run never reached step 2"
    os.killpg(p.pid, signal.SIGTERM)
    text = _finish(p, log)
    assert text.count("SIGTERM received") == 2 and text.count("distill-engine train: stopped:") == 2, text[-4000:]
    tag = ckpt.latest_tag(out)
    assert tag is not None and not os.path.exists(os.path.join(out, "final")), text[-3000:]
    first_stop = int(tag[4:])
    assert 2 <= first_stop < STEPS
    for r in range(2):
        assert ckpt.verify_own(os.path.join(ckpt.checkpoint_root(out), tag), r, "full")[0]

    p, log = _launch(config, out, root, "sigterm2", "--resume")
    assert _wait_for_step(out, first_stop + 1, p), "the resumed run never advanced"
    workers = _workers(p.pid)
    assert set(workers) == {0, 1}, workers
    os.kill(workers[1], signal.SIGTERM)  # one rank only: the other learns it at the same step
    text = _finish(p, log)
    assert text.count("SIGTERM received") == 1 and text.count("distill-engine train: stopped:") == 2, text[-4000:]
    assert "exitcode: 143" in text.replace("exitcode  :", "exitcode:") or "(exitcode: 143)" in text, text[-3000:]
    second_stop = int(ckpt.latest_tag(out)[4:])
    assert first_stop < second_stop < STEPS

    res = subprocess.run(_cmd(config, "--output-dir", out, "--resume"), env=_env(root), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["start_step"] == second_stop
    _assert_same_run(out, os.path.join(root, "straight"))


def test_sigkill_soak_resumes_bit_identically(setup):
    """SIGKILL the whole launch at SOAK_KILLS seeded random points (during start-up / checkpoint loading, or
    during a step or a save), resume each time, then finish: the final weights and every metrics line equal
    the uninterrupted run's, no line is lost or duplicated, and the newest complete checkpoint never goes back.
    Start-up kills land at a random fraction of the start-up time measured by the first launch, so the points
    stay inside start-up on any machine speed."""
    from distill_engine.trainer import checkpoint as ckpt

    root, config = setup
    out = os.path.join(root, "soak")
    metrics = os.path.join(out, "metrics.jsonl")
    rng = random.Random(1234)
    newest, kills, t_start, phases = 0, 0, None, []
    for attempt in range(3 * SOAK_KILLS):
        if kills >= SOAK_KILLS:
            break
        done = len(open(metrics).read().splitlines()) if os.path.exists(metrics) else 0
        t0 = time.time()
        p, log = _launch(config, out, root, f"soak{attempt}", *(["--resume", "auto"] if attempt else []))
        if t_start is None or (done < STEPS - 3 and rng.random() < 0.4):  # during a step or its save
            _wait_for_step(out, done + 1, p)
            if t_start is None:
                t_start = time.time() - t0
            time.sleep(rng.uniform(0.0, 0.4))
            phase = "step"
        else:  # during start-up: imports, model load, DeepSpeed init, checkpoint verification and load
            deadline = t0 + rng.uniform(0.2, 0.9) * t_start
            while time.time() < deadline and p.poll() is None:
                time.sleep(0.02)
            phase = "start-up"
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            kills += 1
            phases.append(phase)
        _finish(p, log, timeout=60)
        tag = ckpt.latest_tag(out)
        step = int(tag[4:]) if tag else 0
        assert step >= newest, f"kill {kills}: the newest complete checkpoint went back from {newest} to {step}"
        newest = step
    assert kills >= SOAK_KILLS, (kills, phases)
    res = subprocess.run(_cmd(config, "--output-dir", out, "--resume", "auto"), env=_env(root), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    _assert_same_run(out, os.path.join(root, "straight"))
    root_dir = ckpt.checkpoint_root(out)
    for t in ckpt.step_tags(root_dir):
        if ckpt.is_complete(os.path.join(root_dir, t)):
            assert all(ckpt.verify_own(os.path.join(root_dir, t), r, "full")[0] for r in range(2)), t
