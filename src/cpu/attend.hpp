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
  const std::byte* const* k;  // n row pointers (first KV head)
  const std::byte* const* v;
  std::ptrdiff_t k_head_stride;  // bytes
  std::ptrdiff_t v_head_stride;
  std::int32_t n;  // rows to attend
  // Kernels with a score transform (the LSH-sampled one) read their
  // per-call context here; plain kernels ignore it.
  const void* ctx = nullptr;
  // Rows of one KV head walked before the next head (rounded down to a
  // multiple of the kernel's block; <= one block: every head of a block, then
  // the next block). When a head's rows are contiguous for a whole page (HND
  // pages of 32 or more tokens), a visit of one page reads one run of memory
  // and loads the head's q and accumulators once per page instead of once
  // per block (docs/cpu-dense.md, "Why compute and memory added up").
  std::int32_t visit = 0;
};

// NH * G of one pass never exceeds this.
inline constexpr int kMaxHeadsPerPass = 64;

using AttendFn = void (*)(const AttendArgs&) noexcept;

// Where kernels keep head-dim element i ("kernel order") of q and of the
// accumulators, within each block of `order_block` elements:
//   kNatural:     element i
//   kEvenOdd:     the even elements first, then the odd ones (bf16 widened by
//                 shift and mask: no shuffles)
//   kUnpackPairs: per 128-bit lane of 8 elements, the low 4 then the high 4
//                 (the lanes of unpacklo/hi_epi16 of two rows)
enum class Order : std::uint8_t { kNatural, kEvenOdd, kUnpackPairs };

// A kernel for one (ISA, head dim, KV dtype, precision).
struct Kernel {
  AttendFn attend = nullptr;
  Order q_order = Order::kNatural;
  Order acc_order = Order::kNatural;
  std::int32_t order_block = 0;
};

// Index in natural order of kernel-order element i.
constexpr std::int32_t natural_index(std::int32_t i, Order order, std::int32_t block) noexcept {
  if (order == Order::kNatural) return i;
  const std::int32_t base = i / block * block, j = i % block, half = block / 2;
  if (order == Order::kEvenOdd) return base + (j < half ? 2 * j : 2 * (j - half) + 1);
  // kUnpackPairs: j < half comes from unpacklo (elements 8L + 0..3), the rest
  // from unpackhi (8L + 4..7), L = 128-bit lane.
  const std::int32_t k = j < half ? j : j - half;
  return base + 8 * (k / 4) + (j < half ? 0 : 4) + k % 4;
}

Kernel kernel_scalar(std::int32_t head_dim, DType kv) noexcept;
Kernel kernel_avx2(std::int32_t head_dim, DType kv) noexcept;
// bf16_products: use AVX512_BF16 dot products (q and the softmax weights
// rounded to bf16) for bf16 KV. The caller checks the CPU has them.
Kernel kernel_avx512(std::int32_t head_dim, DType kv, bool bf16_products) noexcept;

inline Kernel kernel_for(CpuIsa isa, std::int32_t head_dim, DType kv, bool bf16_products) noexcept {
  switch (isa) {
    case CpuIsa::kAvx512: return kernel_avx512(head_dim, kv, bf16_products);
    case CpuIsa::kAvx2: return kernel_avx2(head_dim, kv);
    case CpuIsa::kScalar: break;
  }
  return kernel_scalar(head_dim, kv);
}

}  // namespace hattn::cpu::detail
