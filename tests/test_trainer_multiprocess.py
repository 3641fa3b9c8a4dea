"""The trainer end to end: real multi-process CPU runs (gloo) of tiny HF Llama models built in the test.

Four launches, each running several configurations (process start-up dominates on 2 cores):

* ``zero_checks`` (torchrun, 2 ranks): per ZeRO stage 0-3, the teacher's targets equal those of the plainly
  loaded checkpoint, and the reduced gradients of one optimizer step (accumulation 4 × micro-batch 1) equal a
  single-process token-weighted reference; also micro-batch 4 × accumulation 1 and a ZeRO-3 partitioned teacher.
* ``train_runs`` (torchrun, 2 ranks): colocated ZeRO-2 for 30 steps (loss falls; final student loads with
  transformers), cache-teacher + cache ZeRO-3, resume bit-for-bit (ZeRO-3, sampled targets), teacher none.
* ``stream_runs`` (3 plain processes: 2 students + 1 teacher rank): stream ZeRO-2, stream ZeRO-3 with streamed
  feature distillation, then a long run whose teacher rank is killed: the students must exit with a clear
  error within a bounded time.
* the CLI on ``examples/tiny_cpu.yaml`` (one process).
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

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "_trainer_worker.py")
pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed", reason="the multi-process trainer tests run DeepSpeed")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(root: str) -> dict:
    env = dict(os.environ)
    # an in-process training run earlier in this pytest process leaves its rendezvous variables (and its store
    # still listening on MASTER_PORT) behind: a child must not inherit them
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(var, None)
    env.update(PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=os.path.join(root, "hf_datasets"), TRANSFORMERS_VERBOSITY="error",
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    return env


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


# ---------------------------------------------------------------------------------------------- ZeRO checks
@pytest.fixture(scope="module")
def zero_results(tiny):
    root, _ = tiny
    _torchrun("zero_checks", root, 2, timeout=600)
    return torch.load(os.path.join(root, "zero_checks.pt"), weights_only=False)


def test_teacher_equals_plain_checkpoint_under_every_zero_stage(zero_results):
    for name, r in zero_results["teacher"].items():
        assert r["ids_equal"], f"{name}: teacher target ids differ from the plainly loaded teacher's"
        assert r["max_lp_err"] <= 1e-6, f"{name}: teacher log-probs differ by {r['max_lp_err']}"
    assert set(zero_results["teacher"]) >= {"stage0", "stage1", "stage2", "stage3", "stage3_zero3teacher"}
    # transformers' process-wide ZeRO-3 loading switch is off again once the run is set up
    assert not any(zero_results["switch_after_setup"].values()), zero_results["switch_after_setup"]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("name", ["stage0", "stage1", "stage2", "stage3", "stage2_mb4", "stage3_zero3teacher"])
def test_gradients_match_token_weighted_reference(zero_results, name):
    """ZeRO-3 (gathered, tied lm_head) == ZeRO-0 == single-process reference, and accumulation 4 × 1 == 1 × 4:
    every valid token of the optimizer step weighs the same, across micro-batches and ranks."""
    ref = zero_results["reference"]
    got = zero_results["grads"][name]
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    for k, v in ref.items():
        assert got[k] is not None, f"{name}: no gradient for {k}"
        assert v.abs().max() > 0
        err = _rel_err(got[k], v)
        assert err < 1e-4, f"{name}: gradient of {k} off by {err:.2e} relative"


def test_zero3_gradients_equal_zero0(zero_results):
    g0, g3 = zero_results["grads"]["stage0"], zero_results["grads"]["stage3"]
    for k in g0:
        assert _rel_err(g3[k], g0[k]) < 1e-5, k


# ---------------------------------------------------------------------------------------------- training runs
@pytest.fixture(scope="module")
def train_results(tiny):
    root, _ = tiny
    _torchrun("train_runs", root, 2, timeout=900)
    return root, json.load(open(os.path.join(root, "train_runs.json")))


def _losses(path):
    return [json.loads(l)["loss"] for l in open(path)]


def test_loss_falls_and_student_saved(train_results, tiny):
    root, out = train_results
    s = out["colocated_z2"]
    losses = _losses(os.path.join(root, "colocated_z2", "metrics.jsonl"))
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.85 * losses[0], losses
    assert os.listdir(os.path.join(root, "colocated_z2", "tensorboard")), "no TensorBoard events written"
    rows = [json.loads(l) for l in open(os.path.join(root, "colocated_z2", "metrics.jsonl"))]
    assert all(r["feature_loss"] > 0 and r["kl"] > 0 for r in rows)  # colocated feature distillation ran
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for run in ("colocated_z2", "cache_z3"):  # ZeRO-2 and ZeRO-3 (gathered) saves
        final = out[run]["final_model"]
        assert final and os.path.isdir(final)
        m = AutoModelForCausalLM.from_pretrained(final)
        tok = AutoTokenizer.from_pretrained(final)
        init = AutoModelForCausalLM.from_pretrained(tiny[1]["student"])
        w, w0 = m.model.embed_tokens.weight, init.model.embed_tokens.weight
        assert w.shape == w0.shape and not torch.equal(w, w0), f"{run}: saved student is untrained or empty"
        ids = torch.tensor([tok("the alpha sees")["input_ids"]])
        assert torch.isfinite(m(ids).logits).all()
    assert s["steps"] == 30 and s["final_loss"] is not None


def test_cache_mode_trains_under_zero3(train_results):
    root, out = train_results
    w = out["cache_write"]
    assert w["shards"] > 1 and w["samples"] > 0
    man = json.load(open(os.path.join(root, "cache", "manifest.json")))
    assert man["k"] == 8 and len(man["shards"]) == w["shards"] and all(len(s["sha256"]) == 64 for s in man["shards"])
    assert out["cache_z3"]["teacher_source"] == "cache" and out["cache_z3"]["zero_stage"] == 3
    # cached (fp16-packed) targets give the same losses as the colocated teacher to packing precision
    c = _losses(os.path.join(root, "cache_z3", "metrics.jsonl"))
    assert len(c) == 4 and all(l == l for l in c)


def test_resume_is_bit_exact(train_results):
    root, out = train_results
    straight = _losses(os.path.join(root, "resume_straight", "metrics.jsonl"))
    resumed = _losses(os.path.join(root, "resume_resumed", "metrics.jsonl"))
    assert len(straight) == 4 and straight == resumed, (straight, resumed)
    assert out["resume_resumed"]["start_step"] == 2
    assert out["resume_resumed_1"]["checkpoint"].endswith("step00000002")


def test_teacher_none_trains_on_labels(train_results):
    root, out = train_results
    losses = _losses(os.path.join(root, "none_z2", "metrics.jsonl"))
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert out["none_z2"]["teacher_source"] == "none"


# ---------------------------------------------------------------------------------------------- stream mode
@pytest.fixture(scope="module")
def stream_results(tiny):
    """3 processes started directly (no launcher that would kill the others for us): 2 students + 1 teacher."""
    root, _ = tiny
    port = _free_port()
    procs, logs = [], []
    for rank in range(3):
        env = _env(root)
        env.update(RANK=str(rank), WORLD_SIZE="3", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = open(os.path.join(root, f"stream_rank{rank}.log"), "w+")
        procs.append(subprocess.Popen([sys.executable, WORKER, "stream_runs", root], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
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


def test_stream_mode_trains_zero2_and_zero3(stream_results):
    root, started, _, _, texts = stream_results
    assert started, "the stream launch ended early:\n" + "\n---\n".join(t[-3000:] for t in texts)
    out = json.load(open(os.path.join(root, "stream_runs.json")))
    for name in ("stream_z2", "stream_z3_features"):
        assert out[name]["teacher_source"] == "stream" and out[name]["steps"] == 4
        assert len(_losses(os.path.join(root, name, "metrics.jsonl"))) == 4
    rows = [json.loads(l) for l in open(os.path.join(root, "stream_z3_features", "metrics.jsonl"))]
    assert all(r.get("feature_loss", 0) > 0 for r in rows), rows


def test_hung_teacher_rank_stops_students_with_clear_error(stream_results):
    _, started, codes, exit_s, texts = stream_results
    assert started
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
