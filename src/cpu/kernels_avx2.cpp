// AVX2 + FMA + F16C kernels; see kernels_avx512.cpp for the rules of ISA TUs.
#include "cpu/attend_simd.hpp"

namespace hattn::cpu::detail {
Kernel kernel_avx2(std::int32_t head_dim, DType kv) noexcept {
  return simd_kernel<xsimd::fma3<xsimd::avx2>>(head_dim, kv);
}
}  // namespace hattn::cpu::detail
