// CPU kernels of token_relation_loss (the `cpu` backend); math in distill_engine/reference/token_relation.py.
//
// Work is split into tasks of one (batch row b, relation head h, tile); each task walks the other axis
// in tiles, forming the score tiles a^S = S_q S_kᵀ/√d_hs and a^T = T_q T_kᵀ/√d_ht with one ATen GEMM
// each into task-local [BQ, BK] buffers (the [H, L, L] matrices never exist):
//   forward:       per query tile, online softmax over key tiles for both matrices:
//                  (m^T, l^T, acc = Σ p^T (a^T − a^S)), (m^S, l^S)  ->  kl = acc/l^T + lse^S − lse^T
//   backward rows: per query tile, G^S = g(Q − P), G^T = g P (a^T − a^S − c) written over the score
//                  buffers, dS_q = G^S S_k/√d_hs and dT_q = G^T T_k/√d_ht accumulated by GEMM
//   backward cols: per key tile, the same tiles walked over query tiles: dS_k += G^Sᵀ S_q/√d_hs, ...
// P and Q are recomputed from the forward's row log-sum-exps (flash-attention style); exp is
// fast_expf_nonpos from csrc/cpu/math.h (vectorised; arguments clamped to <= 0, see there).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "common.h"
#include "cpu/math.h"

namespace distill_engine {
namespace {

constexpr float kNeg = -1e30f;

struct Problem {
  int64_t B, L, H, ds, dt, d_s, d_t;
  float c_s, c_t;
  bool causal;
  int64_t bq, bk;
  const float* S;
  const float* T;
  const bool* M;
};

Problem make_problem(const at::Tensor& S, const at::Tensor& T, int64_t heads, const at::Tensor& mask, bool causal,
                     int64_t bq, int64_t bk) {
  DE_CHECK_CPU_INPUT(S);
  DE_CHECK_CPU_INPUT(T);
  DE_CHECK_CPU_INPUT(mask);
  DE_CHECK_DTYPE(S, at::kFloat);
  DE_CHECK_DTYPE(T, at::kFloat);
  DE_CHECK_DTYPE(mask, at::kBool);
  DE_CHECK_DIM(S, 3);
  DE_CHECK_DIM(T, 3);
  DE_CHECK_DIM(mask, 2);
  TORCH_CHECK(heads >= 1 && S.size(2) % heads == 0 && T.size(2) % heads == 0, "heads (", heads,
              ") must divide both widths S.size(2) = ", S.size(2), " and T.size(2) = ", T.size(2));
  TORCH_CHECK(T.size(0) == S.size(0) && T.size(1) == S.size(1),
              "S [B, L, d_s] and T [B, L, d_t] must share B and L, got ",
              S.sizes(), " and ", T.sizes());
  TORCH_CHECK(mask.size(0) == S.size(0) && mask.size(1) == S.size(1), "mask must have shape [B, L] = [", S.size(0),
              ", ", S.size(1), "], got ", mask.sizes());
  TORCH_CHECK(bq >= 1 && bk >= 1, "tile sizes bq and bk must be positive, got ", bq, " and ", bk);
  Problem p;
  p.B = S.size(0);
  p.L = S.size(1);
  p.H = heads;
  p.d_s = S.size(2);
  p.d_t = T.size(2);
  p.ds = p.d_s / heads;
  p.dt = p.d_t / heads;
  p.c_s = 1.0f / std::sqrt(static_cast<float>(p.ds));
  p.c_t = 1.0f / std::sqrt(static_cast<float>(p.dt));
  p.causal = causal;
  p.bq = bq;
  p.bk = bk;
  p.S = S.data_ptr<float>();
  p.T = T.data_ptr<float>();
  p.M = mask.data_ptr<bool>();
  return p;
}

// Score tiles of rows [q0, q1) x keys [k0, k1) of (b, h): as, at are contiguous [q1-q0, k1-k0] fp32.
void score_tiles(const Problem& p, const at::Tensor& S, const at::Tensor& T, int64_t b, int64_t h, int64_t q0,
                 int64_t q1, int64_t k0, int64_t k1, at::Tensor& as, at::Tensor& at_) {
  using at::indexing::Slice;
  const at::Tensor Sq = S[b].slice(0, q0, q1).slice(1, h * p.ds, (h + 1) * p.ds);  // [nq, ds] strided view
  const at::Tensor Sk = S[b].slice(0, k0, k1).slice(1, h * p.ds, (h + 1) * p.ds);  // [nk, ds]
  const at::Tensor Tq = T[b].slice(0, q0, q1).slice(1, h * p.dt, (h + 1) * p.dt);
  const at::Tensor Tk = T[b].slice(0, k0, k1).slice(1, h * p.dt, (h + 1) * p.dt);
  as = at::mm(Sq, Sk.t());  // [nq, nk]
  at_ = at::mm(Tq, Tk.t());
}

// Valid-key multipliers of key tile [k0, k1) and, per row i, the number of leading keys it may see.
inline int64_t row_limit(const Problem& p, int64_t i, int64_t k0, int64_t nk) {
  if (!p.causal) return nk;
  return std::max<int64_t>(0, std::min<int64_t>(nk, i - k0 + 1));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_relation_forward(const at::Tensor& S, const at::Tensor& T,
                                                                      int64_t heads, const at::Tensor& mask,
                                                                      bool causal, int64_t bq, int64_t bk) {
  const Problem p = make_problem(S, T, heads, mask, causal, bq, bk);
  auto opts = S.options();
  at::Tensor kl = at::zeros({p.B, p.H, p.L}, opts);
  at::Tensor lse_s = at::zeros({p.B, p.H, p.L}, opts);
  at::Tensor lse_t = at::zeros({p.B, p.H, p.L}, opts);
  float* klp = kl.data_ptr<float>();
  float* lsp = lse_s.data_ptr<float>();
  float* ltp = lse_t.data_ptr<float>();
  const int64_t nq_tiles = (p.L + p.bq - 1) / p.bq;
  at::parallel_for(0, p.B * p.H * nq_tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> m_t(p.bq), m_s(p.bq), l_t(p.bq), l_s(p.bq), acc(p.bq), valid(p.bk);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / (p.H * nq_tiles), h = (task / nq_tiles) % p.H, qt = task % nq_tiles;
      const int64_t q0 = qt * p.bq, q1 = std::min(p.L, q0 + p.bq), nq = q1 - q0;
      std::fill(m_t.begin(), m_t.end(), kNeg);
      std::fill(m_s.begin(), m_s.end(), kNeg);
      std::fill(l_t.begin(), l_t.end(), 0.f);
      std::fill(l_s.begin(), l_s.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      const bool* mb = p.M + b * p.L;
      const int64_t hi = p.causal ? q1 : p.L;
      for (int64_t k0 = 0; k0 < hi; k0 += p.bk) {
        const int64_t k1 = std::min(p.L, k0 + p.bk), nk = k1 - k0;
        at::Tensor as, at_;
        score_tiles(p, S, T, b, h, q0, q1, k0, k1, as, at_);
        const float* A = as.data_ptr<float>();
        const float* Bt = at_.data_ptr<float>();
        for (int64_t j = 0; j < nk; ++j) valid[j] = mb[k0 + j] ? 1.f : 0.f;
        for (int64_t r = 0; r < nq; ++r) {
          if (!mb[q0 + r]) continue;
          const int64_t n = row_limit(p, q0 + r, k0, nk);
          if (n == 0) continue;
          const float* sa = A + r * nk;
          const float* ta = Bt + r * nk;
          const float c_s = p.c_s, c_t = p.c_t;
          float mt = m_t[r], ms = m_s[r];
#pragma omp simd reduction(max : mt, ms)
          for (int64_t j = 0; j < n; ++j) {
            const bool v = valid[j] != 0.f;
            mt = std::max(mt, v ? ta[j] * c_t : kNeg);
            ms = std::max(ms, v ? sa[j] * c_s : kNeg);
          }
          const float al_t = fast_expf_nonpos(m_t[r] - mt), al_s = fast_expf_nonpos(m_s[r] - ms);
          float st = 0.f, ss = 0.f, sd = 0.f;
#pragma omp simd reduction(+ : st, ss, sd)
          for (int64_t j = 0; j < n; ++j) {
            const float a_t = ta[j] * c_t, a_s = sa[j] * c_s;
            const float pt = valid[j] * fast_expf_nonpos(a_t - mt);
            st += pt;
            ss += valid[j] * fast_expf_nonpos(a_s - ms);
            sd += pt * (a_t - a_s);
          }
          l_t[r] = l_t[r] * al_t + st;
          acc[r] = acc[r] * al_t + sd;
          l_s[r] = l_s[r] * al_s + ss;
          m_t[r] = mt;
          m_s[r] = ms;
        }
      }
      const int64_t base = (b * p.H + h) * p.L + q0;
      for (int64_t r = 0; r < nq; ++r) {
        if (!mb[q0 + r] || !(l_t[r] > 0.f)) continue;  // padded row: kl = lse = 0
        const float lt = m_t[r] + std::log(l_t[r]);
        const float ls = m_s[r] + std::log(l_s[r]);
        klp[base + r] = acc[r] / l_t[r] + ls - lt;
        lsp[base + r] = ls;
        ltp[base + r] = lt;
      }
    }
  });
  return {kl, lse_s, lse_t};
}

// Turns the score tiles into G^S (in as) and G^T (in at_) for rows [q0, q1) and keys [k0, k1).
void grad_tiles(const Problem& p, int64_t b, int64_t h, int64_t q0, int64_t nq, int64_t k0, int64_t nk,
                at::Tensor& as, at::Tensor& at_, const float* lse_s, const float* lse_t, const float* c,
                const float* g, std::vector<float>& valid) {
  const bool* mb = p.M + b * p.L;
  for (int64_t j = 0; j < nk; ++j) valid[j] = mb[k0 + j] ? 1.f : 0.f;
  float* A = as.data_ptr<float>();
  float* Bt = at_.data_ptr<float>();
  const int64_t row0 = (b * p.H + h) * p.L + q0;
  for (int64_t r = 0; r < nq; ++r) {
    float* sa = A + r * nk;
    float* ta = Bt + r * nk;
    const float gr = g[row0 + r];
    const int64_t n = (gr == 0.f || !mb[q0 + r]) ? 0 : row_limit(p, q0 + r, k0, nk);
    const float ls = lse_s[row0 + r], lt = lse_t[row0 + r], cr = c[row0 + r], c_s = p.c_s, c_t = p.c_t;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float a_t = ta[j] * c_t, a_s = sa[j] * c_s;
      const float pt = valid[j] * fast_expf_nonpos(a_t - lt);
      const float qs = valid[j] * fast_expf_nonpos(a_s - ls);
      ta[j] = gr * pt * (a_t - a_s - cr);
      sa[j] = gr * (qs - pt);
    }
    for (int64_t j = n; j < nk; ++j) sa[j] = ta[j] = 0.f;  // invisible keys contribute nothing
  }
}

// dst[rows, head columns] (+)= scale · src, dst a contiguous [B, L, d] fp32 tensor, src [n, dh].
void write_block(float* dst, int64_t L, int64_t d, int64_t dh, int64_t b, int64_t h, int64_t r0,
                 const at::Tensor& src, float scale, bool add) {
  const at::Tensor s = src.contiguous();
  const float* sp = s.data_ptr<float>();
  for (int64_t r = 0; r < s.size(0); ++r) {
    float* out = dst + (b * L + r0 + r) * d + h * dh;
    const float* in = sp + r * dh;
    if (add) {
      for (int64_t k = 0; k < dh; ++k) out[k] += scale * in[k];
    } else {
      for (int64_t k = 0; k < dh; ++k) out[k] = scale * in[k];
    }
  }
}

// Row statistics of the forward and the output gradients of one backward call (dS/dT null when not needed).
struct Grads {
  const float *lse_s, *lse_t, *c, *g;
  float *dS, *dT;
};

// One side of the backward.  rows = true: one task per (b, h, query tile) walks the key tiles and WRITES
// dS_q, dT_q into its own rows of the head's columns; rows = false: one task per (b, h, key tile) walks the
// query tiles and ADDS dS_k, dT_k (so the row side must have run first).  Causal: a query tile sees keys
// below its end; a key tile is seen by query tiles from the one holding its first key.
void backward_side(const Problem& p, const at::Tensor& S, const at::Tensor& T, const Grads& gr, bool rows) {
  auto head = [&](const at::Tensor& X, int64_t b, int64_t h, int64_t dh, int64_t r0, int64_t r1) {
    return X[b].slice(0, r0, r1).slice(1, h * dh, (h + 1) * dh);  // [r1 - r0, dh] strided view
  };
  const int64_t own = rows ? p.bq : p.bk, other = rows ? p.bk : p.bq;
  const int64_t n_tiles = (p.L + own - 1) / own;
  at::parallel_for(0, p.B * p.H * n_tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> valid(p.bk);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / (p.H * n_tiles), h = (task / n_tiles) % p.H, i = task % n_tiles;
      const int64_t a0 = i * own, a1 = std::min(p.L, a0 + own);
      at::Tensor acc_s = gr.dS ? at::zeros({a1 - a0, p.ds}, S.options()) : at::Tensor();  // [own, ds]
      at::Tensor acc_t = gr.dT ? at::zeros({a1 - a0, p.dt}, S.options()) : at::Tensor();  // [own, dt]
      const int64_t lo = (rows || !p.causal) ? 0 : (a0 / p.bq) * p.bq;
      const int64_t hi = (rows && p.causal) ? a1 : p.L;
      for (int64_t o0 = lo; o0 < hi; o0 += other) {
        const int64_t o1 = std::min(p.L, o0 + other);
        const int64_t q0 = rows ? a0 : o0, q1 = rows ? a1 : o1, k0 = rows ? o0 : a0, k1 = rows ? o1 : a1;
        at::Tensor as, at_;
        score_tiles(p, S, T, b, h, q0, q1, k0, k1, as, at_);
        grad_tiles(p, b, h, q0, q1 - q0, k0, k1 - k0, as, at_, gr.lse_s, gr.lse_t, gr.c, gr.g, valid);
        if (gr.dS) acc_s.addmm_(rows ? as : as.t(), head(S, b, h, p.ds, o0, o1));
        if (gr.dT) acc_t.addmm_(rows ? at_ : at_.t(), head(T, b, h, p.dt, o0, o1));
      }
      if (gr.dS) write_block(gr.dS, p.L, p.d_s, p.ds, b, h, a0, acc_s, p.c_s, !rows);
      if (gr.dT) write_block(gr.dT, p.L, p.d_t, p.dt, b, h, a0, acc_t, p.c_t, !rows);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> token_relation_backward(const at::Tensor& S, const at::Tensor& T, int64_t heads,
                                                           const at::Tensor& mask, bool causal,
                                                           const at::Tensor& lse_s, const at::Tensor& lse_t,
                                                           const at::Tensor& c, const at::Tensor& g, bool need_s,
                                                           bool need_t, int64_t bq, int64_t bk) {
  const Problem p = make_problem(S, T, heads, mask, causal, bq, bk);
  DE_CHECK_CPU_INPUT(lse_s);
  DE_CHECK_CPU_INPUT(lse_t);
  DE_CHECK_CPU_INPUT(c);
  DE_CHECK_CPU_INPUT(g);
  for (const auto& [x, name] : {std::pair<const at::Tensor*, const char*>{&lse_s, "lse_s"}, {&lse_t, "lse_t"},
                                {&c, "c"}, {&g, "g"}}) {
    TORCH_CHECK(x->scalar_type() == at::kFloat && x->numel() == p.B * p.H * p.L, name,
                " must be float32 with B·H·L = ", p.B * p.H * p.L, " entries ([B, H, L]), got ", x->scalar_type(),
                " ", x->sizes());
  }
  at::Tensor dS = need_s ? at::zeros({p.B, p.L, p.d_s}, S.options()) : at::empty({0}, S.options());
  at::Tensor dT = need_t ? at::zeros({p.B, p.L, p.d_t}, S.options()) : at::empty({0}, S.options());
  const Grads gr{lse_s.data_ptr<float>(), lse_t.data_ptr<float>(), c.data_ptr<float>(), g.data_ptr<float>(),
                 need_s ? dS.data_ptr<float>() : nullptr, need_t ? dT.data_ptr<float>() : nullptr};
  backward_side(p, S, T, gr, true);   // query tiles: dS_q, dT_q
  backward_side(p, S, T, gr, false);  // key tiles: dS_k, dT_k added
  return {dS, dT};
}

}  // namespace

TORCH_LIBRARY_IMPL(distill_engine_C, CPU, m) {
  m.impl("token_relation_forward", &token_relation_forward);
  m.impl("token_relation_backward", &token_relation_backward);
}

}  // namespace distill_engine
