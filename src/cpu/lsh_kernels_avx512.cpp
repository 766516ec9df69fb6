// AVX-512 LSH kernels; the rules of kernels_avx512.cpp apply (no Eigen here).
#include "cpu/lsh_simd.hpp"

namespace hattn::cpu::detail {
ScanFn lsh_scan_avx512() noexcept { return &MarkScan<xsimd::avx512f>::run; }
HashFn lsh_hash_avx512() noexcept { return &LshHash<xsimd::avx512f>::run; }
Kernel lsh_kernel_avx512(std::int32_t head_dim, DType kv) noexcept {
  return lsh_kernel_simd<xsimd::avx512f>(head_dim, kv);
}
}  // namespace hattn::cpu::detail
