"""Benchmark: fused projection loss vs the naive projection + loss (and Liger-Kernel's cosine loss).

One forward+backward of a hidden-state matching loss through a learned projection P [d_t, d_s]:

* ``naive``:  y = F.linear(h, P, b); F.mse_loss(y, t)  or  (1 − F.cosine_similarity(y, t)).mean(); autograd
  (materialises the [N, d_t] projection and its gradient).
* ``fused``:  de.fused_projection_loss(..., backend="auto") (C++ on CPU, Triton on CUDA).
* ``fused_torch``: the same op on its chunked PyTorch backend.
* ``liger`` (cosine only, when liger-kernel is installed): LigerFusedLinearCosineSimilarityLoss with
  weight_hard_loss=0, beta=1. Its API projects the teacher input too, so the teacher side is given the
  identity as its weight: it computes one extra [N, d_t]x[d_t, d_t] product that the other cases do not.

Presets: ``--preset cpu`` (default; N=4096, d_s=1024, d_t=4096) and ``--preset gpu`` (N=16384, d_s=2048,
d_t=8192; use with ``--device cuda``, where the harness's default dtype is bfloat16). Examples::

    python benchmarks/bench_projection.py --kind mse
    python benchmarks/bench_projection.py --kind cosine --json /tmp/proj_cos.json
    python benchmarks/bench_projection.py --preset gpu --device cuda --kind cosine
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from harness import Case, add_shape_args, main, resolve_shape

# rows N, student width ds, teacher width dt
PRESETS = {"cpu": dict(N=4096, ds=1024, dt=4096), "gpu": dict(N=16384, ds=2048, dt=8192)}


def add_args(p):
    add_shape_args(p, PRESETS)
    p.add_argument("--kind", choices=["mse", "cosine"], default="mse")
    p.add_argument("--no-bias", action="store_true", help="projection without bias")
    p.add_argument("--liger-eager", action="store_true",
                   help="run Liger without torch.compile (by default it compiles on CUDA, as Liger defaults to)")


def _shape(args):
    s = resolve_shape(args, PRESETS)
    return s["N"], s["ds"], s["dt"]


def gemm_shape(args):
    N, ds, dt = _shape(args)
    return min(N, 4096), dt, ds


def build_cases(args):
    N, ds, dt = _shape(args)
    dev, dtype, kind = args.device, args.torch_dtype, args.kind
    use_bias = not args.no_bias
    # torch.compile on CPU adds minutes of compile for no gain at these sizes: compile on CUDA only
    liger_compiled = str(dev).startswith("cuda") and not args.liger_eager

    def inputs():
        g = torch.Generator(device="cpu").manual_seed(0)
        h = torch.randn(N, ds, generator=g).to(dev, dtype).requires_grad_()
        P = (torch.randn(dt, ds, generator=g) / ds**0.5).to(dev, dtype).requires_grad_()
        b = (0.1 * torch.randn(dt, generator=g)).to(dev, dtype).requires_grad_() if use_bias else None
        t = torch.randn(N, dt, generator=g).to(dev, dtype)
        return h, P, b, t, [x for x in (h, P, b) if x is not None]

    def make_naive():
        h, P, b, t, leaves = inputs()

        def step():
            y = F.linear(h, P, b)  # [N, d_t]
            if kind == "mse":
                loss = F.mse_loss(y.float(), t.float())
            else:
                loss = (1.0 - F.cosine_similarity(y.float(), t.float(), dim=-1)).mean()
            loss.backward()
        return step, leaves

    def make_fused(backend):
        def make():
            import distill_engine as de

            h, P, b, t, leaves = inputs()

            def step():
                de.fused_projection_loss(h, P, t, proj_bias=b, kind=kind, backend=backend).backward()
            return step, leaves
        return make

    def make_liger():
        from liger_kernel.chunked_loss import LigerFusedLinearCosineSimilarityLoss

        h, P, b, t, leaves = inputs()
        eye = torch.eye(dt, device=dev, dtype=dtype)
        labels = torch.zeros(N, dtype=torch.long, device=dev)
        loss_fn = LigerFusedLinearCosineSimilarityLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0,
                                                       compiled=liger_compiled)

        def step():
            loss_fn(h, P, t, eye, labels, b).backward()
        return step, leaves

    flops = 6.0 * N * ds * dt
    shape = f"N={N} d_s={ds} d_t={dt} {args.dtype} {kind}{' +bias' if use_bias else ''}"
    cases = [
        Case("naive", make_naive, flops=flops, notes=f"F.linear + autograd; {shape}"),
        Case("fused", make_fused("auto"), flops=flops, notes="de.fused_projection_loss, backend=auto"),
        Case("fused_torch", make_fused("torch"), flops=flops, notes="chunked PyTorch backend"),
    ]
    if kind == "cosine":
        try:
            import liger_kernel.chunked_loss  # noqa: F401

            cases.append(Case("liger", make_liger, flops=flops,
                              notes="LigerFusedLinearCosineSimilarityLoss (+ identity teacher GEMM, 2·N·d_t² extra "
                                    f"FLOPs), {'torch.compile' if liger_compiled else 'eager'}"))
        except Exception:  # not installed: the table simply lacks the row
            pass
    return cases


if __name__ == "__main__":
    main(build_cases, description="fused_projection_loss: forward+backward, one step", add_args=add_args,
         gemm_shape=gemm_shape)
