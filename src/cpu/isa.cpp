#include "hattn/cpu/isa.hpp"

#include <cstdlib>
#include <string_view>

namespace hattn {

CpuIsa cpu_isa_supported() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // AVX-512 kernels use F, BW, VL and DQ; AVX2 kernels use FMA and F16C;
  // both use POPCNT and BMI1 (every CPU with AVX2 has them).
  const bool bits = __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("bmi");
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") && bits)
    return CpuIsa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c") && bits)
    return CpuIsa::kAvx2;
#endif
  return CpuIsa::kScalar;
}

bool cpu_isa_available(CpuIsa isa) noexcept {
  return static_cast<int>(isa) <= static_cast<int>(cpu_isa_supported());
}

bool cpu_has_avx512_bf16() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  return cpu_isa_supported() == CpuIsa::kAvx512 && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

CpuIsa cpu_isa_default() noexcept {
  const CpuIsa best = cpu_isa_supported();
  const char* env = std::getenv("HATTN_CPU_ISA");
  if (env == nullptr) return best;
  const std::string_view s(env);
  CpuIsa want = best;
  if (s == "scalar")
    want = CpuIsa::kScalar;
  else if (s == "avx2")
    want = CpuIsa::kAvx2;
  else if (s == "avx512")
    want = CpuIsa::kAvx512;
  return cpu_isa_available(want) ? want : best;
}

}  // namespace hattn
