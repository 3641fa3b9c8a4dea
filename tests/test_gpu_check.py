"""The GPU check's shape, proven on CPU: benchmarks/gpu_check.sh's plan (dry run) and the harness's incremental
results file (a run cut short keeps every case measured before the cut)."""
import json
import os
import re
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_gpu_check_plan_fits_five_minutes(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=dict(os.environ, GPU_CHECK_DRY_RUN="1", OUT=str(out)),
                       capture_output=True, text=True, timeout=60, check=True)
    steps = [ln.split()[1:3] for ln in r.stdout.splitlines() if ln.startswith("STEP ")]
    names = [s[0] for s in steps]
    cap_sum, total = map(int, re.search(r"CAP_SUM (\d+) TOTAL (\d+)", r.stdout).groups())
    # the caps leave room under the deadline, the deadline under 5 minutes
    assert cap_sum <= 250 < total <= 290, (cap_sum, total)
    assert cap_sum == sum(int(c) for n, c in steps if n != "build(background)")
    # order: build (beside the kernel tests), the gpu-marked tests, then the benchmarks
    first_bench = min(i for i, n in enumerate(names) if n.startswith("bench_"))
    assert names.index("build(background)") < names.index("test-kernels") < names.index("test-ext") < first_bench
    assert {"bench_distill_loss", "bench_online_step", "bench_teacher_targets", "bench_projection"} <= set(names)
    # nothing written by a dry run; a real run writes exactly results.jsonl + gpu_check.log (≤ 8 files)
    assert not out.exists() or len(list(out.iterdir())) == 0
    text = open(SCRIPT).read()
    written = set(re.findall(r'\$OUT/([A-Za-z0-9_.-]+)', text))
    assert written == {"results.jsonl", "gpu_check.log"}, written
    # the header names the exact device call and the untracked folder it carries, which git ignores
    assert 'run(command="bash benchmarks/gpu_check.sh", timeout_s=330, carry=[".whl"])' in text
    assert "/.whl/" in open(os.path.join(ROOT, ".gitignore")).read().split()


def test_harness_appends_each_case_as_measured(tmp_path):
    """A run killed in its third case still leaves the first two cases in the JSONL file."""
    bench = tmp_path / "bench_fake.py"
    bench.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r})
        import torch
        from harness import Case, main

        def build(args):
            def make_ok(scale):
                def make():
                    x = torch.randn(64, 64)
                    return (lambda: (x @ x).sum() * scale), []
                return make

            def make_dies():
                os._exit(3)  # the process is killed mid-run (a time limit)

            return [Case("naive", make_ok(1.0), flops=2 * 64 ** 3), Case("fast", make_ok(2.0), flops=2 * 64 ** 3),
                    Case("dies", make_dies)]

        main(build, description="fake", gemm_shape=lambda a: (64, 64, 64))
    """))
    out = tmp_path / "results.jsonl"
    r = subprocess.run([sys.executable, str(bench), "--device", "cpu", "--no-isolate", "--iters", "2",
                        "--jsonl", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [row["case"] for row in rows] == ["naive", "fast"]
    for row in rows:
        assert row["bench"] == "bench_fake.py" and row["device"] == "cpu" and row["time_s"] > 0
        assert row["flops"] == 2 * 64 ** 3 and row["floor_fraction"] > 0


def test_harness_shared_setup_and_emit(tmp_path, monkeypatch):
    """The shared benchmark set-up: preset + overrides, env_override restores, and a benchmark outside
    harness.main (bench_transforms.py) appends one JSON line per case to $DE_BENCH_JSONL as it measures."""
    import argparse

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import harness

    presets = {"cpu": dict(N=8, d=4), "gpu": dict(N=64, d=32)}
    p = argparse.ArgumentParser()
    harness.add_shape_args(p, presets)
    args = p.parse_args(["--preset", "gpu", "--d", "5"])
    assert harness.resolve_shape(args, presets) == {"N": 64, "d": 5} and (args.N, args.d) == (64, 5)
    monkeypatch.setenv("DE_BENCH_TEST_A", "old")
    monkeypatch.delenv("DE_BENCH_TEST_B", raising=False)
    with harness.env_override({"DE_BENCH_TEST_A": "new", "DE_BENCH_TEST_B": "1"}):
        assert os.environ["DE_BENCH_TEST_A"] == "new" and os.environ["DE_BENCH_TEST_B"] == "1"
    assert os.environ["DE_BENCH_TEST_A"] == "old" and "DE_BENCH_TEST_B" not in os.environ

    out = tmp_path / "results.jsonl"
    harness.emit({"case": "x", "time_s": 1.0}, None)  # no path: nothing written
    assert not out.exists()
    env = dict(os.environ, DE_BENCH_JSONL=str(out), PYTHONPATH=ROOT)
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_transforms.py"), "--n", "8", "--d", "8",
                    "--v", "101", "--k", "4", "--reps", "1"], env=env, check=True, capture_output=True, timeout=300)
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    # 2 backends (cpu, torch) x 3 transforms (none, logit_scale, softcap), in the order measured
    assert [(r["case"], r["logit_scale"], r["softcap"]) for r in rows] == [
        (b, s, c) for b in ("cpu", "torch") for s, c in ((None, None), (0.5, None), (None, 30.0))]
    assert all(r["bench"] == "bench_transforms.py" and r["time_s"] > 0 and r["V"] == 101 for r in rows)
