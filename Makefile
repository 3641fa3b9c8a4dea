# Two commands for a newcomer: `make demo` and `make test`. Both create .venv, install and build first.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Keep CI's 2 cores busy but not oversubscribed.
export MAX_JOBS ?= 2
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export DS_ACCELERATOR ?= cpu

.PHONY: venv build test test-fast demo bench clean aot-check aot-check-3.6

$(STAMP): requirements.txt requirements-bench.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip setuptools wheel
	# torch is pinned to the CPU build that lies on this machine's disk; never a multi-GB CUDA wheel here.
	$(VPY) -m pip install -q -r requirements.txt
	# DeepSpeed builds against the torch above, so no build isolation.
	$(VPY) -m pip install -q --no-build-isolation deepspeed==0.19.8
	# Benchmark peers: installed for benchmarks only, never imported by the library.
	$(VPY) -m pip install -q --no-deps -r requirements-bench.txt
	touch $@

venv: $(STAMP)

build: $(STAMP)
	$(VPY) setup.py -q build_ext --inplace
	DISTILL_ENGINE_SKIP_EXT=1 $(VPY) -m pip install -q --no-build-isolation --no-deps -e .

test: build
	$(VPY) -m pytest -q -ra --durations=30 tests

demo: build
	$(VENV)/bin/distill-engine demo

bench: build
	$(VPY) benchmarks/bench_distill_loss.py

# Ahead-of-time sm_90a compile + register/spill check of every Triton kernel (no GPU needed; also part of `make test`
# through tests/test_aot_compile.py). Results are cached per kernel source in .aot_cache/.
aot-check: $(STAMP)
	PYTHONPATH=$(CURDIR) TRITON_INTERPRET=0 $(VPY) -m distill_engine.kernels._aot

# The same check against Triton 3.6, the version on the GPU image: its own venv (CPU torch from the pin above,
# for the kernel modules' imports). Run it before each GPU run and whenever a kernel changes.
VENV36 := .venv-triton36
$(VENV36)/.installed-stamp:
	test -x $(VENV36)/bin/python || $(PY) -m venv $(VENV36)
	$(VENV36)/bin/python -m pip install -q "triton==3.6.*" "$$(grep -E '^torch==' requirements.txt)" numpy
	touch $@

aot-check-3.6: $(VENV36)/.installed-stamp
	PYTHONPATH=$(CURDIR) TRITON_INTERPRET=0 $(VENV36)/bin/python -m distill_engine.kernels._aot

clean:
	rm -rf build distill_engine/_C*.so *.egg-info
