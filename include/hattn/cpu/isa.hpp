#pragma once
// Which CPU kernels this machine can run. Chosen once at run time; the
// environment variable HATTN_CPU_ISA=avx512|avx2|scalar forces a lower one
// (never a higher one than the CPU supports).

#include <string_view>

#include "hattn/core/supported.hpp"

namespace hattn {

constexpr std::string_view to_string(CpuIsa isa) noexcept {
  switch (isa) {
    case CpuIsa::kScalar: return "scalar";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kAvx512: return "avx512";
  }
  return "?";
}

// The best ISA the CPU (and OS) support, ignoring the environment.
CpuIsa cpu_isa_supported() noexcept;
// Whether `isa` can run here.
bool cpu_isa_available(CpuIsa isa) noexcept;
// Whether the CPU has AVX512_BF16 dot products (used inside the AVX-512 kernels).
bool cpu_has_avx512_bf16() noexcept;
// cpu_isa_supported(), lowered by HATTN_CPU_ISA when set (an unknown or
// unavailable value is ignored).
CpuIsa cpu_isa_default() noexcept;

}  // namespace hattn
