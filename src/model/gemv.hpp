#pragma once
// Decode-time projections (a few tokens times a large weight matrix) are bound
// by reading the weights: a fused widen-and-dot kernel reads each weight once,
// in its stored dtype, without staging it as f32. One translation unit per ISA
// (AVX-512, AVX2, portable), without Eigen (DESIGN.md: never Eigen in an
// ISA-flagged TU). A token's results do not depend on the other tokens of the
// call (gemv_kernel.hpp), so batching never changes a sequence's logits.

#include <cstdint>

#include "hattn/core/dtype.hpp"

namespace hattn::model::detail {

// Largest token count the fused kernel takes.
inline constexpr std::int64_t kGemvMaxTokens = 16;

// y[t * y_stride + r] = dot(x[t * in ...], W[r]) for rows [r0, r1) of
// W [out][in] (stored in `dtype`, any alignment) and t < num_tokens.
// gemv_rows_<isa> runs only where the CPU has that ISA (cpu_isa_default()).
void gemv_rows_avx512(const void* w, DType dtype, std::int64_t in, std::int64_t r0, std::int64_t r1,
                      const float* x, std::int64_t num_tokens, float* y,
                      std::int64_t y_stride) noexcept;
void gemv_rows_avx2(const void* w, DType dtype, std::int64_t in, std::int64_t r0, std::int64_t r1,
                    const float* x, std::int64_t num_tokens, float* y,
                    std::int64_t y_stride) noexcept;
void gemv_rows_scalar(const void* w, DType dtype, std::int64_t in, std::int64_t r0, std::int64_t r1,
                      const float* x, std::int64_t num_tokens, float* y,
                      std::int64_t y_stride) noexcept;

}  // namespace hattn::model::detail
