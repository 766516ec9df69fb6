#pragma once
// Comparing results with the double-precision reference: the one tolerance
// table of the suite, and a per-element check with a failure message that
// names the index, the values and the seed.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>

#include "hattn/core/dtype.hpp"

namespace hattn_test {

// Element i passes when |got - ref| <= atol + rtol * |ref|, and the whole
// tensor when sum (got - ref)^2 / sum ref^2 <= nmse.
struct Tolerance {
  double atol;
  double rtol;
  double nmse;
};

// THE tolerance table. Why these numbers:
//
// Inputs stored in bf16/f16 are read exactly by the reference (it widens the
// stored bits to double), so storage dtypes of K, V and q add no error. What
// is left is (a) the backend's f32 arithmetic and (b) rounding the output to
// its dtype. The table is for scores of unit scale (q, k unit normal and the
// default sm_scale = 1/sqrt(D)); see scale_for_scores for larger ones.
//
// (a) f32, unit roundoff u = 2^-24 = 6e-8. A score (scale log2 e) q.k is a
//     sum of D terms; its rounding error is about u sqrt(sum of squared
//     partial sums) ~ u * 1.4 sqrt(D) / sqrt(2) ~ 1e-6 (base-2 units,
//     D = 256, sequential sum; SIMD partial sums do better). A score error d
//     scales that key's weight by 2^d, so o moves by about
//     ln2 * d * |v - o| ~ 3e-6 when one key dominates, less when many share
//     the weight; the f32 running sums of l and acc add ~ sqrt(n) u relative.
//     The outputs are weighted means of unit-normal values (|o| up to ~4,
//     ~1e-2 for flat softmax over thousands of keys), hence atol 1e-5 and
//     rtol 1e-4 for f32 output: several times the expected error, far below
//     any real bug (a wrong row, scale or rescale moves o by ~1e-1). NMSE of
//     such errors is ~1e-10; bound 1e-8.
// (b) Rounding to nearest of the output adds at most u_out |o|: f16 has
//     11 significant bits, u = 2^-11 = 4.9e-4; bf16 has 8, u = 2^-8 = 3.9e-3.
//     rtol = (a) + about 2x (bf16) to 4x (f16) that bound: 2e-3 and 8e-3.
//     atol stays the f32 one (below f16's normal range its absolute
//     rounding error is at most 2^-25 = 3e-8). NMSE of a uniform rounding
//     error is u^2 / 3 of the mean square: 8e-8 (f16), 5e-6 (bf16); bounds
//     1e-6 and 5e-5 leave room for a few-element tensor.
// lse2 is always f32: lse2 = m + log2(l) carries the score error d of the
//     largest scores plus the f32 rounding of m and of l's sum:
//     atol 2e-5, rtol 2e-5 (|lse2| ~ 1..40).
inline constexpr Tolerance kF32OutTolerance{1e-5, 1e-4, 1e-8};
inline constexpr Tolerance kF16OutTolerance{1e-5, 2e-3, 1e-6};
inline constexpr Tolerance kBF16OutTolerance{1e-5, 8e-3, 5e-5};
inline constexpr Tolerance kLse2Tolerance{2e-5, 2e-5, 1e-10};

constexpr Tolerance output_tolerance(hattn::DType t) noexcept {
  switch (t) {
    case hattn::DType::kF32: return kF32OutTolerance;
    case hattn::DType::kF16: return kF16OutTolerance;
    case hattn::DType::kBF16: return kBF16OutTolerance;
  }
  return kF32OutTolerance;
}

// (c) DenseDecode::Precision::kBf16Products (opt-in, bf16 KV on AVX512_BF16
//     CPUs) rounds q to bf16 for q.k and the softmax weights p to bf16 for
//     p.v (l sums the same rounded weights), u = 2^-8. Each key's weight
//     then carries a relative error e_t = ln2 * dq.k + dp: rms ~ u/sqrt(3)
//     for each term, ~3e-3 together at unit score scale. o = sum w_t v_t
//     moves by sum w_t e_t (v_t - o): at most max|e_t| * mean|v_t - o|
//     ~ 4 rms(e) * 1 ~ 1e-2 when a few keys dominate, less when many share
//     the weight. Hence an absolute term of 2e-2 (about 5u, in units of V),
//     NMSE ~ rms(e)^2 ~ 1e-5, bound 1e-4; added to the row of the output
//     dtype. lse2 = m + log2(l) moves by the weighted mean of the score
//     errors, dq.(weighted mean of k): the same ~u rms per query, not averaged
//     away since dq is shared by all keys, plus the mean of e over l's sum;
//     the same 2e-2 (about 5u) bounds it.
inline constexpr Tolerance kBf16ProductsOutTolerance{2e-2, 0.0, 1e-4};
inline constexpr Tolerance kBf16ProductsLse2Tolerance{2e-2, 0.0, 1e-5};

// (d) LSH-sampled attention (cpu::LshAttention) against the double
//     reference over the same sampled set. On top of (a), each sampled score
//     carries the error of its correction -ln(u + eps): decode interpolates it
//     linearly in a 2^14-interval table over cos in [-1, 1] (max error against
//     the exact value 1.1e-6, measured in test_lsh), and the cosine, formed in
//     f32, is off by a few u, which the slope of ln u (at most ~40 per unit of
//     cos at K10L150) turns into ~1e-6 more. A score error d scales that
//     key's weight by e^d, moving o by ~d |v - o| (a few 1e-6) and lse2 by
//     ~d log2(e). The bounds keep (a)'s shape with the absolute terms doubled:
//     atol 2e-5 on o (measured worst 4e-7), lse2 atol 3e-5 (measured 1.6e-6).
inline constexpr Tolerance kLshLse2Tolerance{3e-5, 1e-5, 1e-10};
constexpr Tolerance lsh_output_tolerance(hattn::DType t) noexcept {
  const Tolerance b = output_tolerance(t);
  return {2.0 * b.atol, b.rtol, 2.0 * b.nmse};
}
// A tolerance (a)+(b) with the bf16-product error (c) added.
constexpr Tolerance with_bf16_products(Tolerance t, Tolerance extra) noexcept {
  return {t.atol + extra.atol, t.rtol + extra.rtol, t.nmse + extra.nmse};
}
// (c) at scores kappa times larger than unit scale: the rounding of q to
// bf16 moves each score by kappa times more (dq.k grows with q and k), so
// e_t's rms, and with it the absolute term, grows by kappa and the NMSE by
// kappa^2 (as scale_for_scores does for (a)). Observed: kappa = 32.5 (q x 8,
// sm_scale -0.25, D = 256, one KV head) gave NMSE 2.4e-4, above the
// unit-scale 1e-4 a kappa-free bound allowed, while every element stayed
// within a quarter of its kappa-scaled bound.
constexpr Tolerance bf16_products_for_scores(Tolerance extra, double kappa) noexcept {
  if (kappa <= 1.0) return extra;
  return {extra.atol * kappa, extra.rtol, extra.nmse * kappa * kappa};
}

// Scores kappa times larger than unit scale (kappa = |sm_scale| * q_scale *
// sqrt(D) for unit-normal q and k: 1 by default, 8 for q x 8, 16 for
// sm_scale = 1 at D = 256) carry kappa times the absolute f32 score error,
// and a peakier softmax averages it over fewer keys: the f32 part (a) of a
// tolerance, all of atol and kF32OutTolerance's share of rtol, grows by kappa
// (NMSE by kappa^2); the output rounding part (b) does not change. (Measured:
// at kappa = 16, D = 256, rounding only the scores to f32 moves o by 5e-5.)
constexpr Tolerance scale_for_scores(Tolerance t, double kappa) noexcept {
  if (kappa <= 1.0) return t;
  return {t.atol * kappa, t.rtol + (kappa - 1.0) * kF32OutTolerance.rtol,
          t.nmse + (kappa * kappa - 1.0) * kF32OutTolerance.nmse};
}

// Compares got[i] with ref[i] for all i (HATTN_TEST_VERBOSE=1 in the
// environment prints every comparison's worst |diff|/allowed). Returns "" when every element
// passes, the NMSE bound holds, and got has no NaN (and an infinity only where
// ref has the same one); otherwise a message with the first failures, each as
// `index_name(i)`, the values, the allowed error, and `context` + the seed.
// An element whose ref is +-inf must match exactly.
std::string compare(std::string_view what, std::span<const double> got, std::span<const double> ref,
                    const Tolerance& tol, const std::string& context,
                    const std::function<std::string(std::size_t)>& index_name = {});

// Largest |got - ref| / (atol + rtol |ref|) over the comparisons that passed
// in this process: how close the suite runs to its tolerances.
double worst_tolerance_ratio();
// Replaces it (tests of compare() itself restore what they found).
void set_worst_tolerance_ratio(double r);

// Formats a float/double with enough digits to round-trip.
std::string fmt(double x);

}  // namespace hattn_test
