// Packing kernels for teacher targets (byte layout: distill_engine/ops/packing.py).
//
//  * id bit-packing: one thread per output 32-bit word gathers the (at most ceil(32/bits)+1) ids that
//    overlap the word's 32 stream bits, so no atomics are needed; unpacking is one thread per id reading
//    the one or two words that hold its bits.
//  * uint8 log-probabilities: one warp per row; the row's min/max over non-empty slots come from warp
//    shuffles, then each lane encodes its slots. Every float operation uses an explicitly rounded
//    intrinsic (__fsub_rn, __fdiv_rn, __fmul_rn, rintf, __float2half_ru) so the bytes equal those of the
//    PyTorch implementation even under --use_fast_math (no contraction into FMAs, no approximate divide).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_ops.h"

namespace distill_engine {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

__global__ void pack_id_bits_kernel(const int32_t* __restrict__ ids, int64_t n, int bits, int32_t vocab,
                                    uint32_t* __restrict__ words, int64_t n_words) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (w >= n_words) return;
  const int64_t bit0 = w * 32;
  const int64_t first = bit0 / bits;
  int64_t last = (bit0 + 31) / bits;
  if (last > n - 1) last = n - 1;
  uint64_t acc = 0;
  for (int64_t i = first; i <= last; ++i) {
    const int32_t id = ids[i];
    const uint64_t code = static_cast<uint64_t>(id < 0 ? vocab : id);
    const int64_t s = i * bits - bit0;  // may be negative: the id started in the previous word
    if (s >= 0)
      acc |= code << s;
    else
      acc |= code >> (-s);
  }
  words[w] = static_cast<uint32_t>(acc & 0xffffffffull);
}

__global__ void unpack_id_bits_kernel(const uint32_t* __restrict__ words, int64_t n_words, int64_t n, int bits,
                                      int32_t vocab, int32_t* __restrict__ ids, int32_t* __restrict__ bad) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t s = i * bits;
  const int64_t w = s >> 5;
  const int off = static_cast<int>(s & 31);
  uint64_t v = words[w];
  if (off + bits > 32 && w + 1 < n_words) v |= static_cast<uint64_t>(words[w + 1]) << 32;
  const uint64_t mask = (bits >= 64) ? ~0ull : ((1ull << bits) - 1ull);
  const uint64_t code = (v >> off) & mask;
  if (code == static_cast<uint64_t>(vocab)) {
    ids[i] = -1;
  } else if (code > static_cast<uint64_t>(vocab)) {
    ids[i] = -1;
    atomicAdd(bad, 1);
  } else {
    ids[i] = static_cast<int32_t>(code);
  }
}

__device__ __forceinline__ uint16_t half_bits(__half h) { return __half_as_ushort(h); }

__global__ void quantize_u8_kernel(const float* __restrict__ lp, const int32_t* __restrict__ ids, int64_t rows,
                                   int k, float floor_v, uint8_t* __restrict__ codes, uint16_t* __restrict__ off_h,
                                   uint16_t* __restrict__ scale_h) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / kWarp) + threadIdx.x / kWarp;
  if (row >= rows) return;
  const unsigned full = 0xffffffffu;
  const float* x = lp + row * k;
  const int32_t* id = ids + row * k;
  float hi = -INFINITY, lo = INFINITY;
  for (int j = lane; j < k; j += kWarp) {
    if (id[j] >= 0) {
      const float v = fmaxf(x[j], floor_v);  // -inf (and anything below the floor) → floor
      hi = fmaxf(hi, v);
      lo = fminf(lo, v);
    }
  }
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    hi = fmaxf(hi, __shfl_xor_sync(full, hi, o));
    lo = fminf(lo, __shfl_xor_sync(full, lo, o));
  }
  if (hi == -INFINITY) {  // no non-empty slot
    hi = 0.0f;
    lo = 0.0f;
  }
  const __half off = __float2half_ru(hi);
  const float offf = __half2float(off);
  const __half sc = __float2half_ru(__fdiv_rn(__fsub_rn(offf, lo), 254.0f));
  const float scf = __half2float(sc);
  if (lane == 0) {
    off_h[row] = half_bits(off);
    scale_h[row] = half_bits(sc);
  }
  uint8_t* c = codes + row * k;
  for (int j = lane; j < k; j += kWarp) {
    uint8_t code = 255;
    if (id[j] >= 0) {
      const float v = fmaxf(x[j], floor_v);
      float q = 0.0f;
      if (scf > 0.0f) q = rintf(__fdiv_rn(__fsub_rn(offf, v), scf));
      q = fminf(fmaxf(q, 0.0f), 254.0f);
      code = static_cast<uint8_t>(q);
    }
    c[j] = code;
  }
}

__global__ void dequantize_u8_kernel(const uint8_t* __restrict__ codes, const uint16_t* __restrict__ off_h,
                                     const uint16_t* __restrict__ scale_h, int64_t rows, int64_t k,
                                     float* __restrict__ lp) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * k) return;
  const int64_t row = i / k;
  const uint8_t code = codes[i];
  if (code == 255) {
    lp[i] = -INFINITY;
    return;
  }
  const float off = __half2float(__ushort_as_half(off_h[row]));
  const float sc = __half2float(__ushort_as_half(scale_h[row]));
  lp[i] = __fsub_rn(off, __fmul_rn(static_cast<float>(code), sc));
}

inline unsigned blocks_for(int64_t n, int per_block) {
  return static_cast<unsigned>((n + per_block - 1) / per_block);
}

}  // namespace

void launch_pack_id_bits(const int32_t* ids, int64_t n, int bits, int32_t vocab, uint32_t* words,
                         int64_t n_words, cudaStream_t stream) {
  if (n_words <= 0) return;
  pack_id_bits_kernel<<<blocks_for(n_words, kThreads), kThreads, 0, stream>>>(ids, n, bits, vocab, words, n_words);
}

void launch_unpack_id_bits(const uint32_t* words, int64_t n_words, int64_t n, int bits, int32_t vocab,
                           int32_t* ids, int32_t* bad, cudaStream_t stream) {
  if (n <= 0) return;
  unpack_id_bits_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(words, n_words, n, bits, vocab, ids, bad);
}

void launch_quantize_u8(const float* logprobs, const int32_t* ids, int64_t rows, int64_t k, float floor,
                        uint8_t* codes, uint16_t* offset_h, uint16_t* scale_h, cudaStream_t stream) {
  if (rows <= 0) return;
  quantize_u8_kernel<<<blocks_for(rows, kThreads / kWarp), kThreads, 0, stream>>>(
      logprobs, ids, rows, static_cast<int>(k), floor, codes, offset_h, scale_h);
}

void launch_dequantize_u8(const uint8_t* codes, const uint16_t* offset_h, const uint16_t* scale_h, int64_t rows,
                          int64_t k, float* logprobs, cudaStream_t stream) {
  if (rows * k <= 0) return;
  dequantize_u8_kernel<<<blocks_for(rows * k, kThreads), kThreads, 0, stream>>>(codes, offset_h, scale_h, rows, k,
                                                                                 logprobs);
}

}  // namespace cuda
}  // namespace distill_engine
