"""Benchmark: fused token-relation loss (MiniLM v2 attention relations) vs the naive materialised path.

One forward+backward of token_relation_loss on student and teacher states [B, L, heads·d_head]:

* ``naive``: scores S_h S_hᵀ/√d and T_h T_hᵀ/√d materialised as [B, heads, L, L], masked log-softmaxes,
  KL, autograd (``reference.token_relation.naive_token_relation_loss``).
* ``fused``: de.token_relation_loss(..., backend="auto") (C++ on CPU, Triton on CUDA): online softmax over
  key tiles, backward recomputed from the row log-sum-exps; no [L, L] tensor.
* ``fused_torch``: the same op on its chunked PyTorch backend ([heads, chunk, L] strips).

``--naive-memory-only`` prints the naive path's analytic memory at the given L without running it (for
L = 8192 the naive path holds several [heads, L, L] fp32 tensors: 3 GiB each at 12 heads, ~21 GiB in all).

    python benchmarks/bench_relation.py                      # L=2048, 12 heads, d_head 64, causal, fp32, CPU
    python benchmarks/bench_relation.py --L 8192 --cases fused
    python benchmarks/bench_relation.py --L 8192 --naive-memory-only
    python benchmarks/bench_relation.py --device cuda --L 8192   # GPU (bf16 by the harness default)
"""
from __future__ import annotations

import sys

import torch

from harness import Case, fmt_bytes, main

# [B, H, L, L] fp32 tensors alive at the naive path's peak: 7, measured (1,356 MiB peak extra at L=2048,
# 12 heads, where one such tensor is 192 MiB): scores, masked scores, log-softmaxes, P, the KL product.
NAIVE_LL_TENSORS = 7


def add_args(p):
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--L", type=int, default=2048)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--d-head", type=int, default=64)
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--naive-memory-only", action="store_true",
                   help="print the naive path's analytic [B, H, L, L] memory and exit")


def gemm_shape(args):
    return args.L, args.L, args.d_head


def naive_bytes(B, H, L, elem=4) -> int:
    return NAIVE_LL_TENSORS * B * H * L * L * elem


def build_cases(args):
    B, L, H, dh = args.B, args.L, args.heads, args.d_head
    d = H * dh
    dev, dtype, causal = args.device, args.torch_dtype, not args.no_causal

    def inputs():
        g = torch.Generator(device="cpu").manual_seed(0)
        S = torch.randn(B, L, d, generator=g)
        T = 0.7 * S + 0.5 * torch.randn(B, L, d, generator=g)
        S = S.to(dev, dtype).requires_grad_()
        return S, T.to(dev, dtype)

    def make_naive():
        from distill_engine.reference.token_relation import naive_token_relation_loss

        S, T = inputs()

        def step():
            loss = naive_token_relation_loss(S, T, relation_heads=H, causal=causal)
            loss.backward()
            return loss.detach()
        return step, [S]

    def make_fused(backend):
        def make():
            import distill_engine as de

            S, T = inputs()

            def step():
                loss = de.token_relation_loss(S, T, relation_heads=H, causal=causal, backend=backend)
                loss.backward()
                return loss.detach()
            return step, [S]
        return make

    # forward: 2 score GEMMs; backward: 2 recomputed + 2 gradient GEMMs per side (student only): 2·B·H·L²·dh each
    flops = 2.0 * B * H * L * L * dh * 6 * (0.5 if causal else 1.0)
    shape = f"B={B} L={L} heads={H} d_head={dh} {args.dtype}{' causal' if causal else ''}"
    return [
        Case("naive", make_naive, flops=flops, notes=f"materialised [B, H, L, L]; {shape}"),
        Case("fused", make_fused("auto"), flops=flops, notes="de.token_relation_loss, backend=auto"),
        Case("fused_torch", make_fused("torch"), flops=flops, notes="chunked PyTorch backend"),
    ]


if __name__ == "__main__":
    if "--naive-memory-only" in sys.argv:
        import argparse

        p = argparse.ArgumentParser()
        add_args(p)
        a, _ = p.parse_known_args()
        nb = naive_bytes(a.B, a.heads, a.L)
        print(f"naive token-relation path at B={a.B} L={a.L} heads={a.heads}: {NAIVE_LL_TENSORS} fp32 "
              f"[B, H, L, L] tensors of {fmt_bytes(nb // NAIVE_LL_TENSORS)} each = {fmt_bytes(nb)} (analytic)")
        sys.exit(0)
    main(build_cases, description="token_relation_loss: forward+backward, one step", add_args=add_args,
         gemm_shape=gemm_shape)
