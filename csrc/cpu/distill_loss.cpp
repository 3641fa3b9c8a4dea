// CPU kernels of the core op fused_distill_loss: the two vocabulary-wide passes of the `cpu` backend.
//
// Math (see docs/ARCHITECTURE.md, "The core op").  For a row chunk h [c, d] of hidden states and the
// lm_head weight W [V, d] (bias b [V] optional):
//
//   l      = h Wᵀ + b                       raw logits, fp32 [c, V]   (the one chunk buffer)
//   lse_T  = log Σ_v exp(l_v / T)           per row, fp32 [c]
//   lse_1  = log Σ_v exp(l_v)               per row, only when the CE term needs it (ce_weight > 0)
//
//   g      = s_q · exp(l/T − lse_T) + s_1 · exp(l − lse_1)        (= dLoss/dl minus the sparse part)
//   dH     = g W                  [c, d]    returned
//   dW    += gᵀ h                 [V, d]    accumulated into the caller's fp32 buffer
//   db    += Σ_rows g             [V]       accumulated into the caller's fp32 buffer
//
// How it is computed:
// * Both functions walk the vocabulary in column tiles (see tile_cols: one tile for an fp32 weight;
//   tiles bounding the fp32 temporary when the weight must be upcast).
// * The GEMMs are ATen's (MKL sgemm on this build) in fp32, written/read straight through strided
//   [c, tile] views of the buffer (leading dimension V, no copies; transposes folded into the call).
//   bf16/fp16 inputs are upcast: h once per call, W one tile at a time (so a low-precision weight
//   never needs a full fp32 copy; an fp32 copy handed in by the caller is used as is).
// * distill_logits_lse: per tile, the GEMM, then ONE pass per row (OpenMP over rows) that adds the bias
//   and folds the tile into the row's running log-sum-exp state for BOTH temperatures.  Inside a tile
//   the row is walked in L1-sized blocks: block max, then the block's exponential sums (block-wise
//   online log-sum-exp: a larger running max rescales the running sums once per block, so each element
//   costs exactly one exp per sum and is read once).  Per-block sums are fp32, running sums double.
//   With z = l·(1/T): lse_T = m_T + log Σ exp(fma(l, 1/T, −m_T)), m_T = max(l)·(1/T) — the same fused
//   form the gradient pass uses, so Σ_v exp(l_v/T − lse_T) = 1 up to rounding.  T = 1 needs one sum.
// * distill_dense_grad: per tile, a pass per row forms g in place (one or two exps per element; one
//   when T = 1 and lse_1 == lse_T) and adds it into a per-thread column-sum row for db (reduced after
//   the tile, no atomics); then the two gradient GEMMs on the tile: dW[tile] += g_tileᵀ h and
//   dH += g_tile W[tile].
// * exp: fast_expf from csrc/cpu/math.h (a branch-free polynomial exp the compiler vectorizes inside
//   `#pragma omp simd` loops; its accuracy is stated and tested there).
#include "common.h"
#include "cpu/math.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace distill_engine {
namespace {

// Block of a row processed at once by the log-sum-exp pass: 8 KB, stays in L1 between its two sweeps.
constexpr int64_t kLseBlock = 2048;
// Below this many elements a pass runs on one thread (thread start-up would dominate).
constexpr int64_t kParallelGrain = 1 << 15;

inline int num_threads_for(int64_t work) { return work >= kParallelGrain ? at::get_num_threads() : 1; }

// Running log-sum-exp state of one row (see file top): max m of the logits seen so far, m_t = m·(1/T),
// sum_t = Σ exp(l·(1/T) − m_t), sum_1 = Σ exp(l − m).
struct LseState {
  float m = kNegInf;
  float m_t = kNegInf;
  double sum_t = 0.0;
  double sum_1 = 0.0;
};

// Adds bias to the row segment x [n] in place and folds it into the row's running state, one
// L1-sized block at a time: block max, rescale of the running sums if the max grew, then the sums.
void lse_update(LseState& st, float* __restrict x0, const float* __restrict bias0, int64_t n_total, float inv_t,
                bool two_sums) {
  for (int64_t v0 = 0; v0 < n_total; v0 += kLseBlock) {
    const int64_t n = std::min(kLseBlock, n_total - v0);
    float* __restrict x = x0 + v0;
    float bm = kNegInf;
    if (bias0 != nullptr) {
      const float* __restrict b = bias0 + v0;
#pragma omp simd reduction(max : bm)
      for (int64_t i = 0; i < n; ++i) {
        const float y = x[i] + b[i];
        x[i] = y;
        bm = y > bm ? y : bm;
      }
    } else {
      bm = row_max(x, n);
    }
    if (bm > st.m) {
      const float new_m_t = bm * inv_t;
      if (st.m != kNegInf) {  // rescale the running sums to the new shift
        st.sum_t *= std::exp(static_cast<double>(st.m_t) - static_cast<double>(new_m_t));
        st.sum_1 *= std::exp(static_cast<double>(st.m) - static_cast<double>(bm));
      }
      st.m = bm;
      st.m_t = new_m_t;
    }
    if (st.m == kNegInf) continue;  // every logit so far is -inf: nothing to add
    const float neg_m_t = -st.m_t;
    if (two_sums) {
      const float neg_m = -st.m;
      float a_t = 0.0f, a_1 = 0.0f;
#pragma omp simd reduction(+ : a_t, a_1)
      for (int64_t i = 0; i < n; ++i) {
        a_t += fast_expf(std::fma(x[i], inv_t, neg_m_t));
        a_1 += fast_expf(x[i] + neg_m);
      }
      st.sum_t += a_t;
      st.sum_1 += a_1;
    } else {
      float a_t = 0.0f;
#pragma omp simd reduction(+ : a_t)
      for (int64_t i = 0; i < n; ++i) a_t += fast_expf(std::fma(x[i], inv_t, neg_m_t));
      st.sum_t += a_t;
    }
  }
}

void lse_finish(const LseState& st, bool t_is_one, bool need1, float* out_t, float* out_1) {
  if (std::isinf(st.m)) {  // all -inf (or an empty row): -inf;  a +inf logit: +inf
    *out_t = st.m;
    if (need1) *out_1 = st.m;
    return;
  }
  *out_t = static_cast<float>(static_cast<double>(st.m_t) + std::log(st.sum_t));
  if (need1) *out_1 = t_is_one ? *out_t : static_cast<float>(static_cast<double>(st.m) + std::log(st.sum_1));
}

// Width of the vocabulary tiles the chunk is walked in.  An fp32 contiguous weight is used in ONE tile:
// on this 2-core machine narrower tiles were slower (c = 512, d = 512, V = 32000, 2 threads: 2048-wide
// tiles 1.7x, 16384-wide 1.04x the single tile; with 1 thread all within noise), the extra GEMM calls
// and thread barriers costing more than the cache reuse gains.  A weight that must be upcast (bf16,
// fp16, strided) is converted one tile at a time, tiles sized so the fp32 temporary stays ≤ 64 MB.
int64_t tile_cols(int64_t V, int64_t d, bool upcast_weight) {
  int64_t w = V;
  if (upcast_weight) w = std::max<int64_t>(1024, (int64_t{1} << 24) / std::max<int64_t>(d, 1));
  // Tuning/testing override (the tests use it to walk small vocabularies in several tiles).
  if (const char* e = std::getenv("DISTILL_ENGINE_CPU_TILE_COLS")) w = std::max<int64_t>(64, std::atoll(e));
  return std::max<int64_t>(1, std::min(w, V));
}

bool needs_upcast(const at::Tensor& t) { return t.scalar_type() != at::kFloat || !t.is_contiguous(); }

void check_float_input(const at::Tensor& t, const char* name) {
  DE_CHECK_CPU(t);
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, name,
              " must be float32, bfloat16 or float16, got ", dt);
}

void check_f32_vec(const at::Tensor& t, const char* name, int64_t n) {
  DE_CHECK_CPU_INPUT(t);
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape [", n, "], got ", t.sizes());
}

// fp32 contiguous view of a float tensor (a copy only when needed).
at::Tensor as_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

void check_temperature(double temperature) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, "temperature must be a finite positive number, got ",
              temperature);
}

// Folds the row segment x [n] (columns v0 .. v0+n) into the running state with the row's excluded ids
// (ex [m], < 0 = none) left out: their raw values are saved, set to -inf for lse_update (bias added to -inf
// stays -inf) and written back with the bias added, exactly what lse_update would have stored.  All values are
// saved before any is overwritten, so a repeated id restores its true value.
void lse_update_excluding(LseState& st, float* __restrict x, const float* __restrict bias, int64_t v0, int64_t n,
                          float inv_t, bool two_sums, const int64_t* ex, int64_t m, float* saved) {
  for (int64_t j = 0; j < m; ++j) {
    const int64_t col = ex[j] - v0;
    saved[j] = (ex[j] >= 0 && col >= 0 && col < n) ? x[col] : 0.0f;
  }
  for (int64_t j = 0; j < m; ++j) {
    const int64_t col = ex[j] - v0;
    if (ex[j] >= 0 && col >= 0 && col < n) x[col] = kNegInf;
  }
  lse_update(st, x, bias, n, inv_t, two_sums);
  for (int64_t j = 0; j < m; ++j) {
    const int64_t col = ex[j] - v0;
    if (ex[j] >= 0 && col >= 0 && col < n) x[col] = saved[j] + (bias != nullptr ? bias[col] : 0.0f);
  }
}

// ---------------------------------------------------------------------------------------------------
// distill_logits_lse(h [c,d], weight [V,d], bias [V]?, T, need_lse1, exclude_ids [c,m]?) ->
//   (buf [c,V], lse_T [c], lse_1 [c] | [0]).  With exclude_ids (int64, < 0 = no id) both log-sum-exps leave
//   those columns out (the student's rest mass, issue 15) in the same single pass; buf holds every logit.
std::tuple<at::Tensor, at::Tensor, at::Tensor> distill_logits_lse(const at::Tensor& h, const at::Tensor& weight,
                                                                   const c10::optional<at::Tensor>& bias,
                                                                   double temperature, bool need_lse1,
                                                                   const c10::optional<at::Tensor>& exclude_ids) {
  at::NoGradGuard no_grad;
  check_float_input(h, "h");
  check_float_input(weight, "weight");
  DE_CHECK_DIM(h, 2);
  DE_CHECK_DIM(weight, 2);
  TORCH_CHECK(h.size(1) == weight.size(1), "h [c, d] and weight [V, d] must share d, got ", h.sizes(), " and ",
              weight.sizes());
  check_temperature(temperature);
  const int64_t c = h.size(0);
  const int64_t V = weight.size(0);
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    check_float_input(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == V, "bias must have shape [", V, "], got ", bias->sizes());
    bias_f = as_f32(*bias);
  }
  const auto f32 = h.options().dtype(at::kFloat);
  at::Tensor buf = at::empty({c, V}, f32);
  at::Tensor lse_t = at::empty({c}, f32);
  at::Tensor lse_1 = at::empty({need_lse1 ? c : 0}, f32);
  if (c == 0) return {buf, lse_t, lse_1};
  const at::Tensor h_f = as_f32(h);
  float* pbuf = buf.data_ptr<float>();
  const float* pb = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  const float inv_t = static_cast<float>(1.0 / temperature);
  const bool t_is_one = temperature == 1.0;
  const bool two_sums = need_lse1 && !t_is_one;
  std::vector<LseState> state(c);
  at::Tensor ex;
  int64_t m = 0;
  if (exclude_ids.has_value() && exclude_ids->defined()) {
    ex = exclude_ids->to(at::kLong).contiguous();
    TORCH_CHECK(ex.dim() == 2 && ex.size(0) == c, "exclude_ids must have shape [c, m] with c = ", c, ", got ",
                ex.sizes());
    TORCH_CHECK(ex.numel() == 0 || ex.max().item<int64_t>() < V, "exclude_ids must lie below V = ", V);
    m = ex.size(1);
  }
  const int64_t* pex = m > 0 ? ex.data_ptr<int64_t>() : nullptr;
  std::vector<float> saved(static_cast<size_t>(c) * std::max<int64_t>(m, 1));
  const int64_t tv = tile_cols(V, h.size(1), needs_upcast(weight));
  for (int64_t v0 = 0; v0 < V; v0 += tv) {
    const int64_t n = std::min(tv, V - v0);
    // buf[:, v0:v0+n] = h [c, d] @ W[v0:v0+n]ᵀ [d, n]: sgemm straight into the strided tile (ldc = V),
    // the transpose folded into the call.
    at::Tensor tile = buf.narrow(1, v0, n);
    at::mm_out(tile, h_f, as_f32(weight.narrow(0, v0, n)).t());
#pragma omp parallel for schedule(static) num_threads(num_threads_for(c* n))
    for (int64_t r = 0; r < c; ++r) {
      if (pex != nullptr) {
        lse_update_excluding(state[r], pbuf + r * V + v0, pb != nullptr ? pb + v0 : nullptr, v0, n, inv_t, two_sums,
                             pex + r * m, m, saved.data() + r * m);
      } else {
        lse_update(state[r], pbuf + r * V + v0, pb != nullptr ? pb + v0 : nullptr, n, inv_t, two_sums);
      }
    }
  }
  float* plt = lse_t.data_ptr<float>();
  float* pl1 = need_lse1 ? lse_1.data_ptr<float>() : nullptr;
  for (int64_t r = 0; r < c; ++r) lse_finish(state[r], t_is_one, need_lse1, plt + r, need_lse1 ? pl1 + r : nullptr);
  return {buf, lse_t, lse_1};
}

// buf [c, V] and dW_acc [V, d]: contiguous fp32 CPU tensors the gradient pass writes; lse_T fp32 [c].
void check_grad_buffers(const at::Tensor& buf, const at::Tensor& dW_acc, const at::Tensor& lse_t, int64_t c,
                        int64_t d, int64_t V) {
  DE_CHECK_CPU_INPUT(buf);
  TORCH_CHECK(buf.scalar_type() == at::kFloat, "buf must be float32, got ", buf.scalar_type());
  TORCH_CHECK(buf.dim() == 2 && buf.size(0) == c && buf.size(1) == V, "buf must have shape [", c, ", ", V,
              "], got ", buf.sizes());
  DE_CHECK_CPU_INPUT(dW_acc);
  TORCH_CHECK(dW_acc.scalar_type() == at::kFloat, "dW_acc must be float32, got ", dW_acc.scalar_type());
  TORCH_CHECK(dW_acc.dim() == 2 && dW_acc.size(0) == V && dW_acc.size(1) == d, "dW_acc must have shape [", V, ", ",
              d, "], got ", dW_acc.sizes());
  check_f32_vec(lse_t, "lse_T", c);
}

// A per-row coefficient vector [c] of any float dtype, as fp32 contiguous.
at::Tensor row_scale_f32(const at::Tensor& t, const char* name, int64_t c) {
  check_float_input(t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == c, name, " must have shape [", c, "], got ", t.sizes());
  return as_f32(t);
}

// One row of the gradient pass over g [n] (the logits on entry): g = s·exp(l/T − lse_T), plus
// s_1·exp(l − lse_1) when TWO; added into the thread's column sums acc [n] when ACC.  Compile-time
// variants so each loop vectorizes without branches.
template <bool TWO, bool ACC>
inline void grad_row(float* __restrict g, float* __restrict acc, int64_t n, float inv_t, float s, float neg_lt,
                     float s1, float neg_l1) {
#pragma omp simd
  for (int64_t v = 0; v < n; ++v) {
    const float x = g[v];
    float y;
    if constexpr (TWO) {
      y = s * fast_expf(std::fma(x, inv_t, neg_lt)) + s1 * fast_expf(x + neg_l1);
    } else {
      y = s * fast_expf(std::fma(x, inv_t, neg_lt));
    }
    g[v] = y;
    if constexpr (ACC) acc[v] += y;
  }
}

// ---------------------------------------------------------------------------------------------------
// distill_dense_grad: g in place in buf, dW_acc += gᵀ h, db_acc += Σ_rows g; returns dH = g W [c, d] fp32.
at::Tensor distill_dense_grad(at::Tensor& buf, const at::Tensor& h, const at::Tensor& weight, double temperature,
                              const at::Tensor& lse_t, const c10::optional<at::Tensor>& lse_1,
                              const at::Tensor& s_q, const c10::optional<at::Tensor>& s_1, at::Tensor& dW_acc,
                              const c10::optional<at::Tensor>& db_acc,
                              const c10::optional<at::Tensor>& sparse_ids,
                              const c10::optional<at::Tensor>& sparse_coef) {
  at::NoGradGuard no_grad;
  check_float_input(h, "h");
  check_float_input(weight, "weight");
  DE_CHECK_DIM(h, 2);
  DE_CHECK_DIM(weight, 2);
  check_temperature(temperature);
  const int64_t c = h.size(0);
  const int64_t d = h.size(1);
  const int64_t V = weight.size(0);
  TORCH_CHECK(weight.size(1) == d, "h [c, d] and weight [V, d] must share d, got ", h.sizes(), " and ",
              weight.sizes());
  check_grad_buffers(buf, dW_acc, lse_t, c, d, V);
  const bool has_ce = s_1.has_value() && s_1->defined();
  TORCH_CHECK(!has_ce || (lse_1.has_value() && lse_1->defined()), "s_1 given without lse_1");
  if (has_ce) check_f32_vec(*lse_1, "lse_1", c);
  const at::Tensor s_q_f = row_scale_f32(s_q, "s_q", c);
  const at::Tensor s_1_f = has_ce ? row_scale_f32(*s_1, "s_1", c) : at::Tensor();
  const bool has_db = db_acc.has_value() && db_acc->defined();
  if (has_db) check_f32_vec(*db_acc, "db_acc", V);

  // Sparse part of dL/dl (teacher ids and the CE label): added to g before the GEMMs, duplicates accumulate.
  const bool has_sp = sparse_ids.has_value() && sparse_ids->defined();
  TORCH_CHECK(has_sp == (sparse_coef.has_value() && sparse_coef->defined()),
              "sparse_ids and sparse_coef must be given together");
  at::Tensor sp_ids, sp_coef;
  int64_t n_sp = 0;
  if (has_sp) {
    sp_ids = sparse_ids->to(at::kLong).contiguous();
    sp_coef = as_f32(*sparse_coef);
    TORCH_CHECK(sp_ids.dim() == 2 && sp_ids.size(0) == c && sp_coef.sizes() == sp_ids.sizes(),
                "sparse_ids and sparse_coef must both have shape [c, m] with c = ", c);
    n_sp = sp_ids.size(1);
    TORCH_CHECK(sp_ids.numel() == 0 || (sp_ids.min().item<int64_t>() >= 0 && sp_ids.max().item<int64_t>() < V),
                "sparse_ids must lie in [0, V)");
  }
  const int64_t* psp_ids = has_sp ? sp_ids.data_ptr<int64_t>() : nullptr;
  const float* psp_coef = has_sp ? sp_coef.data_ptr<float>() : nullptr;

  const at::Tensor h_f = as_f32(h);
  at::Tensor dH = at::zeros({c, d}, h.options().dtype(at::kFloat));
  if (c == 0) return dH;

  float* pbuf = buf.data_ptr<float>();
  const float* plt = lse_t.data_ptr<float>();
  const float* pl1 = has_ce ? lse_1->data_ptr<float>() : nullptr;
  const float* psq = s_q_f.data_ptr<float>();
  const float* ps1 = has_ce ? s_1_f.data_ptr<float>() : nullptr;
  float* pdb = has_db ? db_acc->data_ptr<float>() : nullptr;
  const float inv_t = static_cast<float>(1.0 / temperature);
  const bool t_is_one = temperature == 1.0;
  const int64_t tv = tile_cols(V, h.size(1), needs_upcast(weight));
  const int max_threads = at::get_num_threads();
  // One column-sum row per thread for db, reduced after each tile (no atomics).
  std::vector<float> col(has_db ? static_cast<size_t>(max_threads) * tv : 0);
  for (int64_t v0 = 0; v0 < V; v0 += tv) {
    const int64_t n = std::min(tv, V - v0);
    const int nt = std::min(num_threads_for(c * n), max_threads);
    int used_threads = 1;
#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num();
#pragma omp single
      used_threads = omp_get_num_threads();
      float* __restrict acc = has_db ? col.data() + static_cast<size_t>(tid) * tv : nullptr;
      if (acc != nullptr) std::fill(acc, acc + n, 0.0f);
#pragma omp for schedule(static)
      for (int64_t r = 0; r < c; ++r) {
        float* __restrict g = pbuf + r * V + v0;
        const float sq = psq[r];
        const float neg_lt = -plt[r];
        // T = 1 and equal log-sum-exps: both terms share one exp.
        const bool fold = has_ce && t_is_one && pl1[r] == plt[r];
        if (!has_ce || fold) {
          const float s = fold ? sq + ps1[r] : sq;
          if (acc != nullptr) grad_row<false, true>(g, acc, n, inv_t, s, neg_lt, 0.0f, 0.0f);
          else grad_row<false, false>(g, acc, n, inv_t, s, neg_lt, 0.0f, 0.0f);
        } else if (acc != nullptr) {
          grad_row<true, true>(g, acc, n, inv_t, sq, neg_lt, ps1[r], -pl1[r]);
        } else {
          grad_row<true, false>(g, acc, n, inv_t, sq, neg_lt, ps1[r], -pl1[r]);
        }
        for (int64_t j = 0; j < n_sp; ++j) {  // the row's sparse coefficients that fall in this tile
          const int64_t col_id = psp_ids[r * n_sp + j] - v0;
          if (col_id >= 0 && col_id < n) {
            const float cf = psp_coef[r * n_sp + j];
            g[col_id] += cf;
            if (acc != nullptr) acc[col_id] += cf;
          }
        }
      }
    }
    if (has_db) {
      float* __restrict db = pdb + v0;
      for (int t = 0; t < used_threads; ++t) {
        const float* __restrict a = col.data() + static_cast<size_t>(t) * tv;
#pragma omp simd
        for (int64_t v = 0; v < n; ++v) db[v] += a[v];
      }
    }
    // dW[v0:v0+n] += g_tileᵀ h  and  dH += g_tile W[v0:v0+n]
    // (g_tile is a strided [c, n] view with leading dimension V; both GEMMs take it without a copy).
    const at::Tensor g_tile = buf.narrow(1, v0, n);
    dW_acc.narrow(0, v0, n).addmm_(g_tile.t(), h_f);
    dH.addmm_(g_tile, as_f32(weight.narrow(0, v0, n)));
  }
  return dH;
}

// ---------------------------------------------------------------------------------------------------
// distill_buf_lse(buf [c,V] fp32, T) -> lse [c] = log Σ_v exp(buf_v / T) per row, where -inf entries (the
// teacher ids masked out of the chunk logits) count as zero mass and an all -inf row gives -inf.  This is the
// student's exact rest log-mass pass (issue 15): the same block-wise online log-sum-exp as
// distill_logits_lse (lse_update with no bias, one sum), rows in parallel.  buf is only read.
at::Tensor distill_buf_lse(const at::Tensor& buf, double temperature) {
  at::NoGradGuard no_grad;
  DE_CHECK_CPU_INPUT(buf);
  TORCH_CHECK(buf.scalar_type() == at::kFloat, "buf must be float32, got ", buf.scalar_type());
  DE_CHECK_DIM(buf, 2);
  check_temperature(temperature);
  const int64_t c = buf.size(0);
  const int64_t V = buf.size(1);
  at::Tensor out = at::empty({c}, buf.options());
  if (c == 0) return out;
  float* pbuf = buf.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const float inv_t = static_cast<float>(1.0 / temperature);
#pragma omp parallel for schedule(static) num_threads(num_threads_for(c* V))
  for (int64_t r = 0; r < c; ++r) {
    LseState st;
    lse_update(st, pbuf + r * V, nullptr, V, inv_t, false);  // reads only (no bias to add)
    lse_finish(st, true, false, po + r, nullptr);
  }
  return out;
}

// _vexp(x) -> fast_expf applied elementwise (fp32); exported only so the tests can check its accuracy.
at::Tensor vexp(const at::Tensor& x) {
  DE_CHECK_CPU(x);
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32, got ", x.scalar_type());
  at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const float* px = xc.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t n = xc.numel();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) po[i] = fast_expf(px[i]);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(distill_engine_C, CPU, m) {
  m.impl("distill_logits_lse", &distill_logits_lse);
  m.impl("distill_dense_grad", &distill_dense_grad);
  m.impl("distill_buf_lse", &distill_buf_lse);
  m.impl("_vexp", &vexp);
}

}  // namespace distill_engine
