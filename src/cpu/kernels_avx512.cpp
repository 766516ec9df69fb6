// AVX-512 kernels. Compiled with AVX-512 flags; called only after run-time
// detection. Never include Eigen (or other inline-heavy headers) here: their
// inline functions would be compiled with these flags too and the linker may
// pick this copy for baseline code.
#include "cpu/attend_bf16dot.hpp"
#include "cpu/attend_simd.hpp"

namespace hattn::cpu::detail {
Kernel kernel_avx512(std::int32_t head_dim, DType kv, bool bf16_products) noexcept {
  if (bf16_products && kv == DType::kBF16) return bf16dot_kernel(head_dim);
  return simd_kernel<xsimd::avx512f>(head_dim, kv);
}
}  // namespace hattn::cpu::detail
