#pragma once
// The fused decode GEMV (gemv.hpp), written once over a small vector interface
// that each ISA translation unit supplies (gemv_avx512.cpp, gemv_avx2.cpp,
// gemv_scalar.cpp). Only templates live here: every instantiation carries its
// TU's vector type (declared in that TU's anonymous namespace), so the linker
// never mixes code built with different ISA flags.
//
// Each (row, token) dot product is accumulated lane by lane in one register
// and reduced in a fixed order, whatever else the call computes: a token's
// projection does not depend on which tokens share its batch, so a decoder
// that splits a batch into micro-batches computes the same bits as one that
// does not.
//
// The interface V:
//   using Reg;                        kLanes f32 lanes
//   static constexpr int kLanes;
//   static Reg zero();
//   static Reg fma(Reg a, Reg b, Reg c);             a * b + c
//   static float sum(Reg);                           fixed reduction order
//   template <DType> static Reg load_w(const unsigned char* row, std::int64_t i);
//   template <DType> static Reg load_w_tail(const unsigned char* row, std::int64_t i, int n);
//   static Reg load_x(const float* p);
//   static Reg load_x_tail(const float* p, int n);   lanes >= n are zero

#include <cstdint>

#include "hattn/core/dtype.hpp"

namespace hattn::model::detail::gemv {

template <DType kDtype>
inline constexpr std::int64_t kElemBytes = kDtype == DType::kF32 ? 4 : 2;

// kRows rows times kTokens tokens of dot products, kRows * kTokens accumulators.
template <class V, DType kDtype, int kRows, int kTokens>
void block(const unsigned char* w, std::int64_t in, std::int64_t r, const float* x, float* y,
           std::int64_t y_stride) noexcept {
  using Reg = typename V::Reg;
  Reg acc[kRows][kTokens];
  for (int a = 0; a < kRows; ++a)
    for (int t = 0; t < kTokens; ++t) acc[a][t] = V::zero();
  const unsigned char* rows[kRows];
  for (int a = 0; a < kRows; ++a) rows[a] = w + (r + a) * in * kElemBytes<kDtype>;
  std::int64_t i = 0;
  for (; i + V::kLanes <= in; i += V::kLanes) {
    Reg wv[kRows];
    for (int a = 0; a < kRows; ++a) wv[a] = V::template load_w<kDtype>(rows[a], i);
    for (int t = 0; t < kTokens; ++t) {
      const Reg xv = V::load_x(x + t * in + i);
      for (int a = 0; a < kRows; ++a) acc[a][t] = V::fma(wv[a], xv, acc[a][t]);
    }
  }
  if (i < in) {
    const int n = static_cast<int>(in - i);
    Reg wv[kRows];
    for (int a = 0; a < kRows; ++a) wv[a] = V::template load_w_tail<kDtype>(rows[a], i, n);
    for (int t = 0; t < kTokens; ++t) {
      const Reg xv = V::load_x_tail(x + t * in + i, n);
      for (int a = 0; a < kRows; ++a) acc[a][t] = V::fma(wv[a], xv, acc[a][t]);
    }
  }
  for (int a = 0; a < kRows; ++a)
    for (int t = 0; t < kTokens; ++t) y[t * y_stride + r + a] = V::sum(acc[a][t]);
}

template <class V, DType kDtype, int kTokens>
void rows_for_tokens(const unsigned char* w, std::int64_t in, std::int64_t r0, std::int64_t r1,
                     const float* x, float* y, std::int64_t y_stride) noexcept {
  // 4 rows share each x load; with 1-2 tokens that leaves 4-8 independent
  // FMA chains, enough to hide the FMA latency.
  constexpr int kRows = kTokens <= 2 ? 4 : 2;
  std::int64_t r = r0;
  for (; r + kRows <= r1; r += kRows) block<V, kDtype, kRows, kTokens>(w, in, r, x, y, y_stride);
  for (; r < r1; ++r) block<V, kDtype, 1, kTokens>(w, in, r, x, y, y_stride);
}

template <class V, DType kDtype>
void rows(const unsigned char* w, std::int64_t in, std::int64_t r0, std::int64_t r1, const float* x,
          std::int64_t num_tokens, float* y, std::int64_t y_stride) noexcept {
  // Tokens in groups of up to 4 (the weights of a row group stay in L1/L2
  // between groups).
  for (std::int64_t t = 0; t < num_tokens; t += 4) {
    const float* xt = x + t * in;
    float* yt = y + t * y_stride;
    switch (num_tokens - t) {
      case 1: rows_for_tokens<V, kDtype, 1>(w, in, r0, r1, xt, yt, y_stride); break;
      case 2: rows_for_tokens<V, kDtype, 2>(w, in, r0, r1, xt, yt, y_stride); break;
      case 3: rows_for_tokens<V, kDtype, 3>(w, in, r0, r1, xt, yt, y_stride); break;
      default: rows_for_tokens<V, kDtype, 4>(w, in, r0, r1, xt, yt, y_stride); break;
    }
  }
}

template <class V>
void run(const void* w, DType dtype, std::int64_t in, std::int64_t r0, std::int64_t r1,
         const float* x, std::int64_t num_tokens, float* y, std::int64_t y_stride) noexcept {
  const auto* wb = static_cast<const unsigned char*>(w);
  switch (dtype) {
    case DType::kBF16: rows<V, DType::kBF16>(wb, in, r0, r1, x, num_tokens, y, y_stride); break;
    case DType::kF16: rows<V, DType::kF16>(wb, in, r0, r1, x, num_tokens, y, y_stride); break;
    case DType::kF32: rows<V, DType::kF32>(wb, in, r0, r1, x, num_tokens, y, y_stride); break;
  }
}

}  // namespace hattn::model::detail::gemv
