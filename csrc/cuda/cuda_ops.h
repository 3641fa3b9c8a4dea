// CUDA side of distill_engine._C: launcher declarations and the registration hook.
//
// Two parts:
//  1. Launchers (always declared): plain host functions over raw device pointers and a cudaStream_t.
//     Kernel files include only this header and <cuda_runtime.h>, so they compile in seconds (no torch
//     or pybind11 headers); the Python side checks dtypes/shapes/devices and passes data_ptr() values and
//     torch.cuda.current_stream().cuda_stream (inside `with torch.cuda.device(...)`).
//  2. Registration (declared when DE_CUDA_WITH_PYBIND is defined before including this header):
//     csrc/cuda/register.cu holds the ONLY definition of distill_engine::register_cuda(m). A .cu file that
//     wants Python bindings of its own does NOT define register_cuda; it defines a function
//     `void my_bindings(pybind11::module_& m)` and, at namespace scope,
//         DE_CUDA_REGISTER(my_bindings);
//     register_cuda() calls every function registered that way (in static-initialisation order).
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

// Host-only: the device compilation pass of a .cu file never parses pybind11 (it is the bulk of the
// compile time of a bindings file).
#if defined(DE_CUDA_WITH_PYBIND) && !defined(__CUDA_ARCH__)
#include <pybind11/pybind11.h>

namespace distill_engine {
namespace cuda {
using BindingsFn = void (*)(pybind11::module_&);
// Adds fn to the list register_cuda() runs; returns true (so it can initialise a static).
bool add_cuda_bindings(BindingsFn fn);
}  // namespace cuda
}  // namespace distill_engine

#define DE_CUDA_CONCAT_INNER(a, b) a##b
#define DE_CUDA_CONCAT(a, b) DE_CUDA_CONCAT_INNER(a, b)
#define DE_CUDA_REGISTER(fn)                                                           \
  static const bool DE_CUDA_CONCAT(de_cuda_bindings_registered_, __LINE__) [[maybe_unused]] = \
      ::distill_engine::cuda::add_cuda_bindings(&(fn))
#endif
