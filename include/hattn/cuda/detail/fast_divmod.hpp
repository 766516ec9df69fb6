#pragma once
// Division by a run-time constant without a divide instruction: the kernels
// turn a token index into (page, offset) for every row they read, and an
// integer division costs about 20 instructions on a GPU. The host computes
// (multiplier, shift) once per plan; the device does a multiply-high, an add
// and a shift (Granlund & Montgomery, "Division by invariant integers using
// multiplication", 1994).
//
// Exact for every dividend n in [0, 2^31) and divisor in [1, 2^31).

#include <cstdint>

#include "hattn/cuda/detail/host_device.hpp"

namespace hattn::cuda::detail {

struct FastDivmod {
  std::uint32_t divisor = 1;
  std::uint32_t multiplier = 1;
  std::uint32_t shift = 0;

  // divisor in [1, 2^31).
  static FastDivmod make(std::uint32_t d) noexcept {
    FastDivmod f;
    f.divisor = d;
    std::uint32_t s = 0;
    while ((std::uint64_t{1} << s) < d) ++s;  // s = ceil(log2 d)
    f.shift = s;
    // m = floor(2^32 (2^s - d) / d) + 1: with q = (umulhi(n, m) + n) >> s the
    // quotient is exact for n < 2^31 (2^s - d < d, so m < 2^32).
    f.multiplier = static_cast<std::uint32_t>((((std::uint64_t{1} << s) - d) << 32) / d + 1);
    return f;
  }

  HATTN_HOST_DEVICE std::uint32_t div(std::uint32_t n) const noexcept {
#if defined(__CUDA_ARCH__)
    const std::uint32_t hi = __umulhi(n, multiplier);
#else
    const auto hi = static_cast<std::uint32_t>((std::uint64_t{n} * multiplier) >> 32);
#endif
    return (hi + n) >> shift;  // hi <= n < 2^31: no overflow
  }
  // n = q * divisor + r.
  HATTN_HOST_DEVICE void divmod(std::uint32_t n, std::uint32_t& q,
                                std::uint32_t& r) const noexcept {
    q = div(n);
    r = n - q * divisor;
  }
};

}  // namespace hattn::cuda::detail
