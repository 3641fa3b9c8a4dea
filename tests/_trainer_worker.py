"""Multi-process scenarios that need a hook inside the trainer, one configuration per fresh launch
(``torchrun ... _trainer_worker.py NAME ROOT``); the assertions live in tests/test_trainer_multiprocess.py.
Everything a user can do from the command line is tested from the CLI instead (tests/test_launch_matrix.py).
"""
from __future__ import annotations

import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from tiny_models import base_config  # noqa: E402


def _rank() -> int:
    return int(os.environ.get("DE_GLOBAL_RANK", os.environ.get("RANK", "0")))


def grad_check(root: str) -> None:
    """ONE configuration (ZeRO-3, tied lm_head gathered, accumulation 4 × micro-batch 1 on variable-length
    samples) in its own launch: the reduced gradients of the first optimizer step, for comparison with a
    single-process token-weighted reference. (Launched fresh: no other configuration ran in these processes.)"""
    from deepspeed.utils import safe_get_full_grad

    from distill_engine.teacher import topology
    from distill_engine.trainer.config import load_config
    from distill_engine.trainer.loop import Trainer

    paths = json.load(open(os.path.join(root, "paths.json")))
    topo = topology.setup(timeout_s=120, heartbeat_timeout_s=30)
    cfg = base_config(paths, os.path.join(root, "out", "grad_check"),
                      data={"packing": False, "train_files": [paths["data_varlen"]]},
                      teacher={"source": "colocated", "path": paths["teacher"], "k": 8, "backend": "torch"},
                      train={"zero_stage": 3, "grad_accum": 4, "micro_batch_size": 1, "max_steps": 1, "grad_clip": 0.0})
    tr = Trainer(load_config(cfg), topo).setup()
    grads = {}

    def grab(eng):
        for n, p in eng.module.student.named_parameters():
            g = safe_get_full_grad(p)
            grads[n] = None if g is None else g.detach().float().cpu().clone()

    tr.step(0, on_boundary=grab)
    tr.source.close()
    if _rank() == 0:
        order = tr.plan._order(0)[: 2 * 4].tolist()
        torch.save({"grads": grads, "reference": reference_grads(paths, order)}, os.path.join(root, "grad_check.pt"))


def reference_grads(paths, sample_ids):
    """Plain PyTorch, one process: the token-weighted mean loss over the step's 8 samples, each sample alone."""
    from transformers import AutoModelForCausalLM

    import distill_engine as de
    from distill_engine.data import load_texts, load_tokenizer, tokenize
    from distill_engine.data.loader import collate
    from distill_engine.teacher.colocated import TeacherHead

    tok = load_tokenizer(paths["student"])
    samples = tokenize(load_texts([paths["data_varlen"]]), tok, seq_len=32, packing=False)
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(paths["student"], dtype=torch.float32)
    head = TeacherHead(teacher, k=8, temperature=1.0, method="topk", backend="torch")
    total, n = 0.0, 0
    for i in sample_ids:
        b = collate(samples, [i], 0, tok.pad_token_id)
        with torch.no_grad():
            ids, lps, _, rest = head(b.input_ids, None, b.valid_index, None)[:4]
        h = student.model(input_ids=b.input_ids).last_hidden_state[:, :-1].reshape(-1, 32)
        total = total + de.fused_distill_loss(h, student.lm_head.weight, ids, lps, reduction="sum", backend="torch",
                                              teacher_rest_logprob=rest)
        n += h.shape[0]
    (total / n).backward()
    return {k: p.grad.clone() for k, p in student.named_parameters()}


# One heartbeat setting for the whole launch (the process groups and the watchdog are set up once per process).
_STREAM_TIMEOUTS = {"heartbeat_timeout_s": 8, "dist_timeout_s": 300}


def long_stream(root: str) -> None:
    """A stream run long enough to be killed in the middle (killed-rank test)."""
    from distill_engine.trainer import train

    paths = json.load(open(os.path.join(root, "paths.json")))
    cfg = base_config(paths, os.path.join(root, "long_stream"),
                      teacher={"source": "stream", "path": paths["teacher"], "k": 8, "ranks": 1, "prefetch": 2},
                      train={"zero_stage": 2, "max_steps": 100000, "save_final": False, **_STREAM_TIMEOUTS})
    train(cfg)


if __name__ == "__main__":
    {"grad_check": grad_check, "long_stream": long_stream}[sys.argv[1]](sys.argv[2])
