#pragma once
// Merging partial results: the operation that lets several KV chunks, or
// several devices, contribute to one attention output exactly.
//
//   lse = log2(2^lse_a + 2^lse_b),  o = 2^(lse_a - lse) o_a + 2^(lse_b - lse) o_b
//
// Associative and commutative up to rounding; an empty partial (lse2 = -inf)
// is the identity; never produces NaN from finite or empty inputs.

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "hattn/core/problem.hpp"
#include "hattn/core/status.hpp"
#include "hattn/core/validate.hpp"

namespace hattn {

// Merge state for one head, in f32 registers.
struct MergeWeights {
  float lse;  // merged lse2
  float wa;   // weight of a
  float wb;   // weight of b
};

inline MergeWeights merge_weights(float lse_a, float lse_b) noexcept {
  const float m = std::max(lse_a, lse_b);
  if (m == kNegInf) return {kNegInf, 0.0f, 0.0f};
  const float ea = std::exp2(lse_a - m);  // exp2(-inf) == 0
  const float eb = std::exp2(lse_b - m);
  const float s = ea + eb;
  return {m + std::log2(s), ea / s, eb / s};
}

// out = merge(a, b), per (batch, head). out may alias a or b exactly (same
// pointers and strides). All three views must have the same shape.
inline Status merge_partials(const PartialView& a, const PartialView& b,
                             const PartialView& out) noexcept {
  auto same = [](const PartialView& x, const PartialView& y) {
    return x.batch_size == y.batch_size && x.num_heads == y.num_heads && x.head_dim == y.head_dim;
  };
  if (!same(a, b) || !same(a, out))
    return {StatusCode::kInvalidArgument, "merge_partials: partials have different shapes"};
  if (a.batch_size > 0 && (!a.o || !b.o || !out.o || !a.lse2 || !b.lse2 || !out.lse2))
    return {StatusCode::kInvalidArgument, "merge_partials: null pointer"};
  HATTN_RETURN_IF_ERROR(detail::validate_partial(a, false));
  HATTN_RETURN_IF_ERROR(detail::validate_partial(b, false));
  HATTN_RETURN_IF_ERROR(detail::validate_partial(out, true));
  const std::int32_t d = a.head_dim;
  for (std::int32_t bi = 0; bi < a.batch_size; ++bi) {
    for (std::int32_t h = 0; h < a.num_heads; ++h) {
      const float la = a.lse2[bi * a.lse_stride_batch + h];
      const float lb = b.lse2[bi * b.lse_stride_batch + h];
      const MergeWeights w = merge_weights(la, lb);
      const std::int64_t oa = bi * a.stride_batch + h * a.stride_head;
      const std::int64_t ob = bi * b.stride_batch + h * b.stride_head;
      const std::int64_t oo = bi * out.stride_batch + h * out.stride_head;
      for (std::int32_t i = 0; i < d; ++i) {
        // Skip a side with zero weight so an uninitialized empty partial
        // (lse2 = -inf, o = garbage or NaN) cannot leak into the result.
        const float xa = w.wa != 0.0f ? w.wa * load_as_float(a.o, a.dtype, oa + i) : 0.0f;
        const float xb = w.wb != 0.0f ? w.wb * load_as_float(b.o, b.dtype, ob + i) : 0.0f;
        store_from_float(out.o, out.dtype, oo + i, xa + xb);
      }
      out.lse2[bi * out.lse_stride_batch + h] = w.lse;
    }
  }
  return Status::ok();
}

}  // namespace hattn
