// AVX2 + FMA + F16C LSH kernels; the rules of kernels_avx512.cpp apply.
#include "cpu/lsh_simd.hpp"

namespace hattn::cpu::detail {
ScanFn lsh_scan_avx2() noexcept { return &MarkScan<xsimd::fma3<xsimd::avx2>>::run; }
HashFn lsh_hash_avx2() noexcept { return &LshHash<xsimd::fma3<xsimd::avx2>>::run; }
Kernel lsh_kernel_avx2(std::int32_t head_dim, DType kv) noexcept {
  return lsh_kernel_simd<xsimd::fma3<xsimd::avx2>>(head_dim, kv);
}
}  // namespace hattn::cpu::detail
