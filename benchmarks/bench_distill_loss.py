"""Benchmark of fused_distill_loss (forward + backward) against the naive path and Liger-Kernel.

Cases, measured side by side in one run (benchmarks/harness.py: median time, peak extra memory,
fraction of the GEMM floor at the GEMM rate measured in the same run):

* ``naive``      -- full logits -> log_softmax -> gather -> forward-KL over the k+1 "bucket" categories,
                    autograd (the same loss as fused_distill_loss(divergence="forward_kl", tail="bucket"));
* ``torch``      -- de.fused_distill_loss(backend="torch"), the chunked PyTorch backend;
* ``cpu``        -- backend="cpu" (CPU only, when the C++ extension is built);
* ``triton``     -- backend="triton" (CUDA only); ``triton[cublas-logits]`` forms the chunk logits
                    with cuBLAS and runs only the log-sum-exp kernel over them; ``triton[chunk=...]``
                    uses larger row chunks (fewer passes over the fp32 dW accumulator);
* ``<fastest backend> validate=False`` -- the cost of input validation;
* ``liger-jsd(beta=0)`` -- Liger-Kernel's LigerFusedLinearJSDFunction with beta=0 (= forward KL) and no
                    hard loss. Liger has no sparse-target distillation loss: it takes a DENSE teacher
                    (teacher hidden states + teacher lm_head) and computes the teacher logits itself, so
                    it is run on the dense-teacher formulation at the same student shapes (teacher
                    d = student d); its floor counts the teacher GEMM too (8·N·V·d).

FLOP floors: 6·N·V·d (logits GEMM + the two gradient GEMMs; the fused backends form the gradients
from the stored chunk logits, no recompute).

Usage::

    python benchmarks/bench_distill_loss.py                       # CPU targets of issue 2 (N=2048, d=512, V=32000, k=64, fp32)
    python benchmarks/bench_distill_loss.py --preset cpu-large    # N=4096, d=256, V=128256
    python benchmarks/bench_distill_loss.py --preset gpu --device cuda --dtype bfloat16   # N=8192, d=4096, V=128256
"""
from __future__ import annotations

import math
import sys

import torch

from harness import VOCAB, Case, add_shape_args, env_override, main, resolve_shape

from distill_engine.reference.distill_loss import LOG_FLOOR  # the teacher log-prob floor of the op itself
from distill_engine.trainer.config import TeacherConfig

K = TeacherConfig.k  # the trainer's default top-k
PRESETS = {
    "cpu": dict(N=2048, d=512, V=VOCAB["llama2"], k=K),
    "cpu-large": dict(N=4096, d=256, V=VOCAB["llama3"], k=K),
    "gpu": dict(N=8192, d=4096, V=VOCAB["llama3"], k=K),
}
# the naive bucket's floor on its rest masses 1 − Σp, 1 − Σq (fp32 round-off below it is noise)
TAIL_FLOOR = torch.finfo(torch.float32).eps


def add_args(p):
    add_shape_args(p, PRESETS, default=None)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--chunk-rows", type=int, default=None, help="chunk_rows for the fused backends (default: theirs)")
    p.add_argument("--big-chunk", type=int, default=1024,
                   help="CUDA: also run triton with this chunk_rows (0 = skip); default 1024, the previous GPU policy")
    p.add_argument("--liger-compiled", action="store_true", help="let Liger torch.compile its chunk step")
    p.add_argument("--seed", type=int, default=0)


def _resolve_shape(args):
    resolve_shape(args, PRESETS)
    if args.preset == "gpu" and "--dtype" not in sys.argv:
        args.dtype, args.torch_dtype = "bfloat16", torch.bfloat16


def _make_inputs(args):
    """Student hidden/weight (leaves), sparse teacher targets, labels with ~5% ignored rows."""
    N, d, V, k = args.N, args.d, args.V, args.k
    dev, dt = args.device, args.torch_dtype
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    hidden = torch.randn(N, d, generator=gen).to(dev, dt).requires_grad_()
    weight = (torch.randn(V, d, generator=gen) / math.sqrt(d)).to(dev, dt).requires_grad_()
    # unique ids per row without an [N, V] sort: off + j·step (mod V) with step < V/k
    off = torch.randint(0, V, (N, 1), generator=gen)
    step = torch.randint(1, max(2, V // k), (N, 1), generator=gen)
    ids = (off + torch.arange(k)[None, :] * step) % V                          # [N, k]
    mass = 0.5 + 0.45 * torch.rand(N, 1, generator=gen)                         # teacher mass on the k ids
    lp = torch.log_softmax(2.0 * torch.randn(N, k, generator=gen), dim=1) + torch.log(mass)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[torch.rand(N, generator=gen) < 0.05] = -100
    return hidden, weight, ids.to(dev), lp.to(dev), labels.to(dev)


def naive_forward_kl(hidden, weight, ids, lp, labels, T, ignore_index=-100):
    """Forward KL over the k ids + one rest bucket, on full [N, V] logits (what users write by hand)."""
    logits = hidden @ weight.t()                                                # [N, V] input dtype
    logq = torch.log_softmax(logits.float() / T, dim=-1)                        # [N, V] fp32
    slot = ids >= 0
    lq = logq.gather(1, ids.clamp_min(0).long())                                # [N, k]
    p = torch.where(slot, lp.exp(), torch.zeros_like(lp))
    q = torch.where(slot, lq.exp(), torch.zeros_like(lq))
    p_rest = (1 - p.sum(1)).clamp_min(0)
    q_rest = (1 - q.sum(1)).clamp_min(0)
    kl_s = torch.where(slot & (p > 0), p * (lp.clamp_min(LOG_FLOOR) - lq.clamp_min(LOG_FLOOR)), torch.zeros_like(p))
    kl_rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(TAIL_FLOOR).log() - q_rest.clamp_min(TAIL_FLOOR).log()),
                          torch.zeros_like(p_rest))
    row = T * T * (kl_s.sum(1) + kl_rest)
    valid = labels != ignore_index
    return (row * valid).sum() / valid.sum().clamp_min(1)


def _case_step(loss_fn, leaves):
    def step():
        loss = loss_fn()
        loss.backward()
        return loss.detach()

    return step, leaves


def build_cases(args):
    _resolve_shape(args)
    import distill_engine as de
    from distill_engine import _backend

    N, d, V, k, T = args.N, args.d, args.V, args.k, args.temperature
    floor = 6.0 * N * V * d
    is_cuda = str(args.device).startswith("cuda")
    cases = []

    def naive():
        h, w, ids, lp, lab = _make_inputs(args)
        return _case_step(lambda: naive_forward_kl(h, w, ids, lp, lab, T), [h, w])

    cases.append(Case("naive", naive, flops=floor, notes="[N,V] logits + log_softmax, autograd"))

    def fused(backend, validate=True, chunk_rows=None, logits_mode=None, env=None):
        env = dict(env or {})
        if logits_mode is not None:
            env["DISTILL_ENGINE_TRITON_LOGITS"] = logits_mode

        def make():
            h, w, ids, lp, lab = _make_inputs(args)

            def loss_fn():
                with env_override(env):
                    return de.fused_distill_loss(h, w, ids, lp, labels=lab, temperature=T, backend=backend,
                                                 validate=validate, chunk_rows=chunk_rows or args.chunk_rows)

            return _case_step(loss_fn, [h, w])

        return make

    backends = ["torch"]
    if not is_cuda and _backend.cpu_extension_has("distill_logits_lse"):
        backends.append("cpu")
    if is_cuda and _backend.triton_available():
        backends.append("triton")
    for be in backends:
        cases.append(Case(be, fused(be), flops=floor, notes="fused, grads formed in forward"))
    fastest = backends[-1]
    cases.append(Case(f"{fastest} validate=False", fused(fastest, validate=False), flops=floor,
                      notes="same, input checks off"))
    if "triton" in backends:
        cases.append(Case("triton[cublas-logits]", fused("triton", logits_mode="cublas"), flops=floor,
                          notes="chunk logits by cuBLAS + Triton log-sum-exp pass"))
        if args.big_chunk and args.big_chunk < N:
            cases.append(Case(f"triton[chunk={args.big_chunk}]", fused("triton", chunk_rows=args.big_chunk),
                              flops=floor, notes="other row chunk (default policy: 4096 rows at V=128256)"))
        cases.append(Case("triton[gemm-f32-out=0]", fused("triton", env={"DISTILL_ENGINE_GEMM_F32_OUT": "0"}),
                          flops=floor, notes="gradient GEMMs without fp32 output (bf16 out + fp32 add)"))
        cases.append(Case("triton[autotune=0]", fused("triton", env={"DISTILL_ENGINE_TRITON_AUTOTUNE": "0"}),
                          flops=floor, notes="first (heuristic) tile config, no autotuning"))

    try:
        from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDFunction
    except Exception as exc:  # not installed (benchmark-only dependency): skipped, and said so
        print(f"[bench] liger-jsd(beta=0): skipped ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
        LigerFusedLinearJSDFunction = None
    if LigerFusedLinearJSDFunction is not None:
        def liger():
            h, w, _, _, lab = _make_inputs(args)
            gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
            th = torch.randn(N, d, generator=gen).to(args.device, args.torch_dtype)
            tw = (torch.randn(V, d, generator=gen) / math.sqrt(d)).to(args.device, args.torch_dtype)

            def loss_fn():
                # positional: student_input, student_weight, teacher_input, teacher_weight, true_labels,
                # student_bias, teacher_bias, weight_hard_loss, weight_soft_loss, beta, ignore_index,
                # temperature, compiled
                return LigerFusedLinearJSDFunction.apply(h, w, th, tw, lab, None, None, 0.0, 1.0, 0.0, -100, T,
                                                         bool(args.liger_compiled))

            step, leaves = _case_step(loss_fn, [h, w])
            # a different (dense) teacher: its loss value is not comparable with the baseline's
            return (lambda: (step(), None)[1]), leaves

        cases.append(Case("liger-jsd(beta=0)", liger, flops=8.0 * N * V * d,
                          notes="DENSE teacher (hidden+lm_head; no sparse-target API), forward KL, floor incl. teacher GEMM"))
    return cases


def gemm_shape(args):
    _resolve_shape(args)
    return (min(args.N, 2048), min(args.V, 16384), args.d)


if __name__ == "__main__":
    main(build_cases, description="fused_distill_loss forward+backward (forward_kl, bucket)", add_args=add_args,
         baseline="naive", gemm_shape=gemm_shape)
