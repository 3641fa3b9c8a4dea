"""Shared benchmark harness: every bench_<op>.py builds on it.

How a benchmark script uses it::

    from harness import Case, main

    def build_cases(args):            # args: the parsed argparse namespace
        def make_naive():
            ...build inputs on args.device...
            def step():               # one forward+backward (or whatever is timed)
                ...
            return step, leaves       # leaves: tensors whose .grad the step fills (may be [])
        return [Case("naive", make_naive, flops=6 * N * V * d, notes="...")]

    if __name__ == "__main__":
        main(build_cases, description="...", add_args=lambda p: p.add_argument("--N", type=int, default=2048))

``main`` adds the common flags (``--device``, ``--dtype``, ``--iters``, ``--warmup``, ``--json``, ``--md``,
``--cases``) and runs every case side by side in one run:

* time: median over ``--iters`` timed steps after ``--warmup`` untimed ones, with device synchronisation;
* peak extra memory, beyond the inputs and their gradients:
  - CUDA: ``torch.cuda.max_memory_allocated`` during a step minus what was allocated before it
    (gradients already exist from the warm-up step, so they are part of the baseline);
  - CPU: each case runs in its own subprocess with glibc told to ``mmap`` every large block
    (``MALLOC_MMAP_THRESHOLD_``) so freed memory leaves the resident set; the peak resident set of one
    step (``VmHWM`` after resetting it through ``/proc/self/clear_refs``) minus the resident set before it;
* fraction of the floor: the case's FLOPs over the GEMM rate measured in the same run on the same
  device and dtype (``gemm_rate``), divided by the measured time;
* optional sanity check: when ``step()`` returns a scalar (e.g. the loss), the first warm-up value is
  recorded (``value``) and its relative difference to the baseline case's value is added to the notes.

Results print as a markdown table (last, so a truncated log still ends with it) and, with ``--json``,
are written atomically together with the machine description. With ``--jsonl FILE`` (or ``$DE_BENCH_JSONL``)
every case is also appended to FILE as one JSON line the moment it is measured (:func:`emit`), so a run that
is cut short (a time limit) still returns every case before the cut. The benchmarks that do not run through
``main`` (bench_train, bench_onpolicy, bench_packing, bench_transforms) take the same flag
(:func:`add_jsonl_arg`) and call :func:`emit` per measured row as well.

Shared set-up for every benchmark: importing this module makes the checkout's ``distill_engine`` importable
(the script's own folder, ``benchmarks/``, is on ``sys.path`` already); :func:`add_shape_args` /
:func:`resolve_shape` give the ``--preset`` + per-dimension overrides; :func:`env_override` sets the
library's tuning variables for one call; :data:`VOCAB` names the vocabulary sizes of the target models.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # a checkout without `pip install -e .`: the package sits next to benchmarks/
    sys.path.insert(0, _ROOT)

from distill_engine.data.io import atomic_write_bytes  # noqa: E402

# Vocabulary sizes of the target models the presets are built on (Llama-2/Mistral, Llama-3).
VOCAB = {"llama2": 32000, "llama3": 128256}
JSONL_ENV = "DE_BENCH_JSONL"  # default of --jsonl: where every benchmark appends its JSON lines

_MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


@dataclasses.dataclass
class Case:
    name: str
    make: Callable  # () -> (step, leaves)
    flops: Optional[float] = None
    notes: str = ""


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def gemm_rate(device: str, dtype: torch.dtype, m: int = 2048, n: int = 2048, k: int = 2048, iters: int = 5) -> float:
    """FLOP/s of one [m,k]x[k,n] product measured now (random data, best of ``iters``)."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    if str(device).startswith("cuda"):
        for _ in range(3):
            a @ b
        times = []
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a @ b
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
    else:
        a @ b
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    # best of the runs: the rate the hardware sustains, robust to a busy machine (the floor is a ceiling)
    return 2.0 * m * n * k / min(times)


def _zero_grads(leaves) -> None:
    for t in leaves:
        if t.grad is not None:
            t.grad.zero_()


def measure_case(case: Case, device: str, warmup: int, iters: int) -> dict:
    """Run one case in this process; returns time (s) and peak extra memory (bytes)."""
    gc.collect()
    step, leaves = case.make()
    is_cuda = str(device).startswith("cuda")
    value = None
    for i in range(max(1, warmup)):  # at least one: gradients then exist before the memory baseline
        out = step()
        if i == 0 and out is not None:  # a step may return its result (e.g. the loss) for a sanity check
            try:
                value = float(out)
            except (TypeError, ValueError, RuntimeError):
                value = None
        _zero_grads(leaves)
    sync(device)
    gc.collect()
    if is_cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync(device)
        peak_extra = torch.cuda.max_memory_allocated() - base
    else:
        ok = _reset_peak_rss()
        base = _rss_bytes("VmRSS")
        step()
        peak_extra = (_rss_bytes("VmHWM") - base) if ok else float("nan")
    _zero_grads(leaves)
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
        _zero_grads(leaves)
    res = {"time_s": statistics.median(times), "times_s": times, "peak_extra_bytes": peak_extra}
    if value is not None:
        res["value"] = value
    return res


def machine_info(device: str) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        pass
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def atomic_write(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def append_jsonl(path: str, record: dict) -> None:
    """Append one JSON line and flush it to disk (a single write of a whole line: readers never see half)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    line = json.dumps(record, default=str) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def add_jsonl_arg(p: argparse.ArgumentParser) -> None:
    """``--jsonl PATH`` (default ``$DE_BENCH_JSONL``): where :func:`emit` appends one line per measured case."""
    p.add_argument("--jsonl", default=os.environ.get(JSONL_ENV),
                   help=f"append one JSON line per measured case to this file as soon as it is measured (default: "
                        f"${JSONL_ENV}), so a run cut short keeps every case measured before the cut")


def emit(record: dict, path: Optional[str]) -> None:
    """Append ``record`` (plus ``bench``: the script's name) to the JSONL file ``path``; nothing when None."""
    if path:
        append_jsonl(path, dict(record, bench=record.get("bench") or os.path.basename(sys.argv[0])))


def add_shape_args(p: argparse.ArgumentParser, presets: Dict[str, dict], default: Optional[str] = "cpu") -> None:
    """``--preset`` (one of ``presets``) and one ``--<dim>`` override per dimension of the presets."""
    p.add_argument("--preset", choices=sorted(presets), default=default,
                   help="shape preset (explicit dimensions override it)")
    for name in next(iter(presets.values())):
        p.add_argument(f"--{name}", type=int, default=None, help=f"{name} (overrides the preset)")


def resolve_shape(args, presets: Dict[str, dict], default: str = "cpu") -> dict:
    """The preset's dimensions with the explicit overrides applied; also set on ``args`` (``args.N`` ...)."""
    shape = dict(presets[args.preset or default])
    for name in shape:
        if getattr(args, name, None) is not None:
            shape[name] = getattr(args, name)
        setattr(args, name, shape[name])
    return shape


@contextlib.contextmanager
def env_override(env: Optional[Dict[str, str]]):
    """Set the environment variables ``env`` (the library's tuning switches) for the block, then restore."""
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def fmt_bytes(b) -> str:
    if b is None or b != b:
        return "n/a"
    return f"{b / 2**20:,.1f} MiB"


def markdown_table(rows: List[dict], baseline: Optional[str] = None) -> str:
    base = next((r for r in rows if r["case"] == baseline and "time_s" in r), None)
    head = "| case | fwd+bwd time | vs " + (baseline or "-") + " | peak extra memory | vs " + (baseline or "-") + " | % of GEMM floor | notes |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | error | | | | | {' '.join(r['error'].split())[:160].replace('|', '/')} |")
            continue
        t = r["time_s"]
        rel_t = f"{t / base['time_s']:.2f}x" if base else ""
        mem = r["peak_extra_bytes"]
        rel_m = f"{100 * mem / base['peak_extra_bytes']:.1f}%" if base and base["peak_extra_bytes"] else ""
        floor = f"{100 * r['floor_fraction']:.0f}%" if r.get("floor_fraction") else ""
        lines.append(f"| {r['case']} | {t * 1e3:,.1f} ms | {rel_t} | {fmt_bytes(mem)} | {rel_m} | {floor} | {r.get('notes', '')} |")
    return "\n".join(lines)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _parse_args(description: str, add_args: Optional[Callable]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--json", default=None, help="write results + machine info here (atomic)")
    p.add_argument("--md", default=None, help="write the markdown table here (atomic)")
    add_jsonl_arg(p)
    p.add_argument("--cases", default=None, help="comma-separated subset of case names")
    p.add_argument("--no-isolate", action="store_true", help="CPU: run cases in this process (memory numbers then unreliable)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    if add_args is not None:
        add_args(p)
    args = p.parse_args()
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    args.torch_dtype = _dtype(args.dtype)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
    return args


def _run_case(case: Case, args, isolate: bool) -> dict:
    """One case's measurement: in a fresh child process (CPU memory numbers) or here; errors are rows too."""
    if isolate:
        argv = [sys.executable] + sys.argv + ["--_child", case.name]
        env = dict(os.environ, **_MMAP_ENV)
        proc = subprocess.run(argv, capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@")), None)
        if line is None:
            return {"error": f"child exited {proc.returncode}: {proc.stderr.strip()[-300:]}"}
        return json.loads(line[len("@@RESULT@@"):])
    try:
        res = measure_case(case, args.device, args.warmup, args.iters)
    except Exception as exc:  # reported in the table, never hidden
        res = {"error": f"{type(exc).__name__}: {exc}"}
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return res


def _compare_values(rows: List[dict], baseline: str) -> None:
    """Sanity check across cases: steps that return a scalar (the loss) are compared with the baseline's."""
    base_row = next((r for r in rows if r["case"] == baseline and "value" in r), None)
    if base_row is None:
        return
    for r in rows:
        if "value" in r and r is not base_row:
            rel = abs(r["value"] - base_row["value"]) / max(abs(base_row["value"]), 1e-30)
            r["value_rel_diff"] = rel
            r["notes"] = (r.get("notes") or "") + f"; value vs {baseline}: {rel:.1e}"


def main(build_cases: Callable, description: str = "", add_args: Optional[Callable] = None, baseline: str = "naive",
         gemm_shape: Optional[Callable] = None) -> List[dict]:
    """Parse the common flags, run every case side by side, print and optionally save the table.

    ``gemm_shape(args) -> (m, n, k)`` picks the shape at which the GEMM rate is measured (default 2048³).
    """
    args = _parse_args(description, add_args)
    cases = build_cases(args)
    if args.cases:
        keep = set(args.cases.split(","))
        cases = [c for c in cases if c.name in keep]

    if args._child is not None:  # child mode: one case, one JSON line on stdout
        case = next(c for c in cases if c.name == args._child)
        print("@@RESULT@@" + json.dumps(_run_case(case, args, isolate=False)))
        return []

    isolate = args.device == "cpu" and not args.no_isolate
    m, n, k = gemm_shape(args) if gemm_shape else (2048, 2048, 2048)
    rate = gemm_rate(args.device, args.torch_dtype, m, n, k)
    rows = []
    for case in cases:
        print(f"[bench] {case.name} ...", file=sys.stderr, flush=True)
        res = _run_case(case, args, isolate)
        res["case"] = case.name
        res["notes"] = case.notes
        if case.flops and "time_s" in res:
            res["flops"] = case.flops
            res["floor_fraction"] = case.flops / rate / res["time_s"]
        rows.append(res)
        print(f"[bench] {case.name}: {res.get('time_s', res.get('error'))}", file=sys.stderr, flush=True)
        emit(dict(res, device=args.device, dtype=args.dtype, gemm_rate_flops=rate, gemm_shape=[m, n, k]), args.jsonl)
    _compare_values(rows, baseline)

    info = machine_info(args.device)
    info["gemm_rate_flops"] = rate
    info["gemm_shape"] = [m, n, k]
    info["command"] = " ".join([os.path.basename(sys.executable)] + sys.argv)
    table = markdown_table(rows, baseline)
    header = (f"{description}\n\nmachine: {info.get('gpu', info['cpu'])}, {info['threads']} threads, torch {info['torch']}"
              f"{', triton ' + info['triton'] if 'triton' in info else ''}; date: {info['date']}; "
              f"GEMM rate measured in this run ({args.dtype}, {m}x{n}x{k}): {rate / 1e12:.3f} TFLOP/s\n"
              f"command: `{info['command']}`\n")
    print(header)
    print(table)
    if args.json:
        atomic_write(args.json, json.dumps({"machine": info, "args": {k_: v for k_, v in vars(args).items() if k_ != "torch_dtype"},
                                            "rows": rows}, indent=2, default=str))
    if args.md:
        atomic_write(args.md, header + "\n" + table + "\n")
    return rows
