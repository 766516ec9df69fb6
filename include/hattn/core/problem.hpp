#pragma once
// What a decode step computes, and the views of its inputs and outputs.

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

#include "hattn/core/dtype.hpp"

namespace hattn {

// One query token per sequence: data[b * stride_batch + h * stride_head + d].
struct QueryView {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  std::int32_t batch_size = 0;
  std::int32_t num_heads = 0;
  std::int32_t head_dim = 0;
  std::int64_t stride_batch = 0;  // elements
  std::int64_t stride_head = 0;   // elements
};

// A partial attention result: o normalized over the keys it saw, and
// lse2 = log2(sum_j exp(s_j)) of its scores s_j = scale * q.k_j (base-2
// log-sum-exp, FlashInfer's convention). No keys: o = 0, lse2 = -inf.
struct PartialView {
  void* o = nullptr;
  DType dtype = DType::kF32;
  float* lse2 = nullptr;  // lse2[b * lse_stride_batch + h]
  std::int32_t batch_size = 0;
  std::int32_t num_heads = 0;
  std::int32_t head_dim = 0;
  std::int64_t stride_batch = 0;  // elements of o
  std::int64_t stride_head = 0;   // elements of o
  std::int64_t lse_stride_batch = 0;
};

static_assert(std::is_trivially_copyable_v<QueryView>);
static_assert(std::is_trivially_copyable_v<PartialView>);

inline constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Densely packed views [B][H][D] (and lse [B][H]).
constexpr QueryView make_query_view(const void* data, DType dtype, std::int32_t batch,
                                    std::int32_t heads, std::int32_t head_dim) noexcept {
  return {data, dtype, batch, heads, head_dim, std::int64_t{heads} * head_dim, head_dim};
}
constexpr PartialView make_partial_view(void* o, DType dtype, float* lse2, std::int32_t batch,
                                        std::int32_t heads, std::int32_t head_dim) noexcept {
  return {o, dtype, lse2, batch, heads, head_dim, std::int64_t{heads} * head_dim, head_dim, heads};
}

// The shape of one decode step; a backend checks it with can_implement.
struct DecodeProblem {
  std::int32_t batch_size = 0;
  std::int32_t num_q_heads = 0;
  std::int32_t num_kv_heads = 0;
  std::int32_t head_dim = 0;
  DType kv_dtype = DType::kBF16;
  DType q_dtype = DType::kF32;
  DType o_dtype = DType::kF32;
  std::optional<float> sm_scale;  // default 1/sqrt(head_dim)

  constexpr std::int32_t group_size() const noexcept {
    return num_kv_heads > 0 ? num_q_heads / num_kv_heads : 0;
  }
  float scale() const noexcept {
    return sm_scale ? *sm_scale : 1.0f / std::sqrt(static_cast<float>(head_dim));
  }
};

}  // namespace hattn
