// CPU kernel of the projection loss (the `cpu` backend of fused_projection_loss): operator
// torch.ops.distill_engine_C.projection_chunk (schema in csrc/bindings.cpp).
//
// One row chunk per call (ops/projection_loss.py drives the chunks):
//   buf = h Pᵀ                        ATen GEMM into the chunk's one fp32 [c, d_t] buffer
//   per row, one fused OpenMP pass:   y = buf + b, the loss reductions, and (when a gradient is wanted)
//                                     g = s·dL/dy written back into buf in place (no recompute)
//   dh = g P, dW += gᵀ h              ATen GEMMs on the same buffer (db += Σ g is summed in the fused pass)
//
// Per row (s = row_scale[n]):
//   mse:    L = Σ (y − t)² / d_t                       g = s·2(y − t)/d_t
//   cosine: L = 1 − ⟨y,t⟩/(||y|| ||t||)                 g = s·(cos·y/||y||² − t/(||y|| ||t||))
//           a row with ||y||² or ||t||² ≤ zero_norm_sq: L = 1, g = 0
// A non-finite teacher value is detected in the same pass through Σ t·0 (NaN exactly then).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "common.h"

namespace distill_engine {
namespace {

constexpr int64_t kMse = 0;
constexpr int64_t kCosine = 1;

// One row of the fused pass. `y` is the GEMM row (bias not yet added); it is overwritten with g
// when `grad`. Returns the row loss; sets *bad when the teacher row holds a non-finite value.
template <typename tT, bool HAS_BIAS, bool GRAD>
inline float row_pass(float* __restrict y, const tT* __restrict t, const float* __restrict b, int64_t d_t,
                      int64_t kind, float zero_norm_sq, float scale, bool* bad) {
  if (kind == kMse) {
    const float coef = 2.0f * scale / static_cast<float>(d_t);
    float ss = 0.f, chk = 0.f;
#pragma omp simd reduction(+ : ss, chk)
    for (int64_t j = 0; j < d_t; ++j) {
      const float tj = static_cast<float>(t[j]);
      const float r = (HAS_BIAS ? y[j] + b[j] : y[j]) - tj;
      ss += r * r;
      chk += tj * 0.f;
      if constexpr (GRAD) y[j] = r * coef;  // compile-time: the forward-only loop has no store
    }
    *bad = !(chk == 0.f);
    return ss / static_cast<float>(d_t);
  }
  // cosine: the three dot products first (y keeps its bias from here on when a gradient follows)
  float dot = 0.f, yy = 0.f, tt = 0.f, chk = 0.f;
#pragma omp simd reduction(+ : dot, yy, tt, chk)
  for (int64_t j = 0; j < d_t; ++j) {
    const float tj = static_cast<float>(t[j]);
    const float yj = HAS_BIAS ? y[j] + b[j] : y[j];
    if (HAS_BIAS && GRAD) y[j] = yj;
    dot += yj * tj;
    yy += yj * yj;
    tt += tj * tj;
    chk += tj * 0.f;
  }
  *bad = !(chk == 0.f);
  const bool zero = !(yy > zero_norm_sq) || !(tt > zero_norm_sq);
  const float inv_y = zero ? 0.f : 1.0f / std::sqrt(yy);
  const float inv_t = zero ? 0.f : 1.0f / std::sqrt(tt);
  const float cos = dot * inv_y * inv_t;
  if (GRAD) {
    const float alpha = scale * cos * inv_y * inv_y;
    const float beta = -scale * inv_y * inv_t;
#pragma omp simd
    for (int64_t j = 0; j < d_t; ++j) y[j] = alpha * y[j] + beta * static_cast<float>(t[j]);
  }
  return 1.0f - cos;
}

// db_part (optional) is [threads, d_t] fp32 zeros: each worker adds the g rows it formed into its own row,
// so the bias gradient needs no extra pass over the buffer.
template <typename tT>
void fused_pass(at::Tensor& buf, const at::Tensor& t, const c10::optional<at::Tensor>& bias, int64_t kind,
                float zero_norm_sq, const c10::optional<at::Tensor>& row_scale, at::Tensor& loss,
                at::Tensor& bad, float* db_part, int64_t n_part) {
  const int64_t c = buf.size(0), d_t = buf.size(1);
  float* yb = buf.data_ptr<float>();
  const tT* tb = t.data_ptr<tT>();
  const float* bb = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const float* sb = row_scale.has_value() ? row_scale->data_ptr<float>() : nullptr;
  float* lb = loss.data_ptr<float>();
  bool* badb = bad.data_ptr<bool>();
  const bool grad = sb != nullptr;
  // A row is ~d_t·12 bytes of traffic; a few rows per task keeps the scheduling cost negligible.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d_t, 1));
  at::parallel_for(0, c, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const float s = grad ? sb[i] : 0.f;
      bool row_bad = false;
      float* y = yb + i * d_t;
      const tT* tr = tb + i * d_t;
      if (bb) {
        lb[i] = grad ? row_pass<tT, true, true>(y, tr, bb, d_t, kind, zero_norm_sq, s, &row_bad)
                     : row_pass<tT, true, false>(y, tr, bb, d_t, kind, zero_norm_sq, s, &row_bad);
      } else {
        lb[i] = grad ? row_pass<tT, false, true>(y, tr, bb, d_t, kind, zero_norm_sq, s, &row_bad)
                     : row_pass<tT, false, false>(y, tr, bb, d_t, kind, zero_norm_sq, s, &row_bad);
      }
      badb[i] = row_bad;
      if (db_part != nullptr) {
        const int64_t tid = at::get_thread_num();
        TORCH_CHECK(tid >= 0 && tid < n_part, "projection_chunk: thread id outside the bias partials");
        float* acc = db_part + tid * d_t;
#pragma omp simd
        for (int64_t j = 0; j < d_t; ++j) acc[j] += y[j];  // the row is still in L1
      }
    }
  });
}

// An optional fp32 vector argument: absent, or a contiguous float32 CPU tensor of n entries.
void check_f32_vector(const c10::optional<at::Tensor>& x, const char* name, int64_t n) {
  if (!x.has_value()) return;
  TORCH_CHECK(x->device().is_cpu() && x->is_contiguous() && x->scalar_type() == at::kFloat && x->numel() == n, name,
              " must be a contiguous float32 CPU tensor of ", n, " entries, got ", x->scalar_type(), " ", x->sizes(),
              " on ", x->device());
}

// Returns (loss [c] fp32, nonfinite_teacher [c] bool). h [c, d_s] fp32, weight [d_t, d_s] fp32,
// bias [d_t] fp32, t [c, d_t] fp32/bf16/fp16, row_scale [c] fp32 (absent: forward only).
// dW_acc [d_t, d_s] and db_acc [d_t] (fp32) accumulate; dh_out [c, d_s] (any float dtype) is written.
std::tuple<at::Tensor, at::Tensor> projection_chunk(
    const at::Tensor& h, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& t,
    int64_t kind, double zero_norm_sq, const c10::optional<at::Tensor>& row_scale,
    c10::optional<at::Tensor> dW_acc, c10::optional<at::Tensor> db_acc, c10::optional<at::Tensor> dh_out) {
  DE_CHECK_CPU_INPUT(h);
  DE_CHECK_CPU_INPUT(weight);
  DE_CHECK_CPU_INPUT(t);
  DE_CHECK_DTYPE(h, at::kFloat);
  DE_CHECK_DTYPE(weight, at::kFloat);
  DE_CHECK_DIM(h, 2);
  DE_CHECK_DIM(weight, 2);
  DE_CHECK_DIM(t, 2);
  TORCH_CHECK(kind == kMse || kind == kCosine, "kind must be 0 (mse) or 1 (cosine), got ", kind);
  const int64_t c = h.size(0), d_s = h.size(1), d_t = weight.size(0);
  TORCH_CHECK(weight.size(1) == d_s, "h [c, d_s] and weight [d_t, d_s] disagree on d_s: ", h.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(t.size(0) == c && t.size(1) == d_t, "t must have shape [c, d_t] = [", c, ", ", d_t, "], got ",
              t.sizes());
  check_f32_vector(bias, "bias", d_t);
  check_f32_vector(row_scale, "row_scale", c);
  check_f32_vector(db_acc, "db_acc", d_t);
  if (dW_acc.has_value()) {
    TORCH_CHECK(dW_acc->device().is_cpu() && dW_acc->scalar_type() == at::kFloat && dW_acc->dim() == 2 &&
                    dW_acc->size(0) == d_t && dW_acc->size(1) == d_s,
                "dW_acc must be a float32 CPU tensor [d_t, d_s] = [", d_t, ", ", d_s, "], got ", dW_acc->scalar_type(),
                " ", dW_acc->sizes(), " on ", dW_acc->device());
  }
  if (dh_out.has_value()) {
    TORCH_CHECK(dh_out->device().is_cpu(), "dh_out must be a CPU tensor, got one on ", dh_out->device());
    TORCH_CHECK(dh_out->dim() == 2 && dh_out->size(0) == c && dh_out->size(1) == d_s,
                "dh_out must have shape [c, d_s] = [",
                c, ", ", d_s, "], got ", dh_out->sizes());
  }
  at::Tensor buf = at::mm(h, weight.t());  // [c, d_t] fp32: the chunk's only [c, d_t] buffer
  at::Tensor loss = at::empty({c}, h.options());
  at::Tensor bad = at::empty({c}, h.options().dtype(at::kBool));
  const float zn = static_cast<float>(zero_norm_sq);
  at::Tensor db_part;
  if (row_scale.has_value() && db_acc.has_value()) {
    db_part = at::zeros({at::get_num_threads(), d_t}, h.options());  // [threads, d_t]
  }
  float* dbp = db_part.defined() ? db_part.data_ptr<float>() : nullptr;
  const int64_t n_part = db_part.defined() ? db_part.size(0) : 0;
  switch (t.scalar_type()) {
    case at::kFloat: fused_pass<float>(buf, t, bias, kind, zn, row_scale, loss, bad, dbp, n_part); break;
    case at::kBFloat16: fused_pass<c10::BFloat16>(buf, t, bias, kind, zn, row_scale, loss, bad, dbp, n_part); break;
    case at::kHalf: fused_pass<c10::Half>(buf, t, bias, kind, zn, row_scale, loss, bad, dbp, n_part); break;
    default: TORCH_CHECK(false, "t must be float32, bfloat16 or float16");
  }
  if (row_scale.has_value()) {
    // buf now holds g = s·dL/dy
    if (dh_out.has_value()) {
      at::Tensor& dh = *dh_out;
      if (dh.scalar_type() == at::kFloat && dh.is_contiguous()) {
        at::mm_out(dh, buf, weight);
      } else {
        dh.copy_(at::mm(buf, weight));
      }
    }
    if (dW_acc.has_value()) dW_acc->addmm_(buf.t(), h);
    if (dbp != nullptr) {
      float* db = db_acc->data_ptr<float>();
      for (int64_t k = 0; k < n_part; ++k) {
        const float* part = dbp + k * d_t;
#pragma omp simd
        for (int64_t j = 0; j < d_t; ++j) db[j] += part[j];
      }
    }
  }
  return {loss, bad};
}

}  // namespace

TORCH_LIBRARY_IMPL(distill_engine_C, CPU, m) { m.impl("projection_chunk", &projection_chunk); }

}  // namespace distill_engine
