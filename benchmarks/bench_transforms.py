"""Cost of the logit transforms (issue 12) in fused_distill_loss: forward + backward with no transform, a
folded scale and a soft-cap, per backend. CPU by default; ``--device cuda`` for the triton backend.

    python benchmarks/bench_transforms.py [--n 512 --d 512 --v 32000 --k 16 --device cpu --reps 3]
"""
import argparse
import time

import torch

from harness import VOCAB, add_jsonl_arg, emit

from distill_engine.ops.distill_loss import fused_distill_loss


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("n", 512), ("d", 512), ("v", VOCAB["llama2"]), ("k", 16), ("reps", 3)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--device", default="cpu")
    add_jsonl_arg(ap)
    a = ap.parse_args()
    rows = []
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
            rows.append(dict(case=backend, logit_scale=scale, softcap=cap, time_s=min(ts), times_s=ts, N=a.n, d=a.d,
                             V=a.v, k=a.k, device=a.device))
            emit(rows[-1], a.jsonl)
    print("\n| backend | logit_scale | softcap | fwd+bwd (best) |\n|---|---|---|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['logit_scale']} | {r['softcap']} | {r['time_s'] * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
