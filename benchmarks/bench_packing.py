"""Benchmark: bytes per (token, slot) of each packed-targets format and the loss change it introduces.

For each vocabulary size, a synthetic teacher (random lm_head, hidden states scaled so the teacher's
entropy is a few nats, as for a trained LM) gives top-k and sampled targets; a student close to the
teacher gives a loss that is small (the hard case for a relative bound). Each format packs and unpacks
the targets; the table reports bytes per (token, slot) of the whole buffer (header included), pack and
unpack time, the max |Δ log p| over non-empty slots, and the relative change of ``fused_distill_loss``:
forward KL / tail="bucket" and JSD / "bucket" for top-k, forward KL / "renormalize" for sampled targets.

    python benchmarks/bench_packing.py                     # V = 32,000 and 128,256, k = 64
    python benchmarks/bench_packing.py --device cuda --md $OUT/packing.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from harness import VOCAB, add_jsonl_arg, atomic_write, emit, machine_info, sync

import distill_engine as de
from distill_engine.ops.packing import LOGPROB_DTYPES, id_bits_for
from distill_engine.trainer.config import TeacherConfig

# every log-prob format of the library, with int32 ids, then with bit-packed ids
FORMATS = [(fmt, bitpack) for bitpack in (False, True) for fmt in LOGPROB_DTYPES]


def _timed(fn, device, reps=5):
    out = fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def run(V, N, d, k, device, scale, seed=0, jsonl=None):
    g = torch.Generator().manual_seed(seed)
    h_t = (torch.randn(N, d, generator=g) * scale).to(device)
    w_t = (torch.randn(V, d, generator=g) / d ** 0.5).to(device)
    h_s = (h_t + 0.5 * torch.randn(N, d, generator=g).to(device))
    w_s = (w_t + 0.1 * torch.randn(V, d, generator=g).to(device) / d ** 0.5)
    rows = []
    # the loss value is what matters here, not its speed: the torch backend on CPU, triton on CUDA
    lb = "auto" if str(device).startswith("cuda") else "torch"
    for method in ("topk", "sample"):
        gen = torch.Generator(device=device).manual_seed(1) if method == "sample" else None
        t = de.teacher_targets(h_t, w_t, k, method=method, generator=gen)
        if method == "topk":
            mass = t.logprobs.double().exp().sum(1).mean().item()
        losses = [("forward_kl", "bucket"), ("jsd", "bucket")] if method == "topk" else [("forward_kl", "renormalize")]
        base = {lt: de.fused_distill_loss(h_s, w_s, t.ids, t.logprobs, divergence=lt[0], tail=lt[1], backend=lb).item()
                for lt in losses}
        for fmt, bp in FORMATS:
            p, t_pack = _timed(lambda: de.pack_targets(t, fmt, bitpack_ids=bp), device)
            u, t_unpack = _timed(lambda: de.unpack_targets(p), device)
            assert torch.equal(u.ids.cpu(), t.ids.cpu())
            slot = t.ids >= 0
            dlp = (u.logprobs - t.logprobs).abs()[slot].max().item()
            rel = {}
            for lt in losses:
                got = de.fused_distill_loss(h_s, w_s, u.ids, u.logprobs, divergence=lt[0], tail=lt[1], backend=lb).item()
                rel[lt] = abs(got - base[lt]) / abs(base[lt])
            ids_fmt = f"{id_bits_for(V)}-bit ids" if bp else "int32 ids"
            rows.append(dict(V=V, N=N, k=k, method=method, format=f"{fmt} + {ids_fmt}",
                             bytes_per_slot=p.bytes_per_slot, bytes_per_token=p.nbytes / N, pack_ms=t_pack * 1e3,
                             unpack_ms=t_unpack * 1e3, max_dlogp=dlp,
                             loss_rel={f"{a}/{b}": v for (a, b), v in rel.items()},
                             base_loss={f"{a}/{b}": v for (a, b), v in base.items()}))
            emit(dict(rows[-1], case=f"{method} {rows[-1]['format']}", device=str(device)), jsonl)
    return rows, mass


def table(rows):
    lines = ["| V | targets | format | bytes/slot | bytes/token | pack | unpack | max abs Δlog p | rel. loss change |",
             "|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        rel = ", ".join(f"{k_}: {v:.1e}" for k_, v in r["loss_rel"].items())
        lines.append(f"| {r['V']:,} | {r['method']} k={r['k']} | {r['format']} | {r['bytes_per_slot']:.3f} | "
                     f"{r['bytes_per_token']:.1f} | {r['pack_ms']:.2f} ms | {r['unpack_ms']:.2f} ms | {r['max_dlogp']:.1e} | {rel} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--V", type=int, nargs="+", default=[VOCAB["llama2"], VOCAB["llama3"]])
    p.add_argument("--N", type=int, default=512)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--k", type=int, default=TeacherConfig.k)
    p.add_argument("--scale", type=float, default=5.0, help="teacher hidden-state scale (sets its entropy)")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    add_jsonl_arg(p)
    args = p.parse_args()
    rows, notes = [], []
    for V in args.V:
        r, mass = run(V, args.N, args.d, args.k, args.device, args.scale, jsonl=args.jsonl)
        rows += r
        notes.append(f"V={V:,}: mean top-{args.k} teacher mass {mass:.3f}; base losses {r[0]['base_loss']} (top-k), "
                     f"{[x for x in r if x['method'] == 'sample'][0]['base_loss']} (sample)")
    info = machine_info(args.device)
    info["command"] = " ".join(["python"] + sys.argv)
    head = (f"Packed teacher targets: size and loss change per format\n\nmachine: {info.get('gpu', info['cpu'])}, "
            f"torch {info['torch']}; date: {info['date']}\ncommand: `{info['command']}`\n" + "\n".join(notes) + "\n")
    text = head + "\n" + table(rows)
    print(text)
    if args.json:
        atomic_write(args.json, json.dumps({"machine": info, "rows": rows}, indent=2, default=str))
    if args.md:
        atomic_write(args.md, text + "\n")


if __name__ == "__main__":
    main()
