#pragma once
// Storage types. bf16 and f16 are 16-bit patterns, bit-compatible with CUDA's
// __nv_bfloat16 and __half; arithmetic always happens in f32 or wider.

#include <bit>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <type_traits>

namespace hattn {

enum class DType : std::uint8_t { kF32, kF16, kBF16 };

struct bf16 {
  std::uint16_t bits;
};
struct f16 {
  std::uint16_t bits;
};
static_assert(sizeof(bf16) == 2 && sizeof(f16) == 2);

constexpr std::size_t size_of(DType t) noexcept { return t == DType::kF32 ? 4 : 2; }

constexpr std::string_view to_string(DType t) noexcept {
  switch (t) {
    case DType::kF32: return "f32";
    case DType::kF16: return "f16";
    case DType::kBF16: return "bf16";
  }
  return "?";
}

template <class T>
inline constexpr DType dtype_of = DType::kF32;
template <>
inline constexpr DType dtype_of<f16> = DType::kF16;
template <>
inline constexpr DType dtype_of<bf16> = DType::kBF16;

// --- conversions (round to nearest even; NaN stays NaN) ----------------------

constexpr float to_float(float x) noexcept { return x; }

constexpr float to_float(bf16 x) noexcept {
  return std::bit_cast<float>(static_cast<std::uint32_t>(x.bits) << 16);
}

constexpr bf16 to_bf16(float x) noexcept {
  std::uint32_t u = std::bit_cast<std::uint32_t>(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<std::uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<std::uint16_t>(u >> 16)};
}

constexpr float to_float(f16 x) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(x.bits & 0x8000u) << 16;
  std::uint32_t exp = (x.bits >> 10) & 0x1fu;
  std::uint32_t man = x.bits & 0x3ffu;
  if (exp == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    if (man == 0) return std::bit_cast<float>(sign);
    // Subnormal: normalize.
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    man &= 0x3ffu;
    return std::bit_cast<float>(sign | (static_cast<std::uint32_t>(112 - e) << 23) | (man << 13));
  }
  return std::bit_cast<float>(sign | ((exp + 112) << 23) | (man << 13));
}

constexpr f16 to_f16(float x) noexcept {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(x);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16{static_cast<std::uint16_t>(sign | 0x7e00u)};   // NaN
  if (a >= 0x477ff000u) return f16{static_cast<std::uint16_t>(sign | 0x7c00u)};  // overflow -> inf
  if (a < 0x38800000u) {
    // Result is subnormal (or zero): value = a * 2^24 rounded, in units of 2^-24.
    if (a < 0x33000000u) return f16{sign};  // < 2^-25 rounds to zero
    const std::uint32_t e = a >> 23;
    const std::uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126 - e;  // 14..24
    std::uint32_t r = m >> shift;
    const std::uint32_t rem = m & ((1u << shift) - 1);
    const std::uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return f16{static_cast<std::uint16_t>(sign | r)};
  }
  std::uint32_t r = a - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return f16{static_cast<std::uint16_t>(sign | (r >> 13))};
}

template <class T>
constexpr T from_float(float x) noexcept {
  if constexpr (std::is_same_v<T, bf16>) {
    return to_bf16(x);
  } else if constexpr (std::is_same_v<T, f16>) {
    return to_f16(x);
  } else {
    static_assert(std::is_same_v<T, float>);
    return x;
  }
}

// Read element `i` of a buffer of runtime dtype `t` as float (slow path: tests, tails).
inline float load_as_float(const void* p, DType t, std::ptrdiff_t i) noexcept {
  switch (t) {
    case DType::kF32: return static_cast<const float*>(p)[i];
    case DType::kF16: return to_float(static_cast<const f16*>(p)[i]);
    case DType::kBF16: return to_float(static_cast<const bf16*>(p)[i]);
  }
  return 0.0f;
}

inline void store_from_float(void* p, DType t, std::ptrdiff_t i, float x) noexcept {
  switch (t) {
    case DType::kF32: static_cast<float*>(p)[i] = x; break;
    case DType::kF16: static_cast<f16*>(p)[i] = to_f16(x); break;
    case DType::kBF16: static_cast<bf16*>(p)[i] = to_bf16(x); break;
  }
}

}  // namespace hattn
