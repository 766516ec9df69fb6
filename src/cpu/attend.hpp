#pragma once
// The interface between the dense driver (baseline code) and the per-ISA
// attention kernels. A kernel folds a run of K/V rows into a running
// online-softmax state for a group of query heads.

#include <cstddef>
#include <cstdint>

#include "hattn/core/dtype.hpp"
#include "hattn/core/supported.hpp"

namespace hattn::cpu::detail {

// Heads of one pass: NH consecutive KV heads, each with G query heads. All
// per-head arrays are [NH][G][...]. Row pointers address the first KV head;
// head j's rows are `j * k_head_stride` bytes further. Walking all heads of a
// block of rows before the next block reads a page of an HND (or NHD) pool
// front to back, which the memory system streams far better than one head's
// 4 KiB slice of every page.
struct AttendArgs {
  const float* q;             // [NH][G][D], kernel order, scaled by scale * log2(e)
  float* acc;                 // [NH][G][D], kernel order, sum of 2^(s - m) v
  float* m;                   // [NH][G] running max of base-2 scores
  float* l;                   // [NH][G] running sum of 2^(s - m)
  std::int32_t NH;            // KV heads
  std::int32_t G;             // query heads per KV head, 1..kMaxGroupPerPass
  const std::byte* const* k;  // n + n_ahead row pointers (first KV head)
  const std::byte* const* v;
  std::ptrdiff_t k_head_stride;  // bytes
  std::ptrdiff_t v_head_stride;
  std::int32_t n;        // rows to attend
  std::int32_t n_ahead;  // further rows the kernel may prefetch
};

// NH * G of one pass never exceeds this.
inline constexpr int kMaxHeadsPerPass = 64;

using AttendFn = void (*)(const AttendArgs&) noexcept;

// A kernel for one (ISA, head dim, KV dtype). Kernels may keep head-dim
// elements in a permuted "kernel order": within each block of `perm_block`
// elements, the even elements come first, then the odd ones (0: natural).
struct Kernel {
  AttendFn attend = nullptr;
  std::int32_t perm_block = 0;
};

// Index in natural order of kernel-order element i.
constexpr std::int32_t natural_index(std::int32_t i, std::int32_t perm_block) noexcept {
  if (perm_block == 0) return i;
  const std::int32_t base = i / perm_block * perm_block, j = i % perm_block, half = perm_block / 2;
  return base + (j < half ? 2 * j : 2 * (j - half) + 1);
}

Kernel kernel_scalar(std::int32_t head_dim, DType kv) noexcept;
Kernel kernel_avx2(std::int32_t head_dim, DType kv) noexcept;
Kernel kernel_avx512(std::int32_t head_dim, DType kv) noexcept;

inline Kernel kernel_for(CpuIsa isa, std::int32_t head_dim, DType kv) noexcept {
  switch (isa) {
    case CpuIsa::kAvx512: return kernel_avx512(head_dim, kv);
    case CpuIsa::kAvx2: return kernel_avx2(head_dim, kv);
    case CpuIsa::kScalar: break;
  }
  return kernel_scalar(head_dim, kv);
}

}  // namespace hattn::cpu::detail
