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

// dots[g * ld + j] = q_g . k_j for n gathered rows; q is [G][D] in kernel order.
using DotsFn = void (*)(const float* q, std::int32_t G, const std::byte* const* k, std::int32_t n,
                        float* dots, std::int32_t ld) noexcept;

// acc[g][:] += sum_j w[g * ld + j] v_j; acc is [G][D] in kernel order.
using AccumulateFn = void (*)(const float* w, std::int32_t ld, std::int32_t G,
                              const std::byte* const* v, std::int32_t n, float* acc) noexcept;

struct LshKernels {
  DotsFn dots = nullptr;
  AccumulateFn accumulate = nullptr;
  Order order = Order::kNatural;  // of q and acc
  std::int32_t order_block = 0;
};

HashFn lsh_hash_scalar() noexcept;
HashFn lsh_hash_avx2() noexcept;
HashFn lsh_hash_avx512() noexcept;
LshKernels lsh_kernels_scalar(std::int32_t head_dim, DType kv) noexcept;
LshKernels lsh_kernels_avx2(std::int32_t head_dim, DType kv) noexcept;
LshKernels lsh_kernels_avx512(std::int32_t head_dim, DType kv) noexcept;

inline HashFn lsh_hash_for(CpuIsa isa) noexcept {
  switch (isa) {
    case CpuIsa::kAvx512: return lsh_hash_avx512();
    case CpuIsa::kAvx2: return lsh_hash_avx2();
    case CpuIsa::kScalar: break;
  }
  return lsh_hash_scalar();
}

inline LshKernels lsh_kernels_for(CpuIsa isa, std::int32_t head_dim, DType kv) noexcept {
  switch (isa) {
    case CpuIsa::kAvx512: return lsh_kernels_avx512(head_dim, kv);
    case CpuIsa::kAvx2: return lsh_kernels_avx2(head_dim, kv);
    case CpuIsa::kScalar: break;
  }
  return lsh_kernels_scalar(head_dim, kv);
}

}  // namespace hattn::cpu::detail
