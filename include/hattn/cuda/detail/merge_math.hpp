#pragma once
// The arithmetic of merging partials (core/merge.hpp), written once for host
// and device: the GPU merges (of KV chunks, and of a CPU partial with a GPU
// one) use these functions, and the host tests check them against
// hattn::merge_weights. exp2f and log2f are the C functions on the host and
// CUDA's (2 ulp) on the device.

#include <math.h>

#include "hattn/cuda/detail/host_device.hpp"

namespace hattn::cuda::detail {

struct MergeWeightsF {
  float lse;  // merged lse2
  float wa;   // weight of a
  float wb;   // weight of b
};

// Same formula as hattn::merge_weights: m = max, e = 2^(lse - m), weights e / sum.
HATTN_HOST_DEVICE MergeWeightsF merge_weights2(float lse_a, float lse_b) noexcept {
  const float m = lse_a > lse_b ? lse_a : lse_b;
  if (m == -INFINITY) return {-INFINITY, 0.0f, 0.0f};
  const float ea = exp2f(lse_a - m);  // exp2(-inf) == 0
  const float eb = exp2f(lse_b - m);
  const float s = ea + eb;
  return {m + log2f(s), ea / s, eb / s};
}

// One merged element; a side of zero weight is skipped so an empty partial's
// o (garbage, NaN) cannot leak in.
HATTN_HOST_DEVICE float merge_value(const MergeWeightsF& w, float a, float b) noexcept {
  const float xa = w.wa != 0.0f ? w.wa * a : 0.0f;
  const float xb = w.wb != 0.0f ? w.wb * b : 0.0f;
  return xa + xb;
}

// Weight of a partial with base-2 lse `lse` against the running maximum `m`
// of an n-way merge (0 when both are -inf).
HATTN_HOST_DEVICE float chunk_weight(float lse, float m) noexcept {
  return m == -INFINITY ? 0.0f : exp2f(lse - m);
}

// The base-2 lse of an n-way merge from its maximum and sum of weights.
HATTN_HOST_DEVICE float merged_lse(float m, float sum) noexcept {
  return sum > 0.0f ? m + log2f(sum) : -INFINITY;
}

}  // namespace hattn::cuda::detail
