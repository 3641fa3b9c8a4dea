"""Cost of the logit transforms (issue 12) in fused_distill_loss: forward + backward with no transform, a
folded scale and a soft-cap, per backend. CPU by default; ``--device cuda`` for the triton backend.

    python benchmarks/bench_transforms.py [--n 512 --d 512 --v 32000 --k 16 --device cpu --reps 3]
"""
import argparse
import time

import torch

from distill_engine.ops.distill_loss import fused_distill_loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device(a.device)
    h = torch.randn(a.n, a.d, device=dev) * 0.5  # [N, d]
    w = torch.randn(a.v, a.d, device=dev) * 0.05  # [V, d]
    lp, ids = torch.log_softmax(torch.randn(a.n, a.v, device=dev), 1).topk(a.k, 1)  # [N, k]
    ids = ids.int()
    backends = ("cpu", "torch") if dev.type == "cpu" else ("triton", "torch")
    for backend in backends:
        for scale, cap in ((None, None), (0.5, None), (None, 30.0)):
            ts = []
            for _ in range(a.reps):
                hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                fused_distill_loss(hh, ww, ids, lp, backend=backend, logit_scale=scale, softcap=cap,
                                   validate=False).backward()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                ts.append(time.perf_counter() - t)
            print(f"{backend:6s} logit_scale={scale} softcap={cap}: {min(ts) * 1e3:.0f} ms fwd+bwd (best of {a.reps})")


if __name__ == "__main__":
    main()
