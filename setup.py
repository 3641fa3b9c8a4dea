"""Build distill_engine and its C++/CUDA extension.

setup.py drives CMake (Torch located through ``torch.utils.cmake_prefix_path``,
ninja as the generator) and is the single source of truth for compiler flags.

Environment switches:
  DISTILL_ENGINE_SKIP_EXT=1    build no extension (pure Python + Triton; the torch backend is used on CPU)
  DISTILL_ENGINE_CUDA=0|1      force the CUDA sources off/on (default: on when torch has CUDA and nvcc exists)
  DISTILL_ENGINE_CUDA_ARCH     nvcc -gencode list, default "arch=compute_90a,code=sm_90a"
  DISTILL_ENGINE_NATIVE=0      do not add -march=native to the CPU kernels
  MAX_JOBS                     parallel compile jobs
A missing nvcc is a warning, never an error: the CPU kernels still build.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def cxx_flags() -> list:
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unused-function", "-Wno-sign-compare"]
    if os.environ.get("DISTILL_ENGINE_NATIVE", "1") == "1":
        flags.append("-march=native")
    return flags


def cuda_flags() -> list:
    arch = os.environ.get("DISTILL_ENGINE_CUDA_ARCH", "arch=compute_90a,code=sm_90a")
    return ["-O3", "--use_fast_math", "-lineinfo", f"-gencode={arch}", "--expt-relaxed-constexpr"]


def want_cuda() -> bool:
    forced = os.environ.get("DISTILL_ENGINE_CUDA")
    if forced is not None:
        return forced == "1"
    try:
        import torch
    except ImportError:
        return False
    if torch.version.cuda is None:
        return False
    if shutil.which("nvcc") is None and not os.path.exists(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        warnings.warn("CUDA torch found but no nvcc: building the CPU kernels only")
        return False
    return True


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch.utils

        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.join(ROOT, "build", f"cmake-py{sys.version_info.major}{sys.version_info.minor}")
        os.makedirs(build_dir, exist_ok=True)
        cuda = want_cuda()
        args = [
            "cmake", "-S", ROOT, "-B", build_dir, "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DDISTILL_ENGINE_OUTPUT_DIR={out_dir}",
            f"-DDISTILL_ENGINE_CXX_FLAGS={' '.join(cxx_flags())}",
            f"-DDISTILL_ENGINE_WITH_CUDA={'ON' if cuda else 'OFF'}",
        ]
        if cuda:
            args.append(f"-DDISTILL_ENGINE_CUDA_FLAGS={' '.join(cuda_flags())}")
            args.append("-DCMAKE_CUDA_ARCHITECTURES=OFF")
        subprocess.check_call(args)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        subprocess.check_call(["cmake", "--build", build_dir, "--", f"-j{jobs}"])


ext_modules = [] if os.environ.get("DISTILL_ENGINE_SKIP_EXT") == "1" else [CMakeExtension("distill_engine._C")]

setup(
    name="distill_engine",
    version="0.1.0",
    description="Kernel-backed white-box knowledge distillation for large language models",
    packages=find_packages(include=["distill_engine", "distill_engine.*"]),
    python_requires=">=3.10",
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    entry_points={"console_scripts": ["distill-engine=distill_engine.cli:main"]},
    zip_safe=False,
)
