#pragma once
// Device helpers shared by the kernels: element access in a run-time dtype
// (queries, outputs: touched once per CTA, so a switch is fine) and widening
// of packed 16-bit KV words to f32 (the hot loop).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "hattn/core/dtype.hpp"

namespace hattn::cuda::detail {

__device__ __forceinline__ float load_as_f32(const void* p, DType t, std::int64_t i) {
  switch (t) {
    case DType::kF32: return static_cast<const float*>(p)[i];
    case DType::kF16: return __half2float(static_cast<const __half*>(p)[i]);
    case DType::kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
  return 0.0f;
}

// Round to nearest even, as hattn::store_from_float does on the host.
__device__ __forceinline__ void store_from_f32(void* p, DType t, std::int64_t i, float x) {
  switch (t) {
    case DType::kF32: static_cast<float*>(p)[i] = x; break;
    case DType::kF16: static_cast<__half*>(p)[i] = __float2half_rn(x); break;
    case DType::kBF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(x); break;
  }
}

// Storage bits of one KV element.
template <class T>
using KvBits = std::conditional_t<sizeof(T) == 2, std::uint16_t, std::uint32_t>;

// Widens the little-endian packed elements of `w` (N words) into f: element
// 2i is the low half of word i for 16-bit types.
template <class T, int N>
__device__ __forceinline__ void widen(const std::uint32_t (&w)[N], float (&f)[N * 4 / sizeof(T)]) {
  if constexpr (std::is_same_v<T, hattn::bf16>) {
    // bf16 is the top half of an f32: shift or mask, no conversion instruction.
#pragma unroll
    for (int i = 0; i < N; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  } else if constexpr (std::is_same_v<T, hattn::f16>) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      f[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
      f[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) f[i] = __uint_as_float(w[i]);
  }
}

}  // namespace hattn::cuda::detail
