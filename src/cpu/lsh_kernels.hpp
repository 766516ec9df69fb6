#pragma once
// The interface between the LSH driver (baseline code) and its per-ISA
// kernels: hashing (sign bits of a block of dot products with the planes),
// and the two passes of attention over gathered rows.

#include <cstddef>
#include <cstdint>

#include "cpu/attend.hpp"
#include "hattn/core/dtype.hpp"

namespace hattn::cpu::detail {

// bits[r * (J / 64) + w] bit i = [x_r . plane_(64 w + i) > 0] for rows of x
// ([rows][D], `x_stride` floats apart) and planes wt ([D][J], J % 64 == 0).
using HashFn = void (*)(const float* x, std::int64_t rows, std::int64_t x_stride, std::int32_t D,
                        const float* wt, std::int32_t J, std::uint64_t* bits) noexcept;

// The sampled part runs the dense kernels (AttendArgs: rows by pointer,
// online softmax in base 2, q pre-scaled by qscale = scale log2 e) with a
// score transform. For head g (of the pass) and row j the kernel's score
// s = qscale q_g.k_j becomes
//   s + log2(e) corr(cos),  cos = (s / qscale - qmu[g]) / (qn[g] kn[j])
// with kn[j] = |k_j - mu| computed by the kernel from the row it loads (a
// stored norm per key would be one more random cache miss per sampled row)
// (cos clamped to [-1, 1]; 0 when kn[j] = 0), corr linearly interpolated in a
// table of -ln(u + eps) at cos = -1 + 2 i / intervals (no correction when
// corr is null), and -inf where umask[j] lacks bit g (head g did not sample
// row j; a null umask means every row is sampled by every head). AttendArgs::ctx
// points to this; AttendArgs::NH must be 1.
struct LshScoreCtx {
  const float* mu;             // [D], 64-byte aligned: the key mean, in the kernel's q order
  const std::uint16_t* umask;  // [n + kLshPad] (the padding is read, not used), or null
  const float* qn;             // [G]
  const float* qmu;            // [G]: q_g . mu
  float inv_qscale;
  const float* corr;  // [intervals + 1] or null
  std::int32_t intervals;
};
inline constexpr std::int32_t kLshPad = 16;

// corr(cos) as LshScoreCtx defines it, one value at a time (the portable
// kernel, and LshAttention::score_correction; the SIMD kernels do the same
// per vector). cos must be in [-1, 1].
inline float lsh_correction(const float* corr, std::int32_t intervals, float cos) noexcept {
  const float x = (cos + 1.0f) * (0.5f * static_cast<float>(intervals));
  const std::int32_t i =
      static_cast<std::int32_t>(x) < intervals - 1 ? static_cast<std::int32_t>(x) : intervals - 1;
  const float f = x - static_cast<float>(i);
  return corr[i] + f * (corr[i + 1] - corr[i]);
}

HashFn lsh_hash_scalar() noexcept;
HashFn lsh_hash_avx2() noexcept;
HashFn lsh_hash_avx512() noexcept;
Kernel lsh_kernel_scalar(std::int32_t head_dim, DType kv) noexcept;
Kernel lsh_kernel_avx2(std::int32_t head_dim, DType kv) noexcept;
Kernel lsh_kernel_avx512(std::int32_t head_dim, DType kv) noexcept;

inline HashFn lsh_hash_for(CpuIsa isa) noexcept {
  switch (isa) {
    case CpuIsa::kAvx512: return lsh_hash_avx512();
    case CpuIsa::kAvx2: return lsh_hash_avx2();
    case CpuIsa::kScalar: break;
  }
  return lsh_hash_scalar();
}

inline Kernel lsh_kernel_for(CpuIsa isa, std::int32_t head_dim, DType kv) noexcept {
  switch (isa) {
    case CpuIsa::kAvx512: return lsh_kernel_avx512(head_dim, kv);
    case CpuIsa::kAvx2: return lsh_kernel_avx2(head_dim, kv);
    case CpuIsa::kScalar: break;
  }
  return lsh_kernel_scalar(head_dim, kv);
}

}  // namespace hattn::cpu::detail
