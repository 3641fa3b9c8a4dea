"""Benchmark of de.teacher_targets (top-k) against one cuBLAS GEMM of the same shape.

Cases, measured side by side in one run (benchmarks/harness.py):

* ``gemm``                 -- one [N, d] x [d, V] product in the input dtype (torch.mm: cuBLAS on CUDA), the floor
                             the fused kernel is judged against (issue 10 target: top-64 ≤ 1.3x this time);
* ``<backend>``            -- de.teacher_targets(h, W, k) on each available backend (torch; cpu with the extension;
                             triton on CUDA);
* ``triton[cublas-logits]`` -- DISTILL_ENGINE_TT_LOGITS=cublas: logits by cuBLAS into an fp32 buffer, the same
                             candidate kernel reads them;
* ``triton[group_m=0]``    -- DISTILL_ENGINE_TT_GROUP_M=0: the plain row-block-major grid instead of groups of 8.

FLOPs: 2·N·V·d for every case (the logits GEMM), so "% of GEMM floor" compares directly.

Usage::

    python benchmarks/bench_teacher_targets.py                                   # CPU: N=512, d=256, V=8192, k=64
    python benchmarks/bench_teacher_targets.py --preset gpu --device cuda        # N=8192, d=4096, V=128256, bf16
"""
from __future__ import annotations

import math

import torch

from harness import VOCAB, Case, add_shape_args, env_override, main, resolve_shape

from distill_engine.trainer.config import TeacherConfig

PRESETS = {
    "cpu": dict(N=512, d=256, V=8192, k=TeacherConfig.k),
    "gpu": dict(N=8192, d=4096, V=VOCAB["llama3"], k=TeacherConfig.k),
}


def add_args(p):
    add_shape_args(p, PRESETS)


def _shape(args):
    return resolve_shape(args, PRESETS)


def build_cases(args):
    import distill_engine as de
    from distill_engine import _backend

    s = _shape(args)
    N, d, V, k = s["N"], s["d"], s["V"], s["k"]
    dev, dtype = args.device, args.torch_dtype
    flops = 2.0 * N * V * d

    def inputs():
        g = torch.Generator(device="cpu").manual_seed(0)
        h = torch.randn(N, d, generator=g).to(dev, dtype)
        w = (torch.randn(V, d, generator=g) / math.sqrt(d)).to(dev, dtype)
        return h, w

    def make_gemm():
        h, w = inputs()
        return (lambda: torch.mm(h, w.t())), []

    def make_tt(backend, env=None):
        def make():
            h, w = inputs()

            def step():
                with env_override(env):
                    de.teacher_targets(h, w, k, backend=backend)

            return step, []

        return make

    cases = [Case("gemm", make_gemm, flops=flops, notes=f"one [{N},{d}]x[{d},{V}] torch.mm ({args.dtype})")]
    backends = ["torch"]
    if not dev.startswith("cuda") and _backend.cpu_extension_has("teacher_topk_chunk"):
        backends.append("cpu")
    if dev.startswith("cuda") and _backend.triton_available():
        backends.append("triton")
    for be in backends:
        cases.append(Case(be, make_tt(be), flops=flops, notes=f"teacher_targets top-{k}"))
    if "triton" in backends:
        cases.append(Case("triton[cublas-logits]", make_tt("triton", {"DISTILL_ENGINE_TT_LOGITS": "cublas"}),
                          flops=flops, notes="cuBLAS logits buffer + candidate kernel"))
        cases.append(Case("triton[group_m=0]", make_tt("triton", {"DISTILL_ENGINE_TT_GROUP_M": "0"}),
                          flops=flops, notes="row-block-major grid (no grouping)"))
    return cases


def gemm_shape(args):
    s = _shape(args)
    return (min(s["N"], 4096), min(s["V"], 16384), s["d"])


if __name__ == "__main__":
    main(build_cases, description="teacher_targets top-k vs one GEMM of the same shape", add_args=add_args,
         baseline="gemm", gemm_shape=gemm_shape)
