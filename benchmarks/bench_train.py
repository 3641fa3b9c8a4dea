"""End-to-end distillation training throughput and memory: distill-engine's trainer vs a naive KD loop.

Both variants train the same student against the same frozen teacher on the same data with the same
optimizer (AdamW), precision and ZeRO stage, through the same engine (DeepSpeed, or the plain-PyTorch
single-process engine where DeepSpeed is not installed):

* ``naive``: Hugging Face forwards with full logits for both models, KL(teacher ‖ student) over the whole
  vocabulary from ``log_softmax`` of both, autograd (what a KD loop written from scratch does);
* ``fused``: the trainer's own step — student stopped at its final hidden states, teacher top-k targets from
  ``de.teacher_targets``, ``de.fused_distill_loss`` (forward KL, tail="bucket");
* ``fused-cache``: the same step with targets read from a teacher cache (``cache-teacher`` run first), i.e. the
  teacher forward is gone;
* ``trl``: the peer, TRL's ``GKDTrainer`` at λ = 0 (off-policy: the same packed samples, full logits of both
  models, β = 0 = forward KL; benchmarks/trl_peer.py), always one process. Issue 13's off-policy row is
  ``--nproc 1 --engine torch --variants fused,trl`` (both plain-PyTorch AdamW in one process).

Per variant and micro-batch size, one launch (``torchrun``, ``--nproc`` ranks on CPU; one process on CUDA)
measures tokens/s over ``--steps`` timed optimizer steps after one warm-up step, and the peak memory per rank:
CPU — the resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` after the warm-up,
glibc told to ``mmap`` large blocks so freed memory leaves the resident set), absolute and beyond the
resident set before the timed steps; CUDA — ``max_memory_allocated``. The largest micro-batch under a memory
cap is taken from the peaks measured at ``--mbs`` (linear fit) and then run once to confirm.

    python benchmarks/bench_train.py                       # CPU, 2 ranks, ~20M teacher / ~5M student, V=32000
    python benchmarks/bench_train.py --device cuda --preset gpu   # 1 GPU, V=128256, bf16
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time

import torch

from harness import (_MMAP_ENV, _ROOT, VOCAB, _reset_peak_rss, _rss_bytes, add_jsonl_arg, atomic_write, emit,
                     fmt_bytes, machine_info)

PRESETS = {
    # ~19.6M-parameter teacher (tied embeddings 12.3M + 4 layers), ~4.5M student (tied 4.1M + 2 layers)
    "cpu": dict(V=VOCAB["llama2"], seq=256, teacher=dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                                               num_attention_heads=6, num_key_value_heads=2),
                student=dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2), mbs=[1, 2, 4], mb=4, steps=2, nproc=2, precision="fp32",
                zero=2, cap_gb=2.0),
    # ZeRO-0 vs ZeRO-3 per-rank memory: a student large enough (~46M params) that its parameters, gradients and
    # AdamW state dominate a rank's memory; targets from the teacher cache, so no teacher sits in memory.
    "zero": dict(V=VOCAB["llama2"], seq=256, teacher=dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                                                num_attention_heads=6, num_key_value_heads=2),
                 student=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                              num_key_value_heads=4), mbs=[2], mb=2, steps=2, nproc=2, precision="fp32", zero=0,
                 cap_gb=8.0),
    # Llama-3 vocabulary; ~0.9B teacher, ~0.3B student: one GPU, bf16
    "gpu": dict(V=VOCAB["llama3"], seq=1024, teacher=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                                                 num_attention_heads=16, num_key_value_heads=8),
                student=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                             num_key_value_heads=4), mbs=[4, 8], mb=8, steps=3, nproc=1, precision="bf16", zero=0,
                cap_gb=40.0),
}


# ---------------------------------------------------------------------------------------------- set-up
def build_workdir(root: str, p: dict) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill_engine.data.tokenizer import byte_level_tokenizer

    tok = byte_level_tokenizer()
    paths = {}
    for name, spec, seed, tie in (("teacher", p["teacher"], 1, True), ("student", p["student"], 2, True)):
        cfg = LlamaConfig(vocab_size=p["V"], max_position_embeddings=max(2048, p["seq"]), tie_word_embeddings=tie,
                          **spec)
        torch.manual_seed(seed)
        m = LlamaForCausalLM(cfg)
        if name == "teacher":  # a peaked teacher distribution, as a trained one has
            with torch.no_grad():
                m.model.embed_tokens.weight.mul_(8.0)
        path = os.path.join(root, name)
        m.save_pretrained(path, safe_serialization=True)
        tok.save_pretrained(path)
        paths[name] = path
        paths[name + "_params"] = sum(x.numel() for x in m.parameters())
        del m
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(500)]
    data = os.path.join(root, "data.jsonl")
    with open(data, "w") as f:
        for _ in range(3000):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 120)))}) + "\n")
    paths["data"] = data
    return paths


def run_config(paths: dict, p: dict, args, out: str, mb: int, source: str = "colocated") -> dict:
    return {
        "run": {"output_dir": out, "seed": 3, "progress": "false", "tensorboard": False},
        "student": {"path": paths["student"]},
        "teacher": {"source": source, "path": paths["teacher"], "k": 64, "cache_dir": os.path.join(args.workdir, f"cache_{args.max_samples}"),
                    "dtype": "bfloat16" if p["precision"] == "bf16" else "float32"},
        "loss": {"backend": args.backend, "validate": "never"},
        "data": {"train_files": [paths["data"]], "seq_len": p["seq"], "max_samples": args.max_samples},
        "train": {"zero_stage": p["zero"], "precision": p["precision"], "micro_batch_size": mb, "grad_accum": 1,
                  "max_steps": 1000, "lr": 1e-4, "warmup_steps": 0, "save_final": False, "engine": args.engine,
                  "log_every": 1000},
    }


# ---------------------------------------------------------------------------------------------- naive KD
class NaiveKD(torch.nn.Module):
    """Full logits for both models, KL on log_softmax over the vocabulary, autograd."""

    def __init__(self, student, teacher, temperature: float = 1.0):
        super().__init__()
        self.student = student
        self._teacher = [teacher]  # not a submodule: frozen, never seen by the optimizer or ZeRO
        self.T = temperature

    def forward(self, input_ids, attention_mask, labels, scale):
        s = self.student(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        with torch.no_grad():
            t = self._teacher[0](input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        log_q = torch.log_softmax(s.float() / self.T, dim=-1)
        log_p = torch.log_softmax(t.float() / self.T, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [B, L-1]
        mask = (labels != -100).to(kl.dtype)
        loss_sum = (kl * mask).sum() * self.T ** 2
        return loss_sum * scale, loss_sum.detach()


# ---------------------------------------------------------------------------------------------- worker
def _peak_reset(device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    _reset_peak_rss()
    return _rss_bytes("VmRSS")


def _peak(device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _rss_bytes("VmHWM")


def worker(args) -> None:
    import torch.distributed as dist

    from distill_engine.teacher import topology
    from distill_engine.trainer.config import load_config
    from distill_engine.trainer.engine import DeepSpeedEngine, TorchEngine, deepspeed_config, quiet_deepspeed
    from distill_engine.trainer.loop import Trainer, _dp_sum, resolve_engine, teacher_dtype
    from distill_engine.trainer.models import load_model, resolve_attn

    p = PRESETS[args.preset]
    paths = json.load(open(os.path.join(args.workdir, "paths.json")))
    topo = topology.setup(timeout_s=1800, heartbeat_timeout_s=600)
    results = []
    for mb in [int(x) for x in args.worker_mbs.split(",")]:
        if args.worker == "trl":  # the peer: TRL's trainer in this (single) process, no engine Trainer
            results.append(trl_row(args, p, paths, mb))
            continue
        raw = run_config(paths, p, args, os.path.join(args.workdir, f"out_{args.worker}_{mb}"), mb,
                         "cache" if args.worker.startswith("fused-cache") else "colocated")
        if args.worker.startswith("fused-cache-z"):  # the same run at another ZeRO stage
            raw["train"]["zero_stage"] = int(args.worker[len("fused-cache-z"):])
            raw["train"]["deepspeed"] = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
        cfg = load_config(raw)
        tr = Trainer(cfg, topo)
        if args.worker == "fused" or args.worker.startswith("fused-cache"):
            tr.setup()
            device = tr.engine.device

            def step(i, hook=None):
                return tr.step(i, on_boundary=hook)
        else:
            kind = resolve_engine(cfg, tr.world)
            device = tr.device
            if kind == "deepspeed":
                quiet_deepspeed()
            s_dtype = torch.bfloat16 if p["precision"] == "bf16" and kind == "deepspeed" else torch.float32
            student = load_model(paths["student"], None, key="student", dtype=s_dtype,
                                 attn=resolve_attn("auto", device))
            teacher = load_model(paths["teacher"], None, key="teacher", dtype=teacher_dtype(cfg, device),
                                 attn=resolve_attn("auto", device)).to(device).eval().requires_grad_(False)
            module = NaiveKD(student, teacher)
            engine = (DeepSpeedEngine(module, cfg, deepspeed_config(cfg, tr.world), device) if kind == "deepspeed"
                      else TorchEngine(module, cfg, device))
            engine.train()
            device = engine.device

            def step(i, hook=None):
                b = tr.stream.batch(i)
                total = float(_dp_sum([b.n_valid], device)[0])
                bd = b.to(device)
                loss, _ = engine(bd.input_ids, bd.attention_mask, bd.labels, tr.world / total)
                engine.backward(loss)
                engine.step()
                return total
        step(0)  # warm-up: optimizer state, gradient buffers, kernels
        base = _peak_reset(device)
        t0 = time.perf_counter()
        tokens = 0.0
        states = [0]
        for i in range(1, 1 + args.steps):
            # the student's states are counted after the last backward, before the optimizer frees the grads
            last = i == args.steps and hasattr(tr, "engine")
            tokens += step(i, (lambda eng: states.__setitem__(0, _model_state_bytes(eng))) if last else None)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peak = _peak(device)
        red = torch.tensor([float(peak), float(peak - base), float(states[0])], dtype=torch.float64,
                           device=device if device.type == "cuda" else "cpu")
        if dist.is_initialized() and dist.get_world_size() > 1:  # the worst rank
            dist.all_reduce(red, op=dist.ReduceOp.MAX)
        red = red.cpu()
        results.append({"mb": mb, "tokens_per_s": tokens / dt, "step_s": dt / args.steps, "tokens": tokens,
                        "peak_bytes": float(red[0]), "peak_extra_bytes": float(red[1]),
                        "model_state_bytes": float(red[2])})
        if hasattr(tr, "source"):
            tr.source.close()
        del tr, step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if topo.rank == 0:
        print("@@RESULT@@" + json.dumps(results), flush=True)


def trl_row(args, p: dict, paths: dict, mb: int) -> dict:
    """TRL's GKDTrainer off-policy (λ = 0, β = 0: forward KL over full logits) on the engine's own packed samples,
    one process; the row in the engine workers' format (benchmarks/trl_peer.py)."""
    from trl_peer import engine_rows, gkd_run

    rows = engine_rows(paths, p["seq"], args.max_samples, p["seq"])
    r = gkd_run(paths, rows, workdir=args.workdir, mb=mb, steps=args.steps, lmbda=0.0, beta=0.0)
    return {"mb": mb, "tokens_per_s": r["tokens"] / r["seconds"], "step_s": r["seconds"] / args.steps,
            "tokens": r["tokens"], "peak_bytes": float(r["peak"]), "peak_extra_bytes": float(r["peak"] - r["base"]),
            "model_state_bytes": 0.0}


def _model_state_bytes(engine) -> int:
    """Bytes this rank holds of the student's parameters, gradients and optimizer state (AdamW moments, fp32
    master partitions): every tensor reachable from the module's parameters (their ZeRO-3 partitions where
    partitioned) and from the optimizer, each storage counted once."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()

    for prm in engine.module.parameters():
        add(getattr(prm, "ds_tensor", prm))
        add(prm.grad)
    ds = getattr(engine, "engine", None)
    opt = getattr(ds, "optimizer", None) or getattr(engine, "optimizer", None)
    for holder in (opt, getattr(opt, "optimizer", None)):
        if holder is None:
            continue
        for v in vars(holder).values():  # ZeRO's flat fp32 partitions and gradient buffers
            for t in (v if isinstance(v, (list, tuple)) else [v]):
                for u in (t if isinstance(t, (list, tuple)) else [t]):
                    add(u)
        for st in getattr(holder, "state", {}).values():
            for t in (st.values() if isinstance(st, dict) else []):
                add(t)
    return total


# ---------------------------------------------------------------------------------------------- driver
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, variant: str, mbs, nproc: int, max_samples=None) -> list:
    base = [os.path.abspath(__file__), "--_worker", variant, "--worker-mbs", ",".join(str(m) for m in mbs),
            "--workdir", args.workdir, "--preset", args.preset, "--steps", str(args.steps), "--backend", args.backend,
            "--engine", args.engine, "--device", args.device]
    if max_samples or args.max_samples:
        base += ["--max-samples", str(max_samples or args.max_samples)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(_free_port())] + base
    else:
        cmd = [sys.executable] + base
    env = dict(os.environ, **_MMAP_ENV)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))
    env.update(PYTHONWARNINGS="ignore", DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu" if args.device == "cpu" else "cuda"),
               TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1",
               PYTHONPATH=_ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    print(f"[bench_train] {variant} mb={mbs} ...", file=sys.stderr, flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@")), None)
    if line is None:
        tail = (proc.stdout + proc.stderr).strip()[-1500:]
        print(f"[bench_train] {variant} FAILED (rc {proc.returncode}):\n{tail}", file=sys.stderr)
        return [{"mb": m, "error": f"rc {proc.returncode}: {tail[-300:]}"} for m in mbs]
    print(f"[bench_train] {variant} done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    rows = json.loads(line[len("@@RESULT@@"):])
    for r in rows:
        emit(dict(r, case=variant, preset=args.preset, nproc=nproc, device=args.device), args.jsonl)
    return rows


def largest_mb(rows, cap: float):
    """Largest micro-batch whose peak stays under ``cap``, from a linear fit of the measured peaks."""
    pts = [(r["mb"], r["peak_bytes"]) for r in rows if "peak_bytes" in r]
    if len(pts) < 2:
        return None
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else 0.0
    icpt = my - slope * mx
    if slope <= 0:
        return None
    return max(0, int((cap - icpt) // slope))


def table(rows, baseline="naive") -> str:
    bases = {r["mb"]: r for r in rows if r["variant"] == baseline and "tokens_per_s" in r}
    out = ["| variant | micro-batch | tokens/s | vs naive | step | peak memory / rank | vs naive | peak beyond pre-step RSS "
           "| student params+grads+optimizer / rank |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['variant']} | {r['mb']} | error | | | | | {r['error'][:80]} |")
            continue
        same = bases.get(r["mb"])
        rt = f"{r['tokens_per_s'] / same['tokens_per_s']:.2f}x" if same else ""
        rm = f"{100 * r['peak_bytes'] / same['peak_bytes']:.0f}%" if same else ""
        out.append(f"| {r['variant']} | {r['mb']} | {r['tokens_per_s']:,.0f} | {rt} | {r['step_s']:.2f} s | "
                   f"{fmt_bytes(r['peak_bytes'])} | {rm} | {fmt_bytes(r['peak_extra_bytes'])} | "
                   f"{fmt_bytes(r['model_state_bytes']) if r.get('model_state_bytes') else ''} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps per measurement (after 1 warm-up)")
    ap.add_argument("--mbs", default=None, help="micro-batch sizes for the memory fit, e.g. 1,2,4")
    ap.add_argument("--cap-gb", type=float, default=None, help="memory cap per rank for the largest micro-batch")
    ap.add_argument("--nproc", type=int, default=None)
    ap.add_argument("--backend", default="auto", help="loss backend of the fused variants")
    ap.add_argument("--engine", default="auto", choices=["auto", "deepspeed", "torch"])
    ap.add_argument("--variants", default="naive,fused,fused-cache")
    ap.add_argument("--no-confirm", action="store_true", help="skip the run at the fitted largest micro-batch")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--max-samples", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    add_jsonl_arg(ap)
    ap.add_argument("--_worker", dest="worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-mbs", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.preset is None:
        args.preset = "gpu" if args.device.startswith("cuda") else "cpu"
    p = PRESETS[args.preset]
    args.steps = args.steps or p["steps"]
    if args.worker:
        worker(args)
        return

    nproc = args.nproc or p["nproc"]
    mbs = [int(x) for x in (args.mbs.split(",") if args.mbs else p["mbs"])]
    cap = (args.cap_gb or p["cap_gb"]) * 2**30
    if args.engine == "auto":
        try:
            import deepspeed  # noqa: F401

            args.engine = "deepspeed"
        except ImportError:
            args.engine = "torch"
    if args.engine == "torch" and nproc > 1:
        print("[bench_train] no DeepSpeed: one process (plain-PyTorch engine, the ZeRO-0 equivalent)", file=sys.stderr)
        nproc = 1
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bench_train_")
    # enough samples for warm-up + timed steps at the largest micro-batch measured (and a fitted one up to 4x)
    need = nproc * (1 + args.steps) * max(mbs) * 4
    args.max_samples = args.max_samples or need
    if not os.path.exists(os.path.join(args.workdir, "paths.json")):
        paths = build_workdir(args.workdir, p)
        json.dump(paths, open(os.path.join(args.workdir, "paths.json"), "w"))
    paths = json.load(open(os.path.join(args.workdir, "paths.json")))
    variants = args.variants.split(",")
    rows = []
    fitted = {}
    for v in variants:
        if v.startswith("fused-cache"):
            from distill_engine.trainer import cache_teacher  # noqa: F401  (built in a launch below)

            t0 = time.time()
            res = _build_cache(args, p, paths, nproc)
            if res is not None:
                rows_c = launch(args, v, [p["mb"]], nproc)
                for r in rows_c:
                    r["variant"] = v
                    r["notes"] = f"cache built in {time.time() - t0:.0f} s ({res})"
                rows.extend(rows_c)
            continue
        # TRL's trainer runs one process (no torchrun launch of its own here): compare with --nproc 1
        res = launch(args, v, mbs, 1 if v == "trl" else nproc)
        for r in res:
            r["variant"] = v
        rows.extend(res)
        fitted[v] = largest_mb(res, cap)
    confirm = []
    if not args.no_confirm:
        for v, m in fitted.items():
            if m and m not in mbs:
                for r in launch(args, v, [m], nproc, max_samples=nproc * (1 + args.steps) * m):
                    r["variant"] = v
                    r["note"] = "fitted largest under cap"
                    confirm.append(r)
    rows.extend(confirm)
    info = machine_info(args.device)
    info.update(nproc=nproc, engine=args.engine, preset=args.preset, V=p["V"], seq=p["seq"],
                teacher_params=paths["teacher_params"], student_params=paths["student_params"], steps=args.steps,
                zero_stage=p["zero"] if args.engine == "deepspeed" else 0, precision=p["precision"])
    lines = [f"bench_train: {args.preset} preset, {nproc} rank(s), engine {args.engine}, ZeRO {info['zero_stage']}, "
             f"{p['precision']}, V={p['V']}, seq={p['seq']}, teacher {paths['teacher_params'] / 1e6:.1f}M / student "
             f"{paths['student_params'] / 1e6:.1f}M params, {args.steps} timed steps",
             "", table(rows), "",
             f"Largest micro-batch under {cap / 2**30:.1f} GiB per rank (linear fit of the peaks at {mbs}"
             f"{', confirmed by a run' if confirm else ''}):"]
    for v, m in fitted.items():
        c = next((r for r in confirm if r["variant"] == v), None)
        extra = ""
        if c is not None and "peak_bytes" in c:
            ok = "under" if c["peak_bytes"] <= cap else "OVER"
            extra = f" (run at {m}: peak {fmt_bytes(c['peak_bytes'])}, {ok} the cap"
            extra += "; the peak grows sub-linearly, so this is a lower bound)" if c["peak_bytes"] < 0.8 * cap else ")"
        lines.append(f"- {v}: {m}{extra}")
    cache_row = next((r for r in rows if r["variant"] == "fused-cache" and "tokens_per_s" in r), None)
    col_row = next((r for r in rows if r["variant"] == "fused" and r.get("mb") == p["mb"] and "tokens_per_s" in r), None)
    if cache_row and col_row:
        lines.append(f"- cache vs colocated tokens/s at micro-batch {p['mb']}: "
                     f"{cache_row['tokens_per_s'] / col_row['tokens_per_s']:.2f}x ({cache_row.get('notes', '')})")
    for r in rows:  # issue 13's off-policy target: tokens/s >= 1.2x TRL's at <= 50% of its peak memory
        t = next((x for x in rows if x["variant"] == "trl" and x["mb"] == r["mb"] and "tokens_per_s" in x), None)
        if t and r["variant"] == "fused" and "tokens_per_s" in r:
            lines.append(f"- fused vs TRL GKDTrainer (λ = 0) at micro-batch {r['mb']}: tokens/s "
                         f"{r['tokens_per_s'] / t['tokens_per_s']:.2f}x, peak memory "
                         f"{100 * r['peak_bytes'] / t['peak_bytes']:.0f}% (target: >= 1.2x at <= 50%)")
    md = "\n".join(lines)
    print(md)
    if args.md:
        atomic_write(args.md, md + "\n")
    if args.json:
        atomic_write(args.json, json.dumps({"machine": info, "rows": rows, "largest_mb": fitted}, indent=2))


def _build_cache(args, p, paths, nproc):
    """cache-teacher over the benchmark's samples (a launch of the CLI), returning its summary or None."""
    cfg = run_config(paths, p, args, os.path.join(args.workdir, "out_cache"), p["mb"], "cache")
    cfg_path = os.path.join(args.workdir, "cache_run.json")
    json.dump(cfg, open(cfg_path, "w"))
    base = ["-m", "distill_engine.cli", "cache-teacher", "--config", cfg_path, "--set", f"teacher.batch_size={p['mb']}"]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(_free_port())] + base) if nproc > 1 else [sys.executable] + base
    env = dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error",
               PYTHONPATH=_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))
    print("[bench_train] cache-teacher ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"[bench_train] cache-teacher FAILED:\n{(proc.stdout + proc.stderr)[-1500:]}", file=sys.stderr)
        return None
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return f"{res['bytes_per_token']:.0f} B/token, {res['shards']} shards"


if __name__ == "__main__":
    main()
