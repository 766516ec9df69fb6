// AVX-512 fused GEMV for the model's decode projections (see gemv.hpp).
// Compiled with AVX-512 flags; reached only when the CPU has AVX-512.

#include <immintrin.h>

#include "model/gemv.hpp"
#include "model/gemv_kernel.hpp"

namespace hattn::model::detail {
namespace {

struct Avx512 {
  using Reg = __m512;
  static constexpr int kLanes = 16;
  static Reg zero() noexcept { return _mm512_setzero_ps(); }
  static Reg fma(Reg a, Reg b, Reg c) noexcept { return _mm512_fmadd_ps(a, b, c); }
  static float sum(Reg v) noexcept { return _mm512_reduce_add_ps(v); }
  // 16 weights of `row` from element i, widened to f32; `mask` selects a tail.
  template <DType kDtype>
  static Reg load_w_masked(const unsigned char* row, std::int64_t i, __mmask16 mask) noexcept {
    if constexpr (kDtype == DType::kF32) {
      return _mm512_maskz_loadu_ps(mask, row + 4 * i);
    } else {
      const __m256i h = _mm256_maskz_loadu_epi16(mask, row + 2 * i);
      if constexpr (kDtype == DType::kBF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      else
        return _mm512_cvtph_ps(h);
    }
  }
  static __mmask16 tail_mask(int n) noexcept { return static_cast<__mmask16>((1u << n) - 1u); }
  template <DType kDtype>
  static Reg load_w(const unsigned char* row, std::int64_t i) noexcept {
    return load_w_masked<kDtype>(row, i, 0xffff);
  }
  template <DType kDtype>
  static Reg load_w_tail(const unsigned char* row, std::int64_t i, int n) noexcept {
    return load_w_masked<kDtype>(row, i, tail_mask(n));
  }
  static Reg load_x(const float* p) noexcept { return _mm512_loadu_ps(p); }
  static Reg load_x_tail(const float* p, int n) noexcept {
    return _mm512_maskz_loadu_ps(tail_mask(n), p);
  }
};

}  // namespace

void gemv_rows_avx512(const void* w, DType dtype, std::int64_t in, std::int64_t r0, std::int64_t r1,
                      const float* x, std::int64_t num_tokens, float* y,
                      std::int64_t y_stride) noexcept {
  gemv::run<Avx512>(w, dtype, in, r0, r1, x, num_tokens, y, y_stride);
}

}  // namespace hattn::model::detail
