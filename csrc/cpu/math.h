// Math shared by the CPU kernels (csrc/cpu/*.cpp): the one vectorizable exp and the row reductions
// built on it.  Everything here is inline and header-only so the compiler can vectorize it inside the
// callers' `#pragma omp simd` loops.
//
// fast_expf(x): branch-free exp for fp32.  std::exp does not vectorize without -ffast-math, so:
//   x = k·ln2 + r, k = round(x·log2 e), |r| ≤ ln2/2 (Cody–Waite split of ln2 into hi + lo, with FMA);
//   exp(r) by its degree-7 Taylor polynomial (truncation ≤ r⁸/8! ≈ 5e-9 relative, far below
//   ½ ulp = 6e-8), Horner with FMA;  2^k built from exponent bits as 2^(k>>1) · 2^(k−(k>>1)) so results
//   down to the subnormal range are formed with a single final rounding.
//   Inputs are clamped to [−104, 88.8]: below −104 the true result rounds to 0 (−inf → 0, never NaN);
//   above, 2^k overflows to +inf as it should.  NaN propagates.
//   Accuracy (tests/test_cpu_math.py, through the `_vexp` op, against float64 exp over a sweep of every
//   1024th fp32 bit pattern plus the edges): ≤ 1 ulp for normal results, ≤ 1 subnormal step (2^-149)
//   below FLT_MIN, +inf exactly where fp32 exp overflows.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace distill_engine {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline __attribute__((always_inline)) float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline __attribute__((always_inline)) uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// exp(x) for fp32, vectorizable when inlined into an `omp simd` loop (math at file top).
inline __attribute__((always_inline)) float fast_expf(float x) {
  constexpr float kLo = -104.0f;  // exp(-104) = 6.8e-46 < half the smallest subnormal: rounds to 0
  constexpr float kHi = 88.8f;    // > log(FLT_MAX) = 88.7228: the result overflows to +inf
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;       // ln2 with trailing zero bits: k·kLn2Hi is exact
  constexpr float kLn2Lo = 1.42860682030941723e-6f;  // ln2 − kLn2Hi
  // 1.5·2^23: adding it rounds a float of magnitude < 2^22 to an integer held in the low mantissa bits.
  constexpr float kShifter = 12582912.0f;
  x = x < kLo ? kLo : x;  // written so that NaN passes through both clamps
  x = x > kHi ? kHi : x;
  const float t = std::fma(x, kLog2e, kShifter);
  const float kf = t - kShifter;  // k = round(x·log2 e), as a float
  float r = std::fma(kf, -kLn2Hi, x);
  r = std::fma(kf, -kLn2Lo, r);
  // exp(r) = Σ_{i≤7} r^i / i!
  float p = 1.0f / 5040.0f;
  p = std::fma(p, r, 1.0f / 720.0f);
  p = std::fma(p, r, 1.0f / 120.0f);
  p = std::fma(p, r, 1.0f / 24.0f);
  p = std::fma(p, r, 1.0f / 6.0f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.0f);
  p = std::fma(p, r, 1.0f);
  // k from the bits of t (no float→int conversion, so a NaN input is no undefined behaviour).
  const int32_t k = static_cast<int32_t>(float_to_bits(t) - float_to_bits(kShifter));
  const int32_t k1 = k >> 1;
  const int32_t k2 = k - k1;
  const float s1 = bits_to_float(static_cast<uint32_t>(k1 + 127) << 23);
  const float s2 = bits_to_float(static_cast<uint32_t>(k2 + 127) << 23);
  return (p * s1) * s2;
}

// exp(min(x, 0)): for a score minus its row maximum or log-sum-exp.  Such an argument is ≤ 0 up to
// rounding; larger values only come from masked entries that a zero multiplier drops afterwards, and
// clamping them keeps that product 0 (exp(+large) = inf would make it NaN).
inline __attribute__((always_inline)) float fast_expf_nonpos(float x) { return fast_expf(x < 0.0f ? x : 0.0f); }

// max over x [n] (−inf for n = 0); NaN-free inputs assumed, as in every caller.
inline float row_max(const float* __restrict x, int64_t n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// Σ_i exp(x_i·scale − shift) over x [n]: fp32 lanes within blocks of kSumBlock (vectorized), blocks summed
// in double so a long row loses no mass to fp32 accumulation.  With scale = 1/T and shift = max·(1/T) this
// is the sum of the log-sum-exp log Σ exp(x/T) = shift + log(sum); the fused form fma(x, scale, −shift) is
// the one the gradient passes use, so Σ exp(x/T − lse) = 1 up to rounding.
constexpr int64_t kSumBlock = 1024;
inline double sum_exp(const float* __restrict x, int64_t n, float scale, float shift) {
  double total = 0.0;
  const float neg = -shift;
  for (int64_t v0 = 0; v0 < n; v0 += kSumBlock) {
    const int64_t v1 = std::min(n, v0 + kSumBlock);
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t v = v0; v < v1; ++v) s += fast_expf(std::fma(x[v], scale, neg));
    total += s;
  }
  return total;
}

}  // namespace distill_engine
