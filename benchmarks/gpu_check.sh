#!/usr/bin/env bash
# GPU check: one prepared run on one H200 (image: torch 2.11+cu130, triton 3.6, no network), at most 5 minutes.
#
# The exact device call (the workplace's `run` tool), from the repo root:
#
#     run(command="bash benchmarks/gpu_check.sh", timeout_s=330, carry=[".whl"])
#
# * time limit: the script stops itself at GPU_CHECK_TOTAL_S (default 280 s); its step caps add up to 245 s;
#   timeout_s=330 leaves room for the machine's start, and two such runs fit one 15-minute lease.
# * untracked folders to carry: .whl/ (optional, gitignored): Python wheels for the peer rows, e.g.
#   liger_kernel-0.8.5-py3-none-any.whl (fetch with `pip download --no-deps liger-kernel==0.8.5 -d .whl`).
#   Without it the Liger rows are skipped cleanly and said so.
# * before it: `make aot-check-3.6` here (CPU): every kernel compiles for sm_90a with Triton 3.6, no spills.
#
# Output: exactly two files under $OUT (the runner returns at most 8), both appended as results are produced, so
# a run cut short returns everything before the cut:
#   $OUT/results.jsonl   one JSON line per step (name, rc, seconds) and per benchmark case (harness --jsonl)
#   $OUT/gpu_check.log   everything printed (build, tests, tables)
#
# Order: environment, build (background, capped) || Triton kernel tests, the other gpu-marked tests (CUDA
# merge/pack kernels vs the CPU backend; need the build), then the benchmarks (loss, online step, teacher
# targets, projection). Every step runs under `timeout`, clipped to what is left of the deadline; a failing step
# never stops the next (set -u, no set -e).
#
# GPU_CHECK_DRY_RUN=1: print the steps and their caps, run nothing (tests/test_gpu_check.py checks the plan).
set -u

OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
RESULTS="$OUT/results.jsonl"
DRY="${GPU_CHECK_DRY_RUN:-0}"
if [[ "$DRY" != "1" ]]; then
    exec > >(tee -a "$LOG") 2>&1
fi

START=$(date +%s)
TOTAL_S=${GPU_CHECK_TOTAL_S:-280}      # hard deadline for the whole script
RESERVE_S=5                            # kept for the summary
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0              # tests/conftest.py defaults it to 1 (CPU); on the GPU, compile for real
export PYTHONUNBUFFERED=1
export DE_BENCH_JSONL="$RESULTS"       # benchmarks/harness.py emit(): one line per measured case, as measured
NPROC=$(nproc 2>/dev/null || echo 4)
export MAX_JOBS="${MAX_JOBS:-$(( NPROC > 12 ? 12 : NPROC ))}"   # parallel build, capped
STATUS=()
CAP_SUM=0

left() { echo $(( START + TOTAL_S - RESERVE_S - $(date +%s) )); }

record() {  # record NAME RC SECONDS WHAT: one JSON line per step
    printf '{"step": "%s", "rc": %s, "seconds": %s, "status": "%s"}\n' "$1" "$2" "$3" "$4" >> "$RESULTS"
}

# run_step NAME CAP_S CMD...: run CMD under timeout min(CAP_S, time left); record its status.
run_step() {
    local name="$1" budget="$2"; shift 2
    CAP_SUM=$(( CAP_SUM + budget ))
    if [[ "$DRY" == "1" ]]; then echo "STEP $name $budget $*"; return 0; fi
    local remain; remain=$(left)
    if (( remain < 5 )); then
        echo "### [$name] SKIPPED: no time left"; STATUS+=("$name: skipped (no time left)")
        record "$name" null 0 "skipped: no time left"; return 0
    fi
    (( budget > remain )) && budget=$remain
    echo; echo "### [$name] (limit ${budget}s) $*"
    local t0=$(date +%s)
    timeout --kill-after=5 "$budget" "$@"
    local rc=$?
    local dt=$(( $(date +%s) - t0 ))
    local what="rc=$rc"; (( rc == 124 || rc == 137 )) && what="TIMEOUT after ${budget}s"
    echo "### [$name] $what (${dt}s)"
    STATUS+=("$name: $what, ${dt}s")
    record "$name" "$rc" "$dt" "$what"
    return 0
}

echo "=== gpu_check $(date -u '+%Y-%m-%d %H:%M UTC') in $PWD, OUT=$OUT, deadline ${TOTAL_S}s"

# --- environment (10 s) ---
run_step nvidia-smi 5 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
if compgen -G ".whl/*.whl" > /dev/null; then
    run_step wheels 10 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
else
    echo "(no .whl/ folder carried: the Liger peer rows are skipped)"
    [[ "$DRY" == "1" ]] || record wheels null 0 "skipped: no .whl/ folder"
fi
run_step versions 5 python3 -c "
import importlib.metadata as md, sys, torch
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda,
      '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for p in ('triton', 'liger-kernel', 'deepspeed', 'transformers'):
    try: print(p, md.version(p))
    except md.PackageNotFoundError: print(p, 'not installed')"

# --- build (background, capped) in parallel with the Triton kernel tests (they need no extension) ---
BUILD_CAP=85                 # runs beside test-kernels (same cap): counted once in the caps' sum
if [[ "$DRY" == "1" ]]; then
    echo "STEP build(background) $BUILD_CAP DISTILL_ENGINE_CUDA=1 python3 setup.py -q build_ext --inplace"
else
    (( BUILD_CAP > $(left) )) && BUILD_CAP=$(left)
    BT0=$(date +%s)
    ( DISTILL_ENGINE_CUDA=1 timeout --kill-after=5 "$BUILD_CAP" python3 setup.py -q build_ext --inplace \
        > /tmp/gpu_check_build.log 2>&1; echo $? > /tmp/gpu_check_build.rc ) &
    BUILD_PID=$!
fi
# distill loss, teacher targets, projection Triton kernels: every op and dtype, vs float64 references
# (the CUDA top-k merge kernel needs the extension: it runs in test-ext, after the build)
run_step test-kernels 85 env DISTILL_ENGINE_TRITON_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -rfEs -m gpu \
    -k "not merge_paths" tests/test_kernels_distill_loss.py tests/test_teacher_targets.py tests/test_projection_loss.py
if [[ "$DRY" != "1" ]]; then
    wait "$BUILD_PID"
    BUILD_RC=$(cat /tmp/gpu_check_build.rc 2>/dev/null || echo 1)
    echo; echo "### [build] output (last 40 lines)"; tail -n 40 /tmp/gpu_check_build.log
    if [[ "$BUILD_RC" == "0" ]]; then
        echo "### [build] ok"; STATUS+=("build: ok")
        python3 -c "import distill_engine._C as C; print('extension:', C.__file__, '| WITH_CUDA =', getattr(C, 'WITH_CUDA', None))"
    else
        echo "### [build] FAILED (rc=$BUILD_RC): continuing WITHOUT the extension"
        STATUS+=("build: FAILED rc=$BUILD_RC")
    fi
    record build "$BUILD_RC" $(( $(date +%s) - BT0 )) "$([[ $BUILD_RC == 0 ]] && echo ok || echo failed)"
fi
# the rest of the gpu-marked tests: CUDA merge/pack kernels and the loss op on CUDA, compared with the CPU backend
run_step test-ext 25 env DISTILL_ENGINE_TRITON_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -rfEs -m gpu tests \
    --ignore=tests/test_kernels_distill_loss.py --ignore=tests/test_projection_loss.py \
    -k "merge_paths or not test_teacher_targets"

# --- benchmarks (every case appended to results.jsonl as it is measured) ---
# loss: N 8192, d 4096, V 128256, k 64 bf16: naive, torch, triton, each alternative path, Liger JSD beta=0 (if carried)
run_step bench_distill_loss 45 python3 benchmarks/bench_distill_loss.py --preset gpu --device cuda --dtype bfloat16 --iters 3
# online step (teacher top-k + student loss) vs Liger's chunked JSD at the same beta (0.5), compiled as it recommends
run_step bench_online_step 35 python3 benchmarks/bench_online_step.py --preset gpu --device cuda --dtype bfloat16 \
    --iters 3
# teacher_targets top-64 vs one cuBLAS GEMM of the same shape (N 8192, d 4096, V 128256)
run_step bench_teacher_targets 20 python3 benchmarks/bench_teacher_targets.py --preset gpu --device cuda \
    --dtype bfloat16 --iters 5
# projection (Triton) vs naive and chunked torch (+ Liger cosine), N 16384, d_s 2048, d_t 8192
run_step bench_projection 15 python3 benchmarks/bench_projection.py --preset gpu --device cuda --dtype bfloat16 \
    --kind mse --iters 3
# token relations (issue 16): fused Triton online softmax over key tiles vs the materialised [B, H, L, L] path,
# L 8192, 12 relation heads, d_head 64, causal, bf16
run_step bench_relation 10 python3 benchmarks/bench_relation.py --device cuda --dtype bfloat16 --L 8192 \
    --cases naive,fused --iters 2

# --- summary ---
if [[ "$DRY" == "1" ]]; then
    echo "CAP_SUM $CAP_SUM TOTAL $TOTAL_S"
    exit 0
fi
echo; echo "=================== summary ($(( $(date +%s) - START ))s) ==================="
for s in "${STATUS[@]}"; do echo "  $s"; done
echo "results: $RESULTS ($(wc -l < "$RESULTS") lines)"
