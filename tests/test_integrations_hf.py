"""Hugging Face Trainer integration: the fused trainer's loss and gradients equal the same objective computed
densely from ``model(...).logits`` (float64), and a fresh 2-rank torchrun launch trains a tiny Llama student
under ``TrainingArguments(deepspeed=<ZeRO-3>)`` (tests/_hf_trainer_worker.py)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_llama(seed: int, hidden: int, vocab: int = 97, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie, initializer_range=0.2)
    return LlamaForCausalLM(cfg).float()


def dense_objective(s_logits, t_logits, labels, *, k, divergence, temperature, ce_weight, beta=0.5):
    """The engine's definitions on full float64 logits: the teacher's top-k plus one "rest" bucket."""
    T = temperature
    s = s_logits[:, :-1].reshape(-1, s_logits.shape[-1]).double()  # [B·(L−1), V]
    t = t_logits[:, :-1].reshape(-1, t_logits.shape[-1]).double()
    y = labels[:, 1:].reshape(-1)
    keep = y != -100
    s, t, y = s[keep], t[keep], y[keep]
    lp_full = torch.log_softmax(t / T, -1)
    lp, ids = lp_full.topk(k, dim=-1)  # [n, k]
    logq = torch.log_softmax(s / T, -1).gather(1, ids)  # [n, k]
    p_rest = (1 - lp.exp().sum(1)).clamp(min=0)
    q_rest = (1 - logq.exp().sum(1)).clamp(min=1e-300)
    P = torch.cat([lp.exp(), p_rest[:, None]], 1)  # [n, k+1]
    Q = torch.cat([logq.exp(), q_rest[:, None]], 1)
    xlogy = lambda a, b: torch.where(a > 0, a * (a.clamp(min=1e-300).log() - b.log()), torch.zeros_like(a))
    if divergence == "forward_kl":
        D = xlogy(P, Q).sum(1)
    elif divergence == "reverse_kl":
        D = xlogy(Q, P.clamp(min=1e-300)).sum(1)
    else:
        M = beta * P + (1 - beta) * Q
        D = beta * xlogy(P, M).sum(1) + (1 - beta) * xlogy(Q, M).sum(1)
    row = (1 - ce_weight) * T * T * D
    if ce_weight:
        row = row + ce_weight * torch.nn.functional.cross_entropy(s, y, reduction="none")
    return row.mean()


@pytest.mark.parametrize("divergence,temperature,ce_weight,tie", [
    ("forward_kl", 1.0, 0.0, False),
    ("jsd", 2.0, 0.3, True),
    ("reverse_kl", 0.7, 0.0, False),
])
def test_trainer_loss_and_grads_equal_dense(tmp_path, divergence, temperature, ce_weight, tie):
    from transformers import TrainingArguments

    from distill_engine.integrations.hf import FusedDistillationTrainer

    student, teacher = tiny_llama(0, 32, tie=tie), tiny_llama(1, 48)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=2)
    k = 11
    tr = FusedDistillationTrainer(model=student, args=args, teacher=teacher, k=k, divergence=divergence,
                                  temperature=temperature, ce_weight=ce_weight, backend="torch", validate=True)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding: no loss rows there
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, 4] = -100  # an ignored token inside a row
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    student.zero_grad()
    loss = tr.compute_loss(tr.model, batch)
    loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    assert not any(p.requires_grad for p in teacher.parameters())

    student.zero_grad()
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits
    ref = dense_objective(student(input_ids=ids, attention_mask=mask).logits, t_logits, labels, k=k,
                          divergence=divergence, temperature=temperature, ce_weight=ce_weight)
    ref.backward()
    # the Trainer's gradient-accumulation convention: Σ / num_items_in_batch (one process: the labelled count)
    n_items = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        by_items = tr.compute_loss(tr.model, batch, num_items_in_batch=torch.tensor(n_items))
    assert abs(by_items.item() - loss.item()) <= 1e-6 * abs(loss.item())
    assert torch.isfinite(loss) and ref.item() > 0
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item()), (loss.item(), ref.item())
    for n, p in student.named_parameters():
        err = (fused_grads[n] - p.grad).abs().max().item() / max(p.grad.abs().max().item(), 1e-12)
        assert err <= 1e-4, f"{n}: relative gradient error {err:.2e}"
    # the state dict is unchanged by the loss module the trainer hangs on the student
    assert not any("_distill_engine_head" in key for key in student.state_dict())


def test_trainer_evaluate_reports_the_fused_loss(tmp_path):
    """Trainer.evaluate goes through compute_loss(return_outputs=True): eval_loss is the fused loss."""
    from transformers import TrainingArguments

    from distill_engine.integrations.hf import FusedDistillationTrainer

    student, teacher = tiny_llama(0, 32), tiny_llama(1, 48)
    g = torch.Generator().manual_seed(9)
    rows = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}
            for x in torch.randint(0, 97, (4, 10), generator=g)]
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_eval_batch_size=4,
                             disable_tqdm=True)
    tr = FusedDistillationTrainer(model=student, args=args, teacher=teacher, k=7, backend="auto")
    metrics = tr.evaluate(eval_dataset=rows)
    batch = {key: torch.stack([r[key] for r in rows]) for key in rows[0]}
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"]).logits
        ref = dense_objective(student(input_ids=batch["input_ids"]).logits, t_logits, batch["labels"], k=7,
                              divergence="forward_kl", temperature=1.0, ce_weight=0.0)
    assert abs(metrics["eval_loss"] - ref.item()) <= 1e-5 * abs(ref.item()), (metrics, ref.item())


def test_trainer_rejects_bad_options(tmp_path):
    from transformers import TrainingArguments

    from distill_engine.integrations.hf import FusedDistillationTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="divergence"):
        FusedDistillationTrainer(model=tiny_llama(0, 32), args=args, teacher=tiny_llama(1, 32), divergence="kl")
    with pytest.raises(ValueError, match="vocabulary"):
        FusedDistillationTrainer(model=tiny_llama(0, 32, vocab=50), args=args, teacher=tiny_llama(1, 32))
    with pytest.raises(ValueError, match="k must be"):
        FusedDistillationTrainer(model=tiny_llama(0, 32), args=args, teacher=tiny_llama(1, 32), k=500)


def test_import_does_not_pull_trainer_frameworks():
    code = ("import sys, distill_engine, distill_engine.functional, distill_engine.modules; "
            "bad = [m for m in ('accelerate', 'trl', 'transformers.trainer', 'distill_engine.integrations.hf') "
            "if m in sys.modules]; print(bad); assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_hf_trainer_zero3_two_ranks(tmp_path):
    pytest.importorskip("deepspeed")
    env = dict(os.environ)
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(var, None)  # a fresh launch inherits no rendezvous of this pytest process
    env.update(PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launcher = [torchrun] if os.path.exists(torchrun) else [sys.executable, "-m", "torch.distributed.run"]
    cmd = launcher + ["--nproc_per_node", "2", "--master_port", str(_free_port()),
                      os.path.join(REPO, "tests", "_hf_trainer_worker.py"), str(tmp_path)]
    r = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"`{' '.join(cmd)}` exited {r.returncode}:\n{(r.stdout + r.stderr)[-6000:]}"
    with open(tmp_path / "result.json") as f:
        res = json.load(f)
    losses = res["losses"]
    assert len(losses) >= 6 and all(map(lambda x: x == x and abs(x) < float("inf"), losses)), losses
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < 0.9 * first, f"loss did not fall: {losses}"
    assert res["reloaded_max_abs_diff"] < 1e-6 and res["param_count"] > 0 and res["finite_logits"]
    assert res["head_change"] > 1e-3, "the partitioned lm_head weight received no gradient under ZeRO-3"
