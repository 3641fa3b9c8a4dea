#!/usr/bin/env bash
# One prepared GPU run (H200 machine: torch 2.11+cu130, triton 3.6, no network), from the repo root:
#
#     OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Builds the extension (with CUDA), runs the gpu-marked tests, then every benchmark section, each
# writing <name>.md (+ .json) under $OUT, and prints all tables at the end. The whole script stays
# under 8 minutes: every step runs under `timeout`, clipped to what is left of a global deadline, and
# a failing step never stops the next (set -u, no set -e).
#
# Adding a benchmark: put one `run_step` line in your section below:
#     run_step <name> <seconds> python3 benchmarks/bench_<op>.py ... --json "$OUT/<name>.json" --md "$OUT/<name>.md"
set -u

OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1

START=$(date +%s)
TOTAL_S=${GPU_CHECK_TOTAL_S:-540}      # hard budget for the whole script (the device call is given 590 s)
RESERVE_S=10                           # kept for the final summary
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0              # tests/conftest.py defaults it to 1 (CPU); on the GPU, compile for real
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
STATUS=()

left() { echo $(( START + TOTAL_S - RESERVE_S - $(date +%s) )); }

# run_step NAME BUDGET_S CMD...: run CMD under timeout min(BUDGET_S, time left); record its status.
run_step() {
    local name="$1" budget="$2"; shift 2
    local remain; remain=$(left)
    if (( remain < 5 )); then
        echo "### [$name] SKIPPED: no time left"; STATUS+=("$name: skipped (no time left)"); return 0
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
    return 0
}

# --- section: environment ---
echo "=== gpu_check $(date -u '+%Y-%m-%d %H:%M UTC') in $PWD, OUT=$OUT"
run_step nvidia-smi 15 nvidia-smi
# --- section: carried wheels (optional .whl/ dir: e.g. liger-kernel, deepspeed) ---
if compgen -G ".whl/*.whl" > /dev/null; then
    run_step wheels 40 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
else
    echo "(no .whl/ directory: nothing to install)"
fi

run_step versions 30 python3 - <<'PY'
import sys, importlib.metadata as md
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for pkg in ("triton", "transformers", "deepspeed", "liger-kernel", "cut-cross-entropy", "numpy"):
    try:
        print(pkg, md.version(pkg))
    except md.PackageNotFoundError:
        print(pkg, "not installed")
PY

# --- section: build + Triton kernel tests (in parallel: the kernel tests need no extension) ---
echo; echo "### [build] DISTILL_ENGINE_CUDA=1 python3 setup.py build_ext --inplace (background)"
BUILD_LIMIT=110
(( BUILD_LIMIT > $(left) )) && BUILD_LIMIT=$(left)
( DISTILL_ENGINE_CUDA=1 timeout --kill-after=5 "$BUILD_LIMIT" python3 setup.py -q build_ext --inplace \
    > "$OUT/build.log" 2>&1; echo $? > "$OUT/build.rc" ) &
BUILD_PID=$!
run_step test-kernels 120 python3 -m pytest -q -p no:cacheprovider -rfEs -m gpu tests/test_kernels_distill_loss.py
wait "$BUILD_PID"
BUILD_RC=$(cat "$OUT/build.rc" 2>/dev/null || echo "?")
tail -n 30 "$OUT/build.log"
if [[ "$BUILD_RC" == "0" ]]; then
    echo "### [build] ok"; STATUS+=("build: ok")
    python3 -c "import distill_engine._C as C; print('extension:', C.__file__, '| WITH_CUDA =', getattr(C, 'WITH_CUDA', None))"
else
    echo "### [build] FAILED (rc=$BUILD_RC): continuing WITHOUT the extension (cpu backend / CUDA C++ kernels unavailable)"
    STATUS+=("build: FAILED rc=$BUILD_RC (continuing without extension)")
fi

# --- section: loss ---
# naive vs torch vs triton (+ cuBLAS-logits and bigger-chunk variants, validate=False) vs Liger, N=8192 d=4096 V=128256 k=64 bf16
run_step bench_loss 100 env TRITON_PRINT_AUTOTUNING=1 python3 benchmarks/bench_loss.py --preset gpu --device cuda \
    --dtype bfloat16 --json "$OUT/bench_loss.json" --md "$OUT/bench_loss.md"

# --- section: teacher ---
# online step: teacher hidden -> de.teacher_targets -> fused loss fwd+bwd vs naive vs Liger JSD (compiled), and the
# teacher logits by cuBLAS instead of the fused tile GEMM; N=8192 d_s=2048 d_t=4096 V=128256 k=64 bf16
run_step bench_online_step 80 python3 benchmarks/bench_online_step.py --preset gpu --device cuda --dtype bfloat16 \
    --json "$OUT/bench_online_step.json" --md "$OUT/bench_online_step.md"
# --- section: projection ---
# fused_projection_loss (Triton) vs naive F.linear + loss vs chunked torch (+ Liger cosine, eager), N=16384 d_s=2048 d_t=8192 bf16
run_step bench_projection_mse 35 python3 benchmarks/bench_projection.py --preset gpu --device cuda --dtype bfloat16 \
    --kind mse --json "$OUT/bench_projection_mse.json" --md "$OUT/bench_projection_mse.md"
run_step bench_projection_cosine 40 python3 benchmarks/bench_projection.py --preset gpu --device cuda --dtype bfloat16 \
    --kind cosine --liger-eager --json "$OUT/bench_projection_cosine.json" --md "$OUT/bench_projection_cosine.md"

# --- section: relation (issue 16) ---
# fused token-relation loss (Triton, online softmax over key tiles) vs the naive [B, H, L, L] path vs chunked torch,
# L=8192, 12 relation heads, d_head 64, causal, bf16 (naive holds ~7 [12, 8192, 8192] tensors: ~10.5 GiB in bf16)
run_step bench_relation 45 python3 benchmarks/bench_relation.py --device cuda --dtype bfloat16 --L 8192 \
    --cases naive,fused --json "$OUT/bench_relation.json" --md "$OUT/bench_relation.md"

# --- section: train ---
# One GPU, end to end: the trainer's step (student to final hidden states + fused loss; teacher top-64 targets) vs a
# naive KD loop (full logits of both models, KL on log_softmax), same models/data/AdamW, V=128256, seq 1024, bf16;
# plus the cache mode (cache-teacher, then training from it) and the largest micro-batch under a 40 GiB cap.
# DeepSpeed is not installed on the GPU machine: the bench then uses the trainer's plain-PyTorch engine
# (single process, the ZeRO-0 equivalent, bf16 autocast over fp32 master weights).
run_step bench_train 90 python3 benchmarks/bench_train.py --device cuda --preset gpu \
    --json "$OUT/bench_train.json" --md "$OUT/bench_train.md"

# --- section: the rest of the gpu-marked tests (after the benchmarks: they are the lower priority) ---
# (heuristic Triton configs in tests: autotuning every ragged test shape would cost 4 compiles each)
run_step test-gpu 70 env DISTILL_ENGINE_TRITON_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -rfEs -m gpu tests \
    --ignore=tests/test_kernels_distill_loss.py

# --- section: packing ---
# packed-targets formats on CUDA (pack.cu kernels): bytes per slot, pack/unpack time, loss change; V=128256 k=64
run_step bench_packing 20 python3 benchmarks/bench_packing.py --device cuda --V 128256 --N 4096 --d 512 \
    --json "$OUT/bench_packing.json" --md "$OUT/bench_packing.md"

# --- summary ---
echo; echo "=================== summary ($(( $(date +%s) - START ))s) ==================="
for s in "${STATUS[@]}"; do echo "  $s"; done
for md in "$OUT"/*.md; do
    [[ -f "$md" ]] || continue
    echo; echo "----- $(basename "$md") -----"; cat "$md"
done
