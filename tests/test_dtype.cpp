// bf16 / f16 conversions (core/dtype.hpp): exhaustive over the 16-bit
// patterns, every rounding tie, and millions of random floats against an
// independent exact reference and (for f16) the F16C instructions.

#include <catch2/catch.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/catch_print.hpp"
#include "common/seed.hpp"
#include "hattn/core/dtype.hpp"

using hattn::bf16;
using hattn::f16;

namespace {

std::uint32_t bits_of(float x) { return std::bit_cast<std::uint32_t>(x); }
float float_of(std::uint32_t u) { return std::bit_cast<float>(u); }
std::string hex(std::uint32_t u) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", u);
  return buf;
}

bool f16_is_nan(std::uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }
bool bf16_is_nan(std::uint16_t b) { return (b & 0x7f80u) == 0x7f80u && (b & 0x7fu) != 0; }

// Value of a non-negative 16-bit pattern in double; the infinity pattern
// stands for the next power of two (where rounding to it means overflow).
double f16_value(std::uint16_t mag) {
  const int e = mag >> 10, m = mag & 0x3ff;
  if (e == 0) return std::ldexp(m, -24);
  return std::ldexp(1024 + m, e - 25);  // e == 31, m == 0: 2^16
}
double bf16_value(std::uint16_t mag) {
  if ((mag & 0x7f80u) == 0x7f80u) return std::ldexp(1.0, 128);
  return static_cast<double>(float_of(static_cast<std::uint32_t>(mag) << 16));
}

// Round |x| to nearest, ties to even, among magnitudes 0..max_finite (plus
// the infinity pattern above it): binary search for the largest pattern not
// above |x|, then pick between it and the next one. Independent of dtype.hpp.
template <class Value>
std::uint16_t round_reference(float x, std::uint16_t inf_pattern, Value value) {
  const double a = std::abs(static_cast<double>(x));
  std::uint16_t lo = 0, hi = inf_pattern;  // value(lo) <= a, search in [lo, hi)
  const std::uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  if (a >= value(inf_pattern)) return static_cast<std::uint16_t>(sign | inf_pattern);
  while (hi - lo > 1) {
    const auto mid = static_cast<std::uint16_t>((lo + hi) / 2);
    if (value(mid) <= a)
      lo = mid;
    else
      hi = mid;
  }
  const std::uint16_t up = static_cast<std::uint16_t>(lo + 1);
  const double dlo = a - value(lo), dup = value(up) - a;
  const std::uint16_t r = dlo < dup ? lo : (dup < dlo ? up : ((lo & 1) ? up : lo));
  return static_cast<std::uint16_t>(sign | r);
}
std::uint16_t f16_reference(float x) { return round_reference(x, 0x7c00, f16_value); }
std::uint16_t bf16_reference(float x) { return round_reference(x, 0x7f80, bf16_value); }

#if defined(__x86_64__)
__attribute__((target("f16c"))) std::uint16_t f16c_from_float(float x) {
  return static_cast<std::uint16_t>(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT));
}
__attribute__((target("f16c"))) float f16c_to_float(std::uint16_t h) { return _cvtsh_ss(h); }
bool have_f16c() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("f16c");
}
#else
bool have_f16c() { return false; }
std::uint16_t f16c_from_float(float) { return 0; }
float f16c_to_float(std::uint16_t) { return 0; }
#endif

// Floats that stress conversions: random bit patterns (every exponent,
// subnormals, inf, NaN) and random values around the f16 range.
class FloatSource {
 public:
  explicit FloatSource(std::mt19937_64& rng) : rng_(rng) {}
  float next() {
    const std::uint64_t r = rng_();
    switch (r & 3) {
      case 0:
      case 1: return float_of(static_cast<std::uint32_t>(r >> 32));
      case 2: {  // exponent in f16's range and a bit beyond: 2^-26 .. 2^17
        const auto e = static_cast<std::uint32_t>(101 + (r >> 8) % 43);
        return float_of(static_cast<std::uint32_t>((r >> 63) << 31) | e << 23 |
                        static_cast<std::uint32_t>(r >> 32 & 0x7fffffu));
      }
      default: {
        const float specials[] = {0.0f,
                                  -0.0f,
                                  std::numeric_limits<float>::infinity(),
                                  -std::numeric_limits<float>::infinity(),
                                  std::numeric_limits<float>::quiet_NaN(),
                                  float_of(0x7f800001u),  // signalling NaN
                                  float_of(0xffc12345u),
                                  std::numeric_limits<float>::denorm_min(),
                                  std::numeric_limits<float>::min(),
                                  std::numeric_limits<float>::max(),
                                  65504.0f,
                                  65519.996f,
                                  65520.0f,
                                  std::ldexp(1.0f, -24),
                                  std::ldexp(1.0f, -25),
                                  std::ldexp(1.5f, -25),
                                  std::ldexp(1.0f, -14),
                                  3.3895314e38f};
        return specials[(r >> 8) % std::size(specials)];
      }
    }
  }

 private:
  std::mt19937_64& rng_;
};

}  // namespace

TEST_CASE("every f16 pattern widens exactly and round-trips", "[dtype]") {
  const bool hw = have_f16c();
  std::uint32_t bad_roundtrip = 0, bad_widen = 0, first_bad = 0;
  for (std::uint32_t i = 0; i < 0x10000u; ++i) {
    const auto h = static_cast<std::uint16_t>(i);
    const float x = hattn::to_float(f16{h});
    if (f16_is_nan(h)) {
      if (!std::isnan(x) || std::signbit(x) != ((h & 0x8000u) != 0) ||
          !f16_is_nan(hattn::to_f16(x).bits)) {
        if (bad_roundtrip++ == 0) first_bad = i;
      }
      continue;
    }
    if (hattn::to_f16(x).bits != h && bad_roundtrip++ == 0) first_bad = i;
    // Exact value: sign * significand * 2^exp, computed independently.
    const double want = ((h & 0x8000u) ? -1.0 : 1.0) * f16_value(h & 0x7fffu);
    const bool inf = (h & 0x7fffu) == 0x7c00u;
    if (!(inf ? std::isinf(x) && (x < 0) == ((h & 0x8000u) != 0) : static_cast<double>(x) == want))
      ++bad_widen;
    if (hw && bits_of(f16c_to_float(h)) != bits_of(x)) ++bad_widen;
  }
  INFO("first bad pattern " << hex(first_bad));
  CHECK(bad_roundtrip == 0);
  CHECK(bad_widen == 0);
}

TEST_CASE("every bf16 pattern widens exactly and round-trips", "[dtype]") {
  std::uint32_t bad = 0, first_bad = 0;
  for (std::uint32_t i = 0; i < 0x10000u; ++i) {
    const auto b = static_cast<std::uint16_t>(i);
    const float x = hattn::to_float(bf16{b});
    bool ok = bits_of(x) == i << 16;
    if (bf16_is_nan(b))
      ok = ok && bf16_is_nan(hattn::to_bf16(x).bits) &&
           (hattn::to_bf16(x).bits & 0x8000u) == (b & 0x8000u);
    else
      ok = ok && hattn::to_bf16(x).bits == b;
    if (!ok && bad++ == 0) first_bad = i;
  }
  INFO("first bad pattern " << hex(first_bad));
  CHECK(bad == 0);
}

TEST_CASE("f16 and bf16 round every tie to even and everything else to nearest", "[dtype]") {
  // For each pair of adjacent positive values (the last pair's upper value
  // being the overflow threshold), the midpoint goes to the even pattern and
  // one float ulp either side goes to the nearer value; both signs.
  std::uint32_t bad = 0;
  std::string first;
  const auto expect = [&](float x, std::uint16_t got, std::uint16_t want) {
    if (got == want) return;
    if (bad++ == 0) first = hex(bits_of(x)) + " -> " + hex(got) + ", want " + hex(want);
  };
  for (std::uint16_t lo = 0; lo < 0x7c00; ++lo) {
    const auto up = static_cast<std::uint16_t>(lo + 1);
    const double mid = (f16_value(lo) + f16_value(up)) / 2;
    const auto m = static_cast<float>(mid);
    REQUIRE(static_cast<double>(m) == mid);  // f16 midpoints are floats
    const std::uint16_t even = (lo & 1) ? up : lo;
    for (const float sign : {1.0f, -1.0f}) {
      const std::uint16_t s = sign < 0 ? 0x8000 : 0;
      expect(sign * m, hattn::to_f16(sign * m).bits, static_cast<std::uint16_t>(s | even));
      const float below = std::nextafter(m, 0.0f), above = std::nextafter(m, 1e30f);
      expect(sign * below, hattn::to_f16(sign * below).bits, static_cast<std::uint16_t>(s | lo));
      expect(sign * above, hattn::to_f16(sign * above).bits, static_cast<std::uint16_t>(s | up));
    }
  }
  for (std::uint32_t lo = 0; lo < 0x7f80; ++lo) {
    const std::uint32_t up = lo + 1;
    const float m = float_of(lo << 16 | 0x8000u);  // exactly between lo and up
    const std::uint32_t even = (lo & 1) ? up : lo;
    for (const std::uint32_t s : {0u, 0x8000u}) {
      const float sm = float_of(bits_of(m) | s << 16);
      expect(sm, hattn::to_bf16(sm).bits, static_cast<std::uint16_t>(s | even));
      const float below = float_of(bits_of(sm) - 1), above = float_of(bits_of(sm) + 1);
      expect(below, hattn::to_bf16(below).bits, static_cast<std::uint16_t>(s | lo));
      expect(above, hattn::to_bf16(above).bits, static_cast<std::uint16_t>(s | up));
    }
  }
  INFO("first failure: " << first);
  CHECK(bad == 0);
}

TEST_CASE("to_f16 and to_bf16 agree with exact rounding and F16C on random floats", "[dtype]") {
  std::mt19937_64 rng = hattn_test::make_rng("dtype/random");
  FloatSource src(rng);
  const bool hw = have_f16c();
  if (!hw) WARN("no F16C on this CPU: to_f16 checked against the software reference only");
  constexpr int kSamples = 1 << 21;
  int bad_f16 = 0, bad_f16c = 0, bad_bf16 = 0;
  std::string first;
  for (int i = 0; i < kSamples; ++i) {
    const float x = src.next();
    const std::uint16_t h = hattn::to_f16(x).bits, b = hattn::to_bf16(x).bits;
    if (std::isnan(x)) {
      // NaN stays NaN (the payload need not survive), sign kept.
      const bool s = std::signbit(x);
      if (!f16_is_nan(h) || ((h & 0x8000u) != 0) != s) ++bad_f16;
      if (!bf16_is_nan(b) || ((b & 0x8000u) != 0) != s) ++bad_bf16;
      if (hw && !f16_is_nan(f16c_from_float(x))) ++bad_f16c;
      continue;
    }
    if (h != f16_reference(x) && bad_f16++ == 0)
      first = "to_f16(" + hex(bits_of(x)) + ") = " + hex(h) + ", want " + hex(f16_reference(x));
    if (hw && h != f16c_from_float(x) && bad_f16c++ == 0)
      first = "to_f16(" + hex(bits_of(x)) + ") = " + hex(h) + ", F16C " + hex(f16c_from_float(x));
    if (b != bf16_reference(x) && bad_bf16++ == 0)
      first = "to_bf16(" + hex(bits_of(x)) + ") = " + hex(b) + ", want " + hex(bf16_reference(x));
  }
  INFO(first << "; " << hattn_test::seed_note());
  CHECK(bad_f16 == 0);
  CHECK(bad_f16c == 0);
  CHECK(bad_bf16 == 0);
}

TEST_CASE("dtype helpers: size, name, tag, from_float, load and store", "[dtype]") {
  using hattn::DType;
  STATIC_REQUIRE(hattn::size_of(DType::kF32) == 4);
  STATIC_REQUIRE(hattn::size_of(DType::kF16) == 2);
  STATIC_REQUIRE(hattn::size_of(DType::kBF16) == 2);
  STATIC_REQUIRE(hattn::dtype_of<float> == DType::kF32);
  STATIC_REQUIRE(hattn::dtype_of<f16> == DType::kF16);
  STATIC_REQUIRE(hattn::dtype_of<bf16> == DType::kBF16);
  STATIC_REQUIRE(hattn::to_bf16(1.0f).bits == 0x3f80);  // constexpr
  STATIC_REQUIRE(hattn::to_f16(1.0f).bits == 0x3c00);
  CHECK(hattn::to_string(DType::kF32) == "f32");
  CHECK(hattn::to_string(DType::kF16) == "f16");
  CHECK(hattn::to_string(DType::kBF16) == "bf16");
  CHECK(hattn::from_float<float>(0.1f) == 0.1f);
  CHECK(hattn::from_float<f16>(0.1f).bits == hattn::to_f16(0.1f).bits);
  CHECK(hattn::from_float<bf16>(0.1f).bits == hattn::to_bf16(0.1f).bits);
  for (const DType t : {DType::kF32, DType::kF16, DType::kBF16}) {
    unsigned char buf[4 * 4] = {};
    hattn::store_from_float(buf, t, 2, -2.5f);
    CHECK(hattn::load_as_float(buf, t, 2) == -2.5f);
    CHECK(hattn::load_as_float(buf, t, 1) == 0.0f);  // neighbours untouched
    CHECK(hattn::load_as_float(buf, t, 3) == 0.0f);
  }
}
