"""Multi-process scenarios of the trainer tests, one launch each (``torchrun ... _trainer_worker.py NAME ROOT``).

Each scenario runs several configurations in one launch (process start-up dominates on a small CPU machine)
and writes what the test asserts on under ROOT; the assertions live in tests/test_trainer_multiprocess.py.
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


def zero_checks(root: str) -> None:
    """Per ZeRO stage 0-3: teacher outputs vs the plainly loaded checkpoint, and the reduced gradients of one
    optimizer step (grad_accum 4 × micro-batch 1); plus micro-batch 4 × accumulation 1 and a ZeRO-3 teacher."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from transformers import AutoModelForCausalLM

    from distill_engine.teacher import topology
    from distill_engine.teacher.colocated import TeacherHead
    from distill_engine.trainer.config import load_config
    from distill_engine.trainer.loop import Trainer
    from distill_engine.trainer.models import zero3_switch_is_on

    paths = json.load(open(os.path.join(root, "paths.json")))
    # The reference teacher: loaded plainly, before anything DeepSpeed touches the process.
    plain_teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype=torch.float32).eval()
    ref_head = TeacherHead(plain_teacher, k=8, temperature=1.0, method="topk", backend="torch")
    topo = topology.setup(timeout_s=120, heartbeat_timeout_s=30)
    results = {"teacher": {}, "grads": {}, "switch_after_setup": {}}
    runs = [(f"stage{s}", s, 4, 1, False) for s in (0, 1, 2, 3)] + [("stage2_mb4", 2, 1, 4, False),
                                                                     ("stage3_zero3teacher", 3, 4, 1, True)]
    plan_order = None
    for name, stage, ga, mbs, t_zero3 in runs:
        cfg = base_config(paths, os.path.join(root, "out", name),
                          data={"packing": False, "train_files": [paths["data_varlen"]]},
                          teacher={"source": "colocated", "path": paths["teacher"], "k": 8, "zero3": t_zero3,
                                   "backend": "torch"},  # bit-comparable with the reference below
                          train={"zero_stage": stage, "grad_accum": ga, "micro_batch_size": mbs, "max_steps": 1,
                                 "grad_clip": 0.0})
        tr = Trainer(load_config(cfg), topo).setup()
        results["switch_after_setup"][name] = zero3_switch_is_on()
        batch = tr.stream.batch(0)
        with torch.no_grad():
            got = tr.source.compute(batch)
            ref = ref_head(batch.input_ids, batch.attention_mask, batch.valid_index, None)
        results["teacher"][name] = {
            "ids_equal": bool(torch.equal(got.ids.cpu(), ref[0])),
            "max_lp_err": float((got.logprobs.cpu() - ref[1]).abs().max()),
        }
        grads = {}

        def grab(eng):
            for n, p in eng.module.student.named_parameters():
                g = safe_get_full_grad(p)
                grads[n] = None if g is None else g.detach().float().cpu().clone()

        tr.step(0, on_boundary=grab)
        tr.source.close()
        results["grads"][name] = grads
        plan_order = tr.plan._order(0)[: 2 * 4].tolist()
        del tr
    if _rank() == 0:
        results["reference"] = reference_grads(paths, plan_order)
        torch.save(results, os.path.join(root, "zero_checks.pt"))
    deepspeed.comm.barrier() if deepspeed.comm.is_initialized() else None


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
            ids, lps, _, rest = head(b.input_ids, None, b.valid_index, None)
        h = student.model(input_ids=b.input_ids).last_hidden_state[:, :-1].reshape(-1, 32)
        total = total + de.fused_distill_loss(h, student.lm_head.weight, ids, lps, reduction="sum", backend="torch",
                                              teacher_rest_logprob=rest)
        n += h.shape[0]
    (total / n).backward()
    return {k: p.grad.clone() for k, p in student.named_parameters()}


def train_runs(root: str) -> None:
    """Colocated ZeRO-2 with a feature loss (loss falls, final save), cache-teacher + cache ZeRO-3, resume
    equality, teacher none."""
    import distill_engine as de
    from distill_engine.trainer import cache_teacher

    train = de.train  # the public Python API
    paths = json.load(open(os.path.join(root, "paths.json")))
    out = {}
    cache_dir = os.path.join(root, "cache")
    # 1. the loss falls over a few dozen steps (colocated, ZeRO-2), the final student is saved.
    cfg = base_config(paths, os.path.join(root, "colocated_z2"),
                      run={"tensorboard": True},
                      loss={"ce_weight": 0.2, "features": {"kind": "cosine", "weight": 0.1, "layer_map": [[1, 1]]}},
                      train={"zero_stage": 2, "max_steps": 30, "lr": 1e-2, "warmup_steps": 2})
    out["colocated_z2"] = train(cfg)
    # 2. the teacher cache, written by both ranks, then a ZeRO-3 run on it.
    base = base_config(paths, os.path.join(root, "cache_z3"),
                       teacher={"source": "cache", "path": paths["teacher"], "k": 8, "cache_dir": cache_dir,
                                "cache_shard_samples": 16},
                       train={"zero_stage": 3, "max_steps": 4})
    out["cache_write"] = cache_teacher(base)
    out["cache_z3"] = train(base)
    # 3. resume: 2N steps straight vs N steps, stop, resume, N more (ZeRO-3, colocated, sampled targets).
    N = 2
    for name, stop in (("straight", None), ("resumed", N)):
        cfg = base_config(paths, os.path.join(root, f"resume_{name}"),
                          teacher={"source": "colocated", "path": paths["teacher"], "k": 8, "method": "sample"},
                          loss={"tail": "renormalize"},
                          train={"zero_stage": 3, "max_steps": 2 * N, "grad_accum": 2})
        if stop:
            cfg["run"]["stop_at_step"] = stop
            out[f"resume_{name}_1"] = train(cfg)
            cfg["run"]["stop_at_step"] = None
            cfg["run"]["resume"] = True
            torch.manual_seed(999)  # disturb the process RNG: the resume must restore it
        out[f"resume_{name}"] = train(cfg)
    # 4. teacher: none (hard labels only), ZeRO-2.
    cfg = base_config(paths, os.path.join(root, "none_z2"), teacher="none", train={"zero_stage": 2, "max_steps": 3})
    out["none_z2"] = train(cfg)
    if _rank() == 0:
        json.dump(out, open(os.path.join(root, "train_runs.json"), "w"), default=str)


def stream_runs(root: str) -> None:
    """1 teacher rank + 2 student ranks: ZeRO-2, then ZeRO-3 with feature distillation streamed too."""
    from distill_engine.trainer import train

    paths = json.load(open(os.path.join(root, "paths.json")))
    out = {}
    for name, stage, feats in (("stream_z2", 2, None), ("stream_z3_features", 3, {"kind": "mse", "weight": 0.5})):
        cfg = base_config(paths, os.path.join(root, name),
                          teacher={"source": "stream", "path": paths["teacher"], "k": 8, "ranks": 1, "prefetch": 2},
                          loss={"features": feats} if feats else {},
                          train={"zero_stage": stage, "max_steps": 4, **_STREAM_TIMEOUTS})
        out[name] = train(cfg)
    if _rank() == 0:
        json.dump(out, open(os.path.join(root, "stream_runs.json"), "w"), default=str)
    long_stream(root)


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
    {"zero_checks": zero_checks, "train_runs": train_runs, "stream_runs": stream_runs,
     "long_stream": long_stream}[sys.argv[1]](sys.argv[2])
