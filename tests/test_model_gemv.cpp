// The decode GEMV of hattn::model (src/model/gemv*.cpp) on every ISA the host
// has: against a double-precision dot product, and batch invariance (a token's
// row of results is bitwise the same whether the call had 1 or 16 tokens),
// which is what lets micro-batched and whole-batch decoders agree bitwise.

#include <catch2/catch.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <sstream>
#include <vector>

#include "common/seed.hpp"
#include "hattn/core/dtype.hpp"
#include "hattn/cpu/isa.hpp"
#include "model/gemv.hpp"

namespace {

using hattn::DType;
namespace hd = hattn::model::detail;
using GemvFn = void (*)(const void*, DType, std::int64_t, std::int64_t, std::int64_t, const float*,
                        std::int64_t, float*, std::int64_t) noexcept;

struct IsaGemv {
  hattn::CpuIsa isa;
  GemvFn fn;
};

std::vector<IsaGemv> available_gemvs() {
  std::vector<IsaGemv> out = {{hattn::CpuIsa::kScalar, hd::gemv_rows_scalar}};
  if (hattn::cpu_isa_available(hattn::CpuIsa::kAvx2))
    out.push_back({hattn::CpuIsa::kAvx2, hd::gemv_rows_avx2});
  if (hattn::cpu_isa_available(hattn::CpuIsa::kAvx512))
    out.push_back({hattn::CpuIsa::kAvx512, hd::gemv_rows_avx512});
  return out;
}

// Weights of `dtype` in raw bytes, and their values as double.
struct Weights {
  std::vector<unsigned char> bytes;
  std::vector<double> values;
};

Weights random_weights(DType dtype, std::int64_t n, std::mt19937_64& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  Weights w;
  w.bytes.resize(static_cast<std::size_t>(n) * hattn::size_of(dtype));
  w.values.resize(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) {
    hattn::store_from_float(w.bytes.data(), dtype, i, nd(rng));
    w.values[static_cast<std::size_t>(i)] = hattn::load_as_float(w.bytes.data(), dtype, i);
  }
  return w;
}

}  // namespace

TEST_CASE("decode GEMV: double reference and batch invariance on every ISA", "[model][gemv]") {
  constexpr float kGuard = -12345.0f;
  for (const IsaGemv& g : available_gemvs()) {
    for (const DType dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
      for (const std::int64_t in :
           {std::int64_t{7}, std::int64_t{77}, std::int64_t{128}, std::int64_t{392}}) {
        std::ostringstream tag;
        tag << "gemv " << hattn::to_string(g.isa) << ' ' << hattn::to_string(dtype) << " in=" << in;
        INFO(tag.str() << ", " << hattn_test::seed_note());
        auto rng = hattn_test::make_rng(tag.str());
        constexpr std::int64_t kOut = 37, kMaxTokens = hd::kGemvMaxTokens;
        const Weights w = random_weights(dtype, kOut * in, rng);
        std::normal_distribution<float> nd(0.0f, 1.0f);
        std::vector<float> x(static_cast<std::size_t>(kMaxTokens * in));
        for (float& v : x) v = nd(rng);
        // Rows [r0, r1) of a y with a wider stride than kOut: the rest keeps its guard.
        constexpr std::int64_t r0 = 3, r1 = 34, kStride = kOut + 5;
        for (std::int64_t tokens = 1; tokens <= kMaxTokens; ++tokens) {
          std::vector<float> y(static_cast<std::size_t>(tokens * kStride), kGuard);
          g.fn(w.bytes.data(), dtype, in, r0, r1, x.data(), tokens, y.data(), kStride);
          for (std::int64_t t = 0; t < tokens; ++t) {
            // The same token alone.
            std::vector<float> y1(static_cast<std::size_t>(kStride), kGuard);
            g.fn(w.bytes.data(), dtype, in, r0, r1, x.data() + t * in, 1, y1.data(), kStride);
            for (std::int64_t r = 0; r < kStride; ++r) {
              const float got = y[static_cast<std::size_t>(t * kStride + r)];
              INFO("tokens=" << tokens << " t=" << t << " r=" << r);
              if (r < r0 || r >= r1) {
                REQUIRE(got == kGuard);
                continue;
              }
              REQUIRE(std::bit_cast<std::uint32_t>(got) ==
                      std::bit_cast<std::uint32_t>(y1[static_cast<std::size_t>(r)]));
              double ref = 0.0, mag = 0.0;
              for (std::int64_t i = 0; i < in; ++i) {
                const double p = w.values[static_cast<std::size_t>(r * in + i)] *
                                 static_cast<double>(x[static_cast<std::size_t>(t * in + i)]);
                ref += p;
                mag += std::abs(p);
              }
              // f32 accumulation of `in` products: |error| <= in * 2^-24 * sum |w x|
              // (first-order bound for any summation order).
              const double bound = static_cast<double>(in) * 0x1p-24 * mag;
              REQUIRE(std::abs(static_cast<double>(got) - ref) <= bound);
            }
          }
        }
      }
    }
  }
}
