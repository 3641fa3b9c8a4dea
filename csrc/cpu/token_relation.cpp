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
// P and Q are recomputed from the forward's row log-sum-exps (flash-attention style); exp runs through a
// branch-free polynomial that the compiler vectorises (relative error ~2e-7).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"

namespace distill_engine {
namespace {

constexpr float kNeg = -1e30f;

// exp(x) for x <= 0 (every argument here is a score minus a row maximum or lse; masked entries may be
// anything and are clamped into range before a 0 multiplier drops them): 2^n · 2^f with
// n = round(x·log2 e), f in [−½, ½], 2^f by its degree-6 Taylor series in f·ln 2 (error < 2e-7).
inline float fexp(float x) {
  x = std::min(std::max(x, -87.0f), 0.0f);
  const float t = x * 1.4426950408889634f;
  const float n = std::nearbyint(t);
  const float r = (t - n) * 0.6931471805599453f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return p * scale;
}

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
  TORCH_CHECK(heads >= 1 && S.size(2) % heads == 0 && T.size(2) % heads == 0, "heads must divide both widths");
  TORCH_CHECK(T.size(0) == S.size(0) && T.size(1) == S.size(1), "S and T must share B and L");
  TORCH_CHECK(mask.size(0) == S.size(0) && mask.size(1) == S.size(1), "mask must be [B, L]");
  TORCH_CHECK(bq >= 1 && bk >= 1, "tile sizes must be positive");
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

std::vector<at::Tensor> token_relation_forward(const at::Tensor& S, const at::Tensor& T, int64_t heads,
                                               const at::Tensor& mask, bool causal, int64_t bq, int64_t bk) {
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
          const float al_t = fexp(m_t[r] - mt), al_s = fexp(m_s[r] - ms);
          float st = 0.f, ss = 0.f, sd = 0.f;
#pragma omp simd reduction(+ : st, ss, sd)
          for (int64_t j = 0; j < n; ++j) {
            const float a_t = ta[j] * c_t, a_s = sa[j] * c_s;
            const float pt = valid[j] * fexp(a_t - mt);
            st += pt;
            ss += valid[j] * fexp(a_s - ms);
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
      const float pt = valid[j] * fexp(a_t - lt);
      const float qs = valid[j] * fexp(a_s - ls);
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

std::vector<at::Tensor> token_relation_backward(const at::Tensor& S, const at::Tensor& T, int64_t heads,
                                                const at::Tensor& mask, bool causal, const at::Tensor& lse_s,
                                                const at::Tensor& lse_t, const at::Tensor& c, const at::Tensor& g,
                                                bool need_s, bool need_t, int64_t bq, int64_t bk) {
  const Problem p = make_problem(S, T, heads, mask, causal, bq, bk);
  for (const at::Tensor* x : {&lse_s, &lse_t, &c, &g}) {
    DE_CHECK_CPU_INPUT(*x);
    DE_CHECK_DTYPE(*x, at::kFloat);
    TORCH_CHECK(x->numel() == p.B * p.H * p.L, "row statistics must be [B, H, L]");
  }
  const float *lsp = lse_s.data_ptr<float>(), *ltp = lse_t.data_ptr<float>(), *cp = c.data_ptr<float>(),
              *gp = g.data_ptr<float>();
  at::Tensor dS = need_s ? at::zeros({p.B, p.L, p.d_s}, S.options()) : at::Tensor();
  at::Tensor dT = need_t ? at::zeros({p.B, p.L, p.d_t}, S.options()) : at::Tensor();
  float* dSp = need_s ? dS.data_ptr<float>() : nullptr;
  float* dTp = need_t ? dT.data_ptr<float>() : nullptr;
  auto head = [&](const at::Tensor& X, int64_t b, int64_t h, int64_t dh, int64_t r0, int64_t r1) {
    return X[b].slice(0, r0, r1).slice(1, h * dh, (h + 1) * dh);
  };
  // Row side: one task per (b, h, query tile), writes its own rows of the head's columns.
  const int64_t nq_tiles = (p.L + p.bq - 1) / p.bq;
  at::parallel_for(0, p.B * p.H * nq_tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> valid(p.bk);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / (p.H * nq_tiles), h = (task / nq_tiles) % p.H, qt = task % nq_tiles;
      const int64_t q0 = qt * p.bq, q1 = std::min(p.L, q0 + p.bq);
      at::Tensor acc_s = need_s ? at::zeros({q1 - q0, p.ds}, S.options()) : at::Tensor();
      at::Tensor acc_t = need_t ? at::zeros({q1 - q0, p.dt}, S.options()) : at::Tensor();
      const int64_t hi = p.causal ? q1 : p.L;
      for (int64_t k0 = 0; k0 < hi; k0 += p.bk) {
        const int64_t k1 = std::min(p.L, k0 + p.bk);
        at::Tensor as, at_;
        score_tiles(p, S, T, b, h, q0, q1, k0, k1, as, at_);
        grad_tiles(p, b, h, q0, q1 - q0, k0, k1 - k0, as, at_, lsp, ltp, cp, gp, valid);
        if (need_s) acc_s.addmm_(as, head(S, b, h, p.ds, k0, k1));
        if (need_t) acc_t.addmm_(at_, head(T, b, h, p.dt, k0, k1));
      }
      if (need_s) write_block(dSp, p.L, p.d_s, p.ds, b, h, q0, acc_s, p.c_s, false);
      if (need_t) write_block(dTp, p.L, p.d_t, p.dt, b, h, q0, acc_t, p.c_t, false);
    }
  });
  // Column side: one task per (b, h, key tile), adds onto its own rows of the head's columns.
  const int64_t nk_tiles = (p.L + p.bk - 1) / p.bk;
  at::parallel_for(0, p.B * p.H * nk_tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> valid(p.bk);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / (p.H * nk_tiles), h = (task / nk_tiles) % p.H, kt = task % nk_tiles;
      const int64_t k0 = kt * p.bk, k1 = std::min(p.L, k0 + p.bk);
      at::Tensor acc_s = need_s ? at::zeros({k1 - k0, p.ds}, S.options()) : at::Tensor();
      at::Tensor acc_t = need_t ? at::zeros({k1 - k0, p.dt}, S.options()) : at::Tensor();
      const int64_t lo = p.causal ? (k0 / p.bq) * p.bq : 0;  // earlier queries see none of these keys
      for (int64_t q0 = lo; q0 < p.L; q0 += p.bq) {
        const int64_t q1 = std::min(p.L, q0 + p.bq);
        at::Tensor as, at_;
        score_tiles(p, S, T, b, h, q0, q1, k0, k1, as, at_);
        grad_tiles(p, b, h, q0, q1 - q0, k0, k1 - k0, as, at_, lsp, ltp, cp, gp, valid);
        if (need_s) acc_s.addmm_(as.t(), head(S, b, h, p.ds, q0, q1));
        if (need_t) acc_t.addmm_(at_.t(), head(T, b, h, p.dt, q0, q1));
      }
      if (need_s) write_block(dSp, p.L, p.d_s, p.ds, b, h, k0, acc_s, p.c_s, true);
      if (need_t) write_block(dTp, p.L, p.d_t, p.dt, b, h, k0, acc_t, p.c_t, true);
    }
  });
  return {need_s ? dS : at::empty({0}, S.options()), need_t ? dT : at::empty({0}, S.options())};
}

}  // namespace

void register_token_relation(pybind11::module_& m) {
  m.def("token_relation_forward", &token_relation_forward,
        "Token-relation KL, online softmax over key tiles: [kl, lse_s, lse_t], each [B, H, L] fp32",
        pybind11::arg("S"), pybind11::arg("T"), pybind11::arg("heads"), pybind11::arg("mask"),
        pybind11::arg("causal"), pybind11::arg("bq") = 128, pybind11::arg("bk") = 256);
  m.def("token_relation_backward", &token_relation_backward,
        "Token-relation KL gradients recomputed from the row lses: [dS, dT] fp32 (empty when not needed)",
        pybind11::arg("S"), pybind11::arg("T"), pybind11::arg("heads"), pybind11::arg("mask"),
        pybind11::arg("causal"), pybind11::arg("lse_s"), pybind11::arg("lse_t"), pybind11::arg("c"),
        pybind11::arg("g"), pybind11::arg("need_s"), pybind11::arg("need_t"), pybind11::arg("bq") = 128,
        pybind11::arg("bk") = 256);
}

}  // namespace distill_engine
