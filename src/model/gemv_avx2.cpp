// AVX2 fused GEMV for the model's decode projections (see gemv.hpp).
// Compiled with AVX2 + FMA + F16C flags; reached only when the CPU has them.

#include <immintrin.h>

#include <cstring>

#include "model/gemv.hpp"
#include "model/gemv_kernel.hpp"

namespace hattn::model::detail {
namespace {

struct Avx2 {
  using Reg = __m256;
  static constexpr int kLanes = 8;
  static Reg zero() noexcept { return _mm256_setzero_ps(); }
  static Reg fma(Reg a, Reg b, Reg c) noexcept { return _mm256_fmadd_ps(a, b, c); }
  static float sum(Reg v) noexcept {
    const __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
  }
  template <DType kDtype>
  static Reg load_w(const unsigned char* row, std::int64_t i) noexcept {
    if constexpr (kDtype == DType::kF32) {
      return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + i);
    } else {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * i));
      if constexpr (kDtype == DType::kBF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      else
        return _mm256_cvtph_ps(h);
    }
  }
  // Tails (in not a multiple of 8) go through a zeroed copy: no masked 16-bit loads here.
  template <DType kDtype>
  static Reg load_w_tail(const unsigned char* row, std::int64_t i, int n) noexcept {
    alignas(32) unsigned char buf[32] = {};
    constexpr std::int64_t kBytes = gemv::kElemBytes<kDtype>;
    std::memcpy(buf, row + kBytes * i, static_cast<std::size_t>(n * kBytes));
    return load_w<kDtype>(buf, 0);
  }
  static Reg load_x(const float* p) noexcept { return _mm256_loadu_ps(p); }
  static Reg load_x_tail(const float* p, int n) noexcept {
    alignas(32) float buf[8] = {};
    std::memcpy(buf, p, static_cast<std::size_t>(n) * sizeof(float));
    return _mm256_load_ps(buf);
  }
};

}  // namespace

void gemv_rows_avx2(const void* w, DType dtype, std::int64_t in, std::int64_t r0, std::int64_t r1,
                    const float* x, std::int64_t num_tokens, float* y,
                    std::int64_t y_stride) noexcept {
  gemv::run<Avx2>(w, dtype, in, r0, r1, x, num_tokens, y, y_stride);
}

}  // namespace hattn::model::detail
