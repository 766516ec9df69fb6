// AVX-512 fused GEMV for the model's decode projections (see gemv.hpp).
// Compiled with AVX-512 flags; reached only when the CPU has AVX-512.

#include <immintrin.h>

#include "model/gemv.hpp"

namespace hattn::model::detail {
namespace {

// 16 weights of row `row` from element i, widened to f32; `mask` selects a tail.
template <DType kDtype>
inline __m512 load_w(const unsigned char* row, std::int64_t i, __mmask16 mask) noexcept {
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

// kRows rows times kTokens tokens of dot products, kRows * kTokens accumulators.
template <DType kDtype, int kRows, int kTokens>
void block(const unsigned char* w, std::int64_t row_bytes, std::int64_t in, std::int64_t r,
           const float* x, float* y, std::int64_t y_stride) noexcept {
  __m512 acc[kRows][kTokens];
  for (int a = 0; a < kRows; ++a)
    for (int t = 0; t < kTokens; ++t) acc[a][t] = _mm512_setzero_ps();
  const unsigned char* rows[kRows];
  for (int a = 0; a < kRows; ++a) rows[a] = w + (r + a) * row_bytes;
  std::int64_t i = 0;
  for (; i + 16 <= in; i += 16) {
    __m512 wv[kRows];
    for (int a = 0; a < kRows; ++a) wv[a] = load_w<kDtype>(rows[a], i, 0xffff);
    for (int t = 0; t < kTokens; ++t) {
      const __m512 xv = _mm512_loadu_ps(x + t * in + i);
      for (int a = 0; a < kRows; ++a) acc[a][t] = _mm512_fmadd_ps(wv[a], xv, acc[a][t]);
    }
  }
  if (i < in) {
    const auto mask = static_cast<__mmask16>((1u << (in - i)) - 1u);
    __m512 wv[kRows];
    for (int a = 0; a < kRows; ++a) wv[a] = load_w<kDtype>(rows[a], i, mask);
    for (int t = 0; t < kTokens; ++t) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + t * in + i);
      for (int a = 0; a < kRows; ++a) acc[a][t] = _mm512_fmadd_ps(wv[a], xv, acc[a][t]);
    }
  }
  for (int a = 0; a < kRows; ++a)
    for (int t = 0; t < kTokens; ++t) y[t * y_stride + r + a] = _mm512_reduce_add_ps(acc[a][t]);
}

template <DType kDtype, int kTokens>
void rows_for_tokens(const unsigned char* w, std::int64_t in, std::int64_t r0, std::int64_t r1,
                     const float* x, float* y, std::int64_t y_stride) noexcept {
  const std::int64_t row_bytes = in * static_cast<std::int64_t>(size_of(kDtype));
  // 4 rows share each x load; with 1-2 tokens that leaves 4-8 independent
  // FMA chains, enough to hide the FMA latency.
  constexpr int kRows = kTokens <= 2 ? 4 : 2;
  std::int64_t r = r0;
  for (; r + kRows <= r1; r += kRows)
    block<kDtype, kRows, kTokens>(w, row_bytes, in, r, x, y, y_stride);
  for (; r < r1; ++r) block<kDtype, 1, kTokens>(w, row_bytes, in, r, x, y, y_stride);
}

template <DType kDtype>
void rows(const unsigned char* w, std::int64_t in, std::int64_t r0, std::int64_t r1, const float* x,
          std::int64_t num_tokens, float* y, std::int64_t y_stride) noexcept {
  // Tokens in groups of up to 4 (the weights of a row group stay in L1/L2
  // between groups).
  for (std::int64_t t = 0; t < num_tokens; t += 4) {
    const float* xt = x + t * in;
    float* yt = y + t * y_stride;
    switch (num_tokens - t) {
      case 1: rows_for_tokens<kDtype, 1>(w, in, r0, r1, xt, yt, y_stride); break;
      case 2: rows_for_tokens<kDtype, 2>(w, in, r0, r1, xt, yt, y_stride); break;
      case 3: rows_for_tokens<kDtype, 3>(w, in, r0, r1, xt, yt, y_stride); break;
      default: rows_for_tokens<kDtype, 4>(w, in, r0, r1, xt, yt, y_stride); break;
    }
  }
}

}  // namespace

void gemv_rows_avx512(const void* w, DType dtype, std::int64_t in, std::int64_t r0, std::int64_t r1,
                      const float* x, std::int64_t num_tokens, float* y,
                      std::int64_t y_stride) noexcept {
  const auto* wb = static_cast<const unsigned char*>(w);
  switch (dtype) {
    case DType::kBF16: rows<DType::kBF16>(wb, in, r0, r1, x, num_tokens, y, y_stride); break;
    case DType::kF16: rows<DType::kF16>(wb, in, r0, r1, x, num_tokens, y, y_stride); break;
    case DType::kF32: rows<DType::kF32>(wb, in, r0, r1, x, num_tokens, y, y_stride); break;
  }
}

}  // namespace hattn::model::detail
