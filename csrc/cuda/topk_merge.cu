// Merge of per-split top-k candidates into each row's final top-k (teacher targets, method "topk").
//
// The Triton pass leaves, per row, M = n_splits·KP candidates (z value, id) and per-split (max, Σ exp).
// One warp owns one row:
//   lse   = m* + log Σ_s sum_s·exp(max_s − m*),   m* = max_s max_s   (warp shuffles over the splits);
//   top-k = k rounds of a warp arg-max. Candidates are totally ordered by (value desc, position asc);
//           each lane keeps the best of ITS strided slice among the candidates ordered after the last
//           winner, the 32 lane bests are reduced with __shfl_xor_sync (every lane ends with the winner),
//           lane 0 writes it, and only the lane that owned the winner rescans its slice. So the input is
//           never modified, and a round costs 5 shuffles plus one slice scan of M/32 elements.
// Output: ids int32 and log-probabilities z − lse, sorted best first; a slot without a real candidate
// (fewer than k real candidates) gets (-1, -inf).
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "cuda_ops.h"

namespace distill_engine {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;  // 256 threads

// a before b in the output order (value desc, position asc); position INT_MAX = "nothing".
__device__ __forceinline__ bool before(float av, int ap, float bv, int bp) {
  if (bp == INT_MAX) return ap != INT_MAX;
  if (ap == INT_MAX) return false;
  return av > bv || (av == bv && ap < bp);
}

__global__ void topk_merge_kernel(const float* __restrict__ cand_vals, const int32_t* __restrict__ cand_ids,
                                  const float* __restrict__ split_max, const float* __restrict__ split_sum,
                                  int32_t* __restrict__ out_ids, float* __restrict__ out_lp,
                                  float* __restrict__ out_lse, int64_t rows, int M, int S, int k) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x / kWarp);
  if (row >= rows) return;  // the whole warp leaves together
  const unsigned full = 0xffffffffu;

  // ---- log-sum-exp over the splits
  const float* pm = split_max + row * S;
  const float* ps = split_sum + row * S;
  float mx = -INFINITY;
  for (int s = lane; s < S; s += kWarp) mx = fmaxf(mx, pm[s]);
  for (int off = kWarp / 2; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(full, mx, off));
  float sum = 0.0f;
  for (int s = lane; s < S; s += kWarp) sum += ps[s] * expf(pm[s] - mx);
  for (int off = kWarp / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(full, sum, off);
  const float lse = mx + logf(sum);
  if (lane == 0) out_lse[row] = lse;

  // ---- k rounds of warp arg-max
  const float* v = cand_vals + row * static_cast<int64_t>(M);
  const int32_t* ids = cand_ids + row * static_cast<int64_t>(M);
  float last_v = INFINITY;  // key of the last winner; everything is "after" (+inf, -1) at the start
  int last_p = -1;
  float bv = -INFINITY;
  int bp = INT_MAX;
  auto rescan = [&]() {
    bv = -INFINITY;
    bp = INT_MAX;
    for (int p = lane; p < M; p += kWarp) {
      const float x = v[p];
      const bool after_last = x < last_v || (x == last_v && p > last_p);
      if (after_last && before(x, p, bv, bp)) {
        bv = x;
        bp = p;
      }
    }
  };
  rescan();
  int32_t* oid = out_ids + row * static_cast<int64_t>(k);
  float* olp = out_lp + row * static_cast<int64_t>(k);
  for (int r = 0; r < k; ++r) {
    float wv = bv;
    int wp = bp;
    for (int off = kWarp / 2; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(full, wv, off);
      const int op = __shfl_xor_sync(full, wp, off);
      if (before(ov, op, wv, wp)) {
        wv = ov;
        wp = op;
      }
    }
    if (lane == 0) {
      const int32_t id = (wp == INT_MAX) ? -1 : ids[wp];
      oid[r] = id;
      olp[r] = (id < 0) ? -INFINITY : wv - lse;
    }
    if (wp == INT_MAX) continue;  // no candidates left: the remaining slots are empty
    last_v = wv;
    last_p = wp;
    if (bp == wp) rescan();  // positions are unique, so exactly one lane owned the winner
  }
}

}  // namespace

void launch_topk_merge(const float* cand_vals, const int32_t* cand_ids, const float* split_max,
                       const float* split_sum, int32_t* out_ids, float* out_logprobs, float* out_lse,
                       int64_t rows, int64_t M, int64_t S, int64_t k, cudaStream_t stream) {
  if (rows <= 0) return;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  topk_merge_kernel<<<static_cast<unsigned>(blocks), kRowsPerBlock * kWarp, 0, stream>>>(
      cand_vals, cand_ids, split_max, split_sum, out_ids, out_logprobs, out_lse, rows, static_cast<int>(M),
      static_cast<int>(S), static_cast<int>(k));
}

}  // namespace cuda
}  // namespace distill_engine
