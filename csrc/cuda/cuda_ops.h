// CUDA side of distill_engine._C: the kernel launchers.
//
// Launchers are plain host functions over raw device pointers and a cudaStream_t.  Kernel files include
// only this header and <cuda_runtime.h>, so they compile in seconds (no torch headers).  The operators
// Python calls are in csrc/cuda/register.cu: tensor-taking torch.ops.distill_engine_C.tt_* registered for
// the CUDA dispatch key, which check their arguments with TORCH_CHECK, allocate the outputs and call these
// launchers on the current stream of the tensors' device.  A new .cu file adds its operators there, or in
// its own TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL(distill_engine_C, CUDA, m) blocks (host pass only).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace distill_engine {
namespace cuda {

// ---- teacher targets: merge of per-split top-k candidates (csrc/cuda/topk_merge.cu) ----------------
// cand_vals/cand_ids [rows, M] (fp32 z = logit/T, int32 id; -inf/-1 = empty), split_max/split_sum
// [rows, S] (per-split max of z and Σ exp(z − max)). Writes the k best per row, sorted by value
// descending (index ascending on ties): out_ids [rows, k] int32, out_logprobs [rows, k] fp32 (z − lse),
// out_lse [rows] fp32 (lse = log Σ_s split_sum·exp(split_max)). One warp per row.
void launch_topk_merge(const float* cand_vals, const int32_t* cand_ids, const float* split_max,
                       const float* split_sum, int32_t* out_ids, float* out_logprobs, float* out_lse,
                       int64_t rows, int64_t M, int64_t S, int64_t k, cudaStream_t stream);

// ---- packing (csrc/cuda/pack.cu); the byte layout is documented in distill_engine/ops/packing.py ----
// ids [n] int32 (-1 = empty) → little-endian bit stream of `bits` bits per id (code V = empty) as
// n_words uint32 words (n_words = ceil(n·bits/32); every word is written).
void launch_pack_id_bits(const int32_t* ids, int64_t n, int bits, int32_t vocab, uint32_t* words,
                         int64_t n_words, cudaStream_t stream);
// Inverse; ids with a code > V are written as -1 and counted in *bad (device int32, caller zeroes it).
void launch_unpack_id_bits(const uint32_t* words, int64_t n_words, int64_t n, int bits, int32_t vocab,
                           int32_t* ids, int32_t* bad, cudaStream_t stream);
// Per-row uint8 quantization of log-probabilities (one warp per row): x = max(lp, floor) over non-empty
// slots, offset = fp16 rounded up of max x, scale = fp16 rounded up of (offset − min x)/254,
// code = rint((offset − x)/scale) in [0, 254] (0 when scale = 0), 255 for an empty slot (id < 0).
void launch_quantize_u8(const float* logprobs, const int32_t* ids, int64_t rows, int64_t k, float floor,
                        uint8_t* codes, uint16_t* offset_h, uint16_t* scale_h, cudaStream_t stream);
// lp = offset − code·scale (fp32), -inf for code 255.
void launch_dequantize_u8(const uint8_t* codes, const uint16_t* offset_h, const uint16_t* scale_h,
                          int64_t rows, int64_t k, float* logprobs, cudaStream_t stream);

}  // namespace cuda
}  // namespace distill_engine
