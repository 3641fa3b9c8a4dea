"""On-policy distillation throughput and memory: distill-engine's trainer vs TRL's GKDTrainer (1 process, CPU).

Both train the same tiny student against the same frozen teacher (V = 32,000 by default) fully on-policy
(λ = 1): the student continues the first ``--prompt`` tokens of each sample by ``--new`` sampled tokens
(temperature 1, top-p 1), and the loss is the generalized JSD(β = 0.5) on the generated tokens, AdamW, fp32.

* ``engine``: ``Trainer.step`` with ``loss.on_policy`` (KV-cache rollouts, teacher top-k targets with k =
  ``--k`` from hidden states, ``fused_distill_loss``: no [tokens × V] logits);
* ``trl``: ``trl.experimental.gkd.GKDTrainer`` (``model.generate``, full logits of both models,
  ``generalized_jsd_loss``), fed the same token ids through a collator of its documented input keys.

Each variant runs in its own process: one warm-up step, then ``--steps`` timed steps; tokens/s counts the
generated (trained) tokens; peak memory is the resident-set high-water mark (VmHWM, reset after warm-up) and
its growth beyond the resident set before the timed steps. TRL is a benchmark peer only
(requirements-bench.txt).

    python benchmarks/bench_onpolicy.py --out BENCH_onpolicy.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from harness import _MMAP_ENV, VOCAB, _reset_peak_rss, _rss_bytes, add_jsonl_arg, emit, fmt_bytes, machine_info

PRESET = dict(V=VOCAB["llama2"], seq=64, teacher=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2),
              student=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2))


def _engine(args, paths) -> dict:
    from distill_engine.teacher import topology
    from distill_engine.trainer.config import load_config
    from distill_engine.trainer.loop import Trainer

    cfg = load_config({
        "run": {"output_dir": os.path.join(args.workdir, "engine_out"), "seed": 3, "progress": "false",
                "tensorboard": False},
        "student": {"path": paths["student"]},
        "teacher": {"path": paths["teacher"], "k": args.k},
        "loss": {"divergence": "jsd", "beta": 0.5, "validate": "never",
                 "on_policy": {"fraction": 1.0, "prompt_tokens": args.prompt, "max_new_tokens": args.new}},
        "data": {"train_files": [paths["data"]], "seq_len": PRESET["seq"], "max_samples": 512},
        "train": {"engine": "torch", "zero_stage": 0, "micro_batch_size": args.mb, "max_steps": 1000, "lr": 1e-4,
                  "warmup_steps": 0, "save_final": False, "grad_clip": 0.0},
    })
    topo = topology.setup(teacher_ranks=0, timeout_s=600, heartbeat_timeout_s=60, bridge_backend="auto")
    tr = Trainer(cfg, topo).setup()
    tr.step(0)
    base = _reset()
    t0 = time.perf_counter()
    tokens = sum(tr.step(s) for s in range(1, args.steps + 1))
    return _result(time.perf_counter() - t0, tokens, args.steps, base)


def _trl(args, paths) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distill_engine.data import load_texts, load_tokenizer, tokenize

    tok = load_tokenizer(paths["student"], key="student")
    samples = tokenize(load_texts([paths["data"]]), tok, seq_len=PRESET["seq"], packing=True, add_eos=True,
                       max_samples=512)
    rows = [{"ids": samples.sample(i)[:args.prompt + args.new].tolist()} for i in range(len(samples))]

    def collate(batch):
        # the original prompt ‖ continuation with labels on the continuation (TRL normalizes by the batch's label
        # count, taken before the on-policy swap); λ = 1 replaces every batch by the student's generations
        ids = torch.tensor([b["ids"] for b in batch], dtype=torch.long)
        mask = torch.ones_like(ids)
        labels = ids.clone()
        labels[:, :args.prompt] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "prompts": ids[:, :args.prompt],
                "prompt_attention_mask": mask[:, :args.prompt]}

    counted = {"tokens": 0}

    class Counting(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            counted["tokens"] += int((inputs["labels"][:, 1:] != -100).sum())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step == 1:
                marks["base"] = _reset()
                marks["t0"] = time.perf_counter()
                marks["tok0"] = counted["tokens"]
            marks["t1"] = time.perf_counter()

    student = AutoModelForCausalLM.from_pretrained(paths["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype=torch.float32)
    cfg = GKDConfig(output_dir=os.path.join(args.workdir, "trl_out"), per_device_train_batch_size=args.mb,
                    max_steps=args.steps + 1, learning_rate=1e-4, lr_scheduler_type="constant", lmbda=1.0, beta=0.5,
                    temperature=1.0, max_new_tokens=args.new, report_to="none", use_cpu=True, save_strategy="no",
                    logging_steps=1000, disable_dropout=True, max_grad_norm=0.0, seed=3, dataloader_num_workers=0)
    trainer = Counting(model=student, teacher_model=teacher, args=cfg, data_collator=collate,
                       train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[Clock()])
    trainer.generation_config.top_k = 0
    trainer.generation_config.top_p = 1.0
    trainer.train()
    return _result(marks["t1"] - marks["t0"], counted["tokens"] - marks["tok0"], args.steps, marks["base"])


def _reset() -> int:
    import gc

    gc.collect()
    _reset_peak_rss()
    return _rss_bytes("VmRSS")


def _result(seconds, tokens, steps, base) -> dict:
    peak = _rss_bytes("VmHWM")
    return {"seconds": seconds, "steps": steps, "tokens": tokens, "steps_per_s": steps / seconds,
            "tokens_per_s": tokens / seconds, "peak_rss": peak, "peak_growth": peak - base}


def _build(workdir: str) -> dict:
    from bench_train import build_workdir

    marker = os.path.join(workdir, "paths.json")
    if os.path.exists(marker):
        return json.load(open(marker))
    p = dict(PRESET, teacher=PRESET["teacher"], student=PRESET["student"])
    paths = build_workdir(workdir, p)
    json.dump(paths, open(marker, "w"))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bench_onpolicy"))
    ap.add_argument("--mb", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--variants", default="engine,trl")
    ap.add_argument("--out", help="write the results as JSON here")
    add_jsonl_arg(ap)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    paths = _build(args.workdir)
    if args.worker:
        res = (_engine if args.worker == "engine" else _trl)(args, paths)
        print("RESULT " + json.dumps(res))
        return
    results = {}
    for v in args.variants.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", v] + [
            f"--{k}={getattr(args, k)}" for k in ("workdir", "mb", "prompt", "new", "k", "steps")]
        env = dict(os.environ, **_MMAP_ENV, PYTHONWARNINGS="ignore")
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            raise SystemExit(f"{v} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        results[v] = json.loads(line[-1][7:])
        emit(dict(results[v], case=v, mb=args.mb, prompt=args.prompt, new=args.new, k=args.k), args.jsonl)
    print(f"| variant | steps/s | tokens/s | peak RSS | peak growth |\n|---|---|---|---|---|")
    for v, r in results.items():
        print(f"| {v} | {r['steps_per_s']:.3f} | {r['tokens_per_s']:.1f} | {fmt_bytes(r['peak_rss'])} | "
              f"{fmt_bytes(r['peak_growth'])} |")
    if "engine" in results and "trl" in results:
        e, t = results["engine"], results["trl"]
        print(f"\nengine/TRL tokens/s: {e['tokens_per_s'] / t['tokens_per_s']:.2f}×, peak RSS "
              f"{e['peak_rss'] / t['peak_rss']:.0%}, peak growth {e['peak_growth'] / max(t['peak_growth'], 1):.0%}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": machine_info("cpu"), "args": vars(args), "preset": PRESET, "results": results}, f,
                      indent=2)


if __name__ == "__main__":
    main()
