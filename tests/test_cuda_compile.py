"""Every csrc/cuda/*.cu compiles with this machine's nvcc for sm_90a against torch's headers.

Skipped only when nvcc is absent. The files are compiled in parallel; each kernel file includes only
<cuda_runtime.h> and csrc/cuda/cuda_ops.h; register.cu (the tensor-taking operators) adds the ATen and
torch/library.h headers in its host pass only.
"""
from __future__ import annotations

import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch
import torch.utils.cpp_extension as cpp_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def _nvcc():
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
                 "/usr/local/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


NVCC = _nvcc()


def _flags():
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    incs = [*cpp_ext.include_paths(), sysconfig.get_paths()["include"], os.path.join(ROOT, "csrc"),
            os.path.join(ROOT, "csrc", "cuda")]
    return (["-gencode=arch=compute_90a,code=sm_90a", "-c", "-std=c++17", "-O3", "--use_fast_math",
             "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DWITH_CUDA"]
            + [f"-I{p}" for p in incs])


def _compile(src: str, out_dir: str):
    out = os.path.join(out_dir, os.path.basename(src) + ".o")
    proc = subprocess.run([NVCC, *_flags(), src, "-o", out], capture_output=True, text=True, timeout=900)
    return src, proc.returncode, proc.stdout + proc.stderr, out


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_every_cuda_source_compiles(tmp_path):
    assert CUDA_SOURCES, "csrc/cuda holds no .cu files"
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(CUDA_SOURCES), os.cpu_count() or 1))) as ex:
        results = list(ex.map(lambda s: _compile(s, str(tmp_path)), CUDA_SOURCES))
    failures = [f"{os.path.relpath(src, ROOT)} (exit {rc}):\n{log[-3000:]}" for src, rc, log, _ in results if rc != 0]
    assert not failures, "nvcc failed:\n" + "\n\n".join(failures)
    for src, _, _, out in results:
        assert os.path.getsize(out) > 0, f"{src}: empty object file"


def _defs_and_impls(paths):
    """(op names given a schema with m.def, op names given a kernel with m.impl) in these C++ sources."""
    defs, impls = [], []
    for path in paths:
        with open(path) as f:
            text = f.read()
        defs += re.findall(r'm\.def\(\s*"([A-Za-z_0-9]+)\(', text)
        impls += re.findall(r'm\.impl\(\s*"([A-Za-z_0-9]+)"', text)
    return defs, impls


def test_every_cuda_op_has_a_schema_a_kernel_and_a_fake():
    """Each operator register.cu (or any .cu) defines is defined once, has a CUDA kernel and a fake."""
    defs, impls = _defs_and_impls(CUDA_SOURCES)
    assert defs, "no CUDA operator schemas found"
    assert len(defs) == len(set(defs)), f"an operator is defined twice: {sorted(defs)}"
    assert sorted(defs) == sorted(impls), f"schemas {sorted(defs)} vs CUDA kernels {sorted(impls)}"
    cpu_defs, _ = _defs_and_impls([os.path.join(ROOT, "csrc", "bindings.cpp")])
    assert not set(defs) & set(cpu_defs), "a CUDA operator shares its name with a CPU operator"
    from distill_engine import _cpp_ops
    assert set(defs) | set(cpu_defs) == set(_cpp_ops._FAKES), "every operator needs a fake in distill_engine/_cpp_ops.py"
