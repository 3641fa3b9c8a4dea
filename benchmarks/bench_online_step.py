"""Benchmark: the loss step of online distillation, teacher hidden states → loss forward+backward.

Every case starts from the same inputs: teacher final hidden states h_t [N, d_t] with the teacher lm_head
W_t [V, d_t] (no gradient), student final hidden states h_s [N, d_s] with W_s [V, d_s] (gradients for
both), and runs one full step:

* ``naive``: teacher logits h_t W_tᵀ and log_softmax (no grad); student logits, log_softmax, full-vocabulary
  forward KL(P‖Q) summed over V and averaged over rows; autograd.
* ``liger_jsd``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` (dense teacher logits per chunk of 1024 rows,
  JSD beta=0.5, weight_hard_loss=0), ``compiled=False`` on CPU (torch.compile of its chunk step on CPU costs
  minutes of compile per shape and was slower in our runs; ``--liger-compiled`` turns it on; on CUDA it is on).
* ``engine_topk_kl``: ``de.teacher_targets(h_t, W_t, k)`` (top-k) → ``de.fused_distill_loss`` forward KL,
  tail="bucket", backward. Backend "auto": C++ on CPU, Triton on CUDA.
* ``engine_topk_jsd``: the same with divergence="jsd", beta=0.5 (Liger's divergence, on k+1 categories).
* ``engine_sample_kl``: method="sample" targets (k draws) with tail="renormalize".
* ``engine_teacher_only``: ``de.teacher_targets`` alone (its share of the engine step).
* ``engine_topk_kl_cublas`` (CUDA only): engine_topk_kl with DISTILL_ENGINE_TT_LOGITS=cublas (teacher logits
  by a cuBLAS GEMM into an fp32 buffer, read by the same candidate kernel) instead of the fused tile GEMM.

Semantics differ on purpose: the engine never forms either [N, V] distribution; naive and Liger compare
full distributions. Peak extra memory is what the step allocates beyond inputs and gradients.

Presets: ``--preset cpu`` (default: N=2048, d_s=512, d_t=1024, V=32,000, k=64; float32) and
``--preset gpu`` (N=8192, d_s=2048, d_t=4096, V=128,256, k=64; use with ``--device cuda``, bfloat16)::

    python benchmarks/bench_online_step.py --json /tmp/online_cpu.json
    python benchmarks/bench_online_step.py --preset gpu --device cuda --md $OUT/online_step.md
"""
from __future__ import annotations

import sys

import torch

from harness import VOCAB, Case, add_shape_args, env_override, main, resolve_shape

import distill_engine as de
from distill_engine.trainer.config import TeacherConfig

PRESETS = {"cpu": dict(N=2048, ds=512, dt=1024, V=VOCAB["llama2"], k=TeacherConfig.k),
           "gpu": dict(N=8192, ds=2048, dt=4096, V=VOCAB["llama3"], k=TeacherConfig.k)}


def add_args(p):
    add_shape_args(p, PRESETS)
    p.add_argument("--liger-compiled", action="store_true", help="torch.compile Liger's chunk step on CPU too")
    p.add_argument("--liger-chunk", type=int, default=1024)
    p.add_argument("--teacher-backend", default="auto", help="backend of de.teacher_targets")
    p.add_argument("--loss-backend", default="auto", help="backend of de.fused_distill_loss")


def _shape(args):
    return resolve_shape(args, PRESETS)


def gemm_shape(args):
    s = _shape(args)
    return min(s["N"], 4096), min(s["V"], 8192), s["ds"]


def _inputs(s, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    # a teacher with a peaked distribution and a student near it: realistic entropies, finite losses
    h_t = (torch.randn(s["N"], s["dt"], generator=g) * 1.5).to(device=device, dtype=dtype)
    w_t = (torch.randn(s["V"], s["dt"], generator=g) / s["dt"] ** 0.5).to(device=device, dtype=dtype)
    h_s = (torch.randn(s["N"], s["ds"], generator=g)).to(device=device, dtype=dtype).requires_grad_(True)
    w_s = (torch.randn(s["V"], s["ds"], generator=g) / s["ds"] ** 0.5).to(device=device, dtype=dtype).requires_grad_(True)
    labels = torch.randint(0, s["V"], (s["N"],), generator=g).to(device)
    return h_t, w_t, h_s, w_s, labels


def build_cases(args):
    s = _shape(args)
    dev, dtype = args.device, args.torch_dtype
    N, V, ds, dt, k = s["N"], s["V"], s["ds"], s["dt"], s["k"]
    flops_teacher = 2.0 * N * V * dt
    flops_student = 6.0 * N * V * ds

    def make_naive():
        h_t, w_t, h_s, w_s, _ = _inputs(s, dev, dtype)

        def step():
            with torch.no_grad():
                lp_t = torch.log_softmax((h_t @ w_t.t()).float(), dim=-1)  # [N, V]
            lq = torch.log_softmax((h_s @ w_s.t()).float(), dim=-1)  # [N, V]
            loss = (lp_t.exp() * (lp_t - lq)).sum(-1).mean()
            loss.backward()

        return step, [h_s, w_s]

    def make_liger():
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        h_t, w_t, h_s, w_s, labels = _inputs(s, dev, dtype)
        compiled = dev.startswith("cuda") or args.liger_compiled
        fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5,
                                     compiled=compiled, chunk_size=args.liger_chunk)

        def step():
            loss = fn(h_s, w_s, h_t, w_t, labels)
            loss.backward()

        return step, [h_s, w_s]

    def make_engine(method, divergence, tail, env=None):
        def make():
            h_t, w_t, h_s, w_s, _ = _inputs(s, dev, dtype)
            gen = torch.Generator(device=dev).manual_seed(0) if method == "sample" else None

            def step():
                with env_override(env):
                    t = de.teacher_targets(h_t, w_t, k, method=method, generator=gen, backend=args.teacher_backend)
                loss = de.fused_distill_loss(h_s, w_s, t.ids, t.logprobs, divergence=divergence, beta=0.5, tail=tail,
                                             backend=args.loss_backend)
                loss.backward()

            return step, [h_s, w_s]

        return make

    def make_teacher_only():
        h_t, w_t, _, _, _ = _inputs(s, dev, dtype)

        def step():
            de.teacher_targets(h_t, w_t, k, backend=args.teacher_backend)

        return step, []

    extra = []
    if dev.startswith("cuda"):  # the teacher's logits through cuBLAS + the same candidate kernel
        extra.append(Case("engine_topk_kl_cublas", make_engine("topk", "forward_kl", "bucket",
                                                               {"DISTILL_ENGINE_TT_LOGITS": "cublas"}),
                          flops=flops_teacher + flops_student, notes="engine_topk_kl, teacher logits by cuBLAS"))
    liger_note = "JSD beta=0.5, chunk %d, compiled=%s" % (args.liger_chunk, dev.startswith("cuda") or args.liger_compiled)
    # Liger last: its torch.compile warm-up is the slowest part of a GPU run; the others are measured first.
    # Without liger-kernel installed (on the GPU machine: a wheel carried in .whl/) its row is skipped, and said so.
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        print("[bench] liger_jsd: skipped (liger-kernel not installed)", file=sys.stderr, flush=True)
        liger_cases = []
    else:
        liger_cases = [Case("liger_jsd", make_liger, flops=flops_teacher + flops_student, notes=liger_note)]
    return [
        Case("naive", make_naive, flops=flops_teacher + flops_student, notes="full logits, log_softmax, KL, autograd"),
        Case("engine_topk_kl", make_engine("topk", "forward_kl", "bucket"), flops=flops_teacher + flops_student,
             notes=f"teacher_targets top-{k} + fused_distill_loss forward_kl/bucket"),
        Case("engine_topk_jsd", make_engine("topk", "jsd", "bucket"), flops=flops_teacher + flops_student,
             notes=f"top-{k} + fused jsd/bucket"),
        Case("engine_sample_kl", make_engine("sample", "forward_kl", "renormalize"), flops=flops_teacher + flops_student,
             notes=f"{k} sampled draws + fused forward_kl/renormalize"),
        Case("engine_teacher_only", make_teacher_only, flops=flops_teacher,
             notes=f"de.teacher_targets top-{k} alone (the teacher's share of engine_topk_kl)"),
        *extra,
        *liger_cases,
    ]


if __name__ == "__main__":
    main(build_cases, description="Online distillation loss step (teacher hidden → targets → student loss fwd+bwd)",
         add_args=add_args, gemm_shape=gemm_shape)
