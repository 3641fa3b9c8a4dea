// Teacher targets on CPU tensors: top-k or sampled ids with full-vocabulary log-probabilities, one row
// chunk at a time (see distill_engine/ops/teacher_targets.py for the driver and docs/ARCHITECTURE.md).
//
// Per chunk of c rows:
//   1. one ATen GEMM writes the raw logits l = h Wᵀ into the caller's fp32 [c_max, V] buffer
//      (bf16/fp16 weights are cast to fp32 one vocabulary tile at a time: fp32 accumulation without an
//      fp32 copy of the whole weight);
//   2. an OpenMP loop over rows makes, per row, one pass z = (l + b)·inv_t with the running max, one
//      vectorized pass Σ exp(z − max) (lse = max + log Σ; exp and the sum from csrc/cpu/math.h), and then
//      - topk:   a partial selection: a min-heap of the k best (value, index) pairs, scanned in blocks of
//                16 whose maximum is first compared with the heap's worst, so a block below the current
//                k-th value costs one vector max (the common case once the heap holds large values);
//      - sample: the inverse-CDF walk: e_v = exp(z_v − max) in place, a float64 running sum, and the
//                row's k sorted uniforms consumed in order (draw j = first v with u_j·Σe < Σ_{w≤v} e_w;
//                draws the rounding leaves past the end go to the last index with e_v > 0).
// Nothing of size [N, V] exists; the buffer is reused across chunks by the caller.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <tuple>
#include <vector>

#include "common.h"
#include "cpu/math.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace distill_engine {
namespace {

constexpr int64_t kWeightTile = 2048;  // vocabulary rows of a half-precision weight cast to fp32 at a time
constexpr int64_t kScanBlock = 16;     // top-k scan block (one vector max per block)

// Validated inputs → raw logits (no bias, no temperature) in buf[:c]. Returns the [c, V] view.
at::Tensor chunk_logits(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& buf) {
  const int64_t c = h.size(0), V = weight.size(0);
  at::Tensor z = buf.narrow(0, 0, c);
  if (weight.scalar_type() == at::kFloat) {
    at::mm_out(z, h, weight.t());
  } else {
    at::Tensor h32 = h.to(at::kFloat);
    for (int64_t v0 = 0; v0 < V; v0 += kWeightTile) {
      const int64_t n = std::min(kWeightTile, V - v0);
      at::Tensor zt = z.narrow(1, v0, n);
      at::mm_out(zt, h32, weight.narrow(0, v0, n).to(at::kFloat).t());
    }
  }
  return z;
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  const at::Tensor& buf) {
  DE_CHECK_CPU_INPUT(hidden);
  DE_CHECK_CPU_INPUT(weight);
  DE_CHECK_CPU_INPUT(buf);
  DE_CHECK_DIM(hidden, 2);
  DE_CHECK_DIM(weight, 2);
  DE_CHECK_DIM(buf, 2);
  DE_CHECK_DTYPE(buf, at::kFloat);
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "hidden must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(dt == weight.scalar_type(), "hidden and weight must share a dtype, got ", dt, " and ",
              weight.scalar_type());
  TORCH_CHECK(hidden.size(1) == weight.size(1), "hidden [c, d] and weight [V, d] disagree on d: ", hidden.sizes(),
              " and ", weight.sizes());
  TORCH_CHECK(buf.size(0) >= hidden.size(0) && buf.size(1) == weight.size(0), "buf must be fp32 [>= ",
              hidden.size(0), ", ", weight.size(0), "], got ", buf.sizes());
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.device().is_cpu() && b.is_contiguous(), "bias must be a contiguous CPU tensor");
    TORCH_CHECK(b.dim() == 1 && b.size(0) == weight.size(0), "bias must have shape [", weight.size(0), "], got ",
                b.sizes());
  }
}

// Row pass 1: z = (z + b)·inv_t in place; returns the row max.
static inline float scale_and_max(float* zr, const float* b, float inv_t, int64_t V) {
  float m = -std::numeric_limits<float>::infinity();
  if (b != nullptr) {
#pragma omp simd reduction(max : m)
    for (int64_t v = 0; v < V; ++v) {
      const float x = (zr[v] + b[v]) * inv_t;
      zr[v] = x;
      m = std::max(m, x);
    }
  } else {
#pragma omp simd reduction(max : m)
    for (int64_t v = 0; v < V; ++v) {
      const float x = zr[v] * inv_t;
      zr[v] = x;
      m = std::max(m, x);
    }
  }
  return m;
}

// (value, index) order of the output: larger value first, smaller index first on a tie.
struct Better {
  bool operator()(const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) const {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> teacher_topk_chunk(const at::Tensor& h, const at::Tensor& weight,
                                                                   const c10::optional<at::Tensor>& bias, int64_t k,
                                                                   double inv_t, const at::Tensor& buf) {
  check_inputs(h, weight, bias, buf);
  const int64_t c = h.size(0), V = weight.size(0);
  TORCH_CHECK(k >= 1 && k <= V, "k must lie in [1, V = ", V, "], got ", k);
  at::Tensor z = chunk_logits(h, weight, buf);
  at::Tensor b32;
  if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous();
  at::Tensor ids = at::empty({c, k}, h.options().dtype(at::kInt));
  at::Tensor lps = at::empty({c, k}, h.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({c}, h.options().dtype(at::kFloat));
  float* zp = z.data_ptr<float>();
  const int64_t ld = z.stride(0);
  const float* bp = bias.has_value() ? b32.data_ptr<float>() : nullptr;
  int32_t* idp = ids.data_ptr<int32_t>();
  float* lpp = lps.data_ptr<float>();
  float* lsep = lse.data_ptr<float>();
  const float it = static_cast<float>(inv_t);
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<std::pair<float, int32_t>> heap;
    heap.reserve(k);
    Better better;
#pragma omp for schedule(dynamic, 4)
    for (int64_t r = 0; r < c; ++r) {
      float* zr = zp + r * ld;
      const float m = scale_and_max(zr, bp, it, V);
      const double s = sum_exp(zr, V, 1.0f, m);  // Σ exp(z − m)
      const float row_lse = static_cast<float>(static_cast<double>(m) + std::log(s));
      lsep[r] = row_lse;
      // heap of the k best seen so far; front() is the worst of them
      heap.clear();
      for (int64_t v = 0; v < k; ++v) heap.emplace_back(zr[v], static_cast<int32_t>(v));
      std::make_heap(heap.begin(), heap.end(), better);
      float thresh = heap.front().first;
      int64_t v = k;
      for (; v + kScanBlock <= V; v += kScanBlock) {
        float bm = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : bm)
        for (int64_t e = 0; e < kScanBlock; ++e) bm = std::max(bm, zr[v + e]);
        if (!(bm > thresh)) continue;
        for (int64_t e = 0; e < kScanBlock; ++e) {
          const float x = zr[v + e];
          if (x > thresh) {
            std::pop_heap(heap.begin(), heap.end(), better);
            heap.back() = {x, static_cast<int32_t>(v + e)};
            std::push_heap(heap.begin(), heap.end(), better);
            thresh = heap.front().first;
          }
        }
      }
      for (; v < V; ++v) {
        const float x = zr[v];
        if (x > thresh) {
          std::pop_heap(heap.begin(), heap.end(), better);
          heap.back() = {x, static_cast<int32_t>(v)};
          std::push_heap(heap.begin(), heap.end(), better);
          thresh = heap.front().first;
        }
      }
      std::sort_heap(heap.begin(), heap.end(), better);  // best first
      for (int64_t j = 0; j < k; ++j) {
        idp[r * k + j] = heap[j].second;
        lpp[r * k + j] = heap[j].first - row_lse;
      }
    }
  }
  return {ids, lps, lse};
}

std::tuple<at::Tensor, at::Tensor> teacher_sample_chunk(const at::Tensor& h, const at::Tensor& weight,
                                                         const c10::optional<at::Tensor>& bias, double inv_t,
                                                         const at::Tensor& u, const at::Tensor& buf) {
  check_inputs(h, weight, bias, buf);
  DE_CHECK_CPU_INPUT(u);
  DE_CHECK_DTYPE(u, at::kDouble);
  TORCH_CHECK(u.dim() == 2 && u.size(0) == h.size(0), "u must be float64 [c, k] with c = ", h.size(0), ", got ",
              u.sizes());
  const int64_t c = h.size(0), V = weight.size(0), k = u.size(1);
  at::Tensor z = chunk_logits(h, weight, buf);
  at::Tensor b32;
  if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous();
  at::Tensor draws = at::empty({c, k}, h.options().dtype(at::kLong));
  at::Tensor lse = at::empty({c}, h.options().dtype(at::kFloat));
  float* zp = z.data_ptr<float>();
  const int64_t ld = z.stride(0);
  const float* bp = bias.has_value() ? b32.data_ptr<float>() : nullptr;
  const double* up = u.data_ptr<double>();
  int64_t* dp = draws.data_ptr<int64_t>();
  float* lsep = lse.data_ptr<float>();
  const float it = static_cast<float>(inv_t);
#pragma omp parallel for schedule(dynamic, 4) num_threads(at::get_num_threads())
  for (int64_t r = 0; r < c; ++r) {
    float* zr = zp + r * ld;
    const float m = scale_and_max(zr, bp, it, V);
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) zr[v] = fast_expf(zr[v] - m);
    double total = 0.0;
    for (int64_t v = 0; v < V; ++v) total += zr[v];
    lsep[r] = static_cast<float>(static_cast<double>(m) + std::log(total));
    const double* ur = up + r * k;
    int64_t* dr = dp + r * k;
    int64_t j = 0, last_nz = -1;
    double cum = 0.0;
    for (int64_t v = 0; v < V && j < k; ++v) {
      const float e = zr[v];
      if (e > 0.0f) last_nz = v;
      cum += e;
      while (j < k && ur[j] * total < cum) dr[j++] = v;
    }
    if (j < k && last_nz < 0) {  // only reachable for a row whose total mass is not finite
      for (int64_t v = 0; v < V; ++v)
        if (zr[v] > 0.0f) last_nz = v;
    }
    for (; j < k; ++j) dr[j] = last_nz;
  }
  return {draws, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(distill_engine_C, CPU, m) {
  m.impl("teacher_topk_chunk", &teacher_topk_chunk);
  m.impl("teacher_sample_chunk", &teacher_sample_chunk);
}

}  // namespace distill_engine
