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
its growth beyond the resident set before the timed steps. After the measurement each trained student is scored
on the on-policy metric (teacher's NLL of its own continuations, ``--eval-prompts`` prompts, same sampling
seeds for both variants). TRL is a benchmark peer only
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
    res = _result(time.perf_counter() - t0, tokens, args.steps, base)
    return dict(res, **on_policy_metric(args, paths, tr.student, tr.teacher_model))  # the trained HF model


def on_policy_metric(args, paths, student, teacher) -> dict:
    """The on-policy metric after training (after the memory and time measurement): the teacher's and the
    student's per-token NLL of the student's own continuations of ``--eval-prompts`` prompts (the first
    ``--prompt`` tokens of the data's last packed samples), sampled at temperature 1 from the same seeded
    generator for both variants (``distill_engine.eval.onpolicy``)."""
    from types import SimpleNamespace

    from trl_peer import engine_rows

    from distill_engine.data import load_tokenizer
    from distill_engine.eval.onpolicy import on_policy_metrics

    rows = engine_rows(paths, PRESET["seq"], None, PRESET["seq"])[-args.eval_prompts:]
    windows = [SimpleNamespace(ids=r, slice_id=0) for r in rows]
    tok = load_tokenizer(paths["student"], key="student")
    student.eval()
    m = on_policy_metrics(windows, 1, teacher.eval(), {"s": student}, tok, samples=len(windows),
                          prompt_tokens=args.prompt, max_new_tokens=args.new, batch_size=8, device="cpu")["s"][0]
    return {"teacher_nll": m["teacher_nll"], "student_nll": m["student_nll"], "eval_tokens": m["tokens"]}


def _trl(args, paths) -> dict:
    from trl_peer import engine_rows, gkd_run

    rows = engine_rows(paths, PRESET["seq"], 512, args.prompt + args.new)
    r = gkd_run(paths, rows, workdir=args.workdir, mb=args.mb, steps=args.steps, lmbda=1.0, beta=0.5,
                prompt=args.prompt, new=args.new)
    res = _result(r["seconds"], r["tokens"], args.steps, r["base"])
    return dict(res, **on_policy_metric(args, paths, r["student"], r["teacher"]))


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
    ap.add_argument("--eval-prompts", type=int, default=32, help="prompts of the on-policy metric after training")
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
            f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("workdir", "mb", "prompt", "new", "k", "steps", "eval_prompts")]
        env = dict(os.environ, **_MMAP_ENV, PYTHONWARNINGS="ignore")
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            raise SystemExit(f"{v} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        results[v] = json.loads(line[-1][7:])
        emit(dict(results[v], case=v, mb=args.mb, prompt=args.prompt, new=args.new, k=args.k), args.jsonl)
    print("| variant | steps/s | tokens/s | peak RSS | peak growth | teacher-NLL of own samples | own NLL |\n"
          "|---|---|---|---|---|---|---|")
    for v, r in results.items():
        print(f"| {v} | {r['steps_per_s']:.3f} | {r['tokens_per_s']:.1f} | {fmt_bytes(r['peak_rss'])} | "
              f"{fmt_bytes(r['peak_growth'])} | {r['teacher_nll']:.3f} | {r['student_nll']:.3f} |")
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
