#pragma once
// LSH kernels over xsimd batches, instantiated per ISA (lsh_kernels_avx2.cpp,
// lsh_kernels_avx512.cpp). Include only from those TUs.
//
// Hashing: a register-blocked product of R rows with 64 planes at a time
// (R x 64 / W accumulators), reduced to sign bits with one compare per vector.
// Attention over gathered rows reuses the dense kernels' widening row loads
// (bf16 in even/odd "kernel order"); rows are prefetched a few ahead because
// every one is a random access.

#include <xsimd/xsimd.hpp>

#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "cpu/attend_simd.hpp"
#include "cpu/lsh_kernels.hpp"

namespace hattn::cpu::detail {

template <class A>
struct SignMask;

#if defined(__AVX512F__)
template <>
struct SignMask<xsimd::avx512f> {
  static std::uint64_t positive(xsimd::batch<float, xsimd::avx512f> x) noexcept {
    return _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ);
  }
};
#endif

#if defined(__AVX2__)
template <>
struct SignMask<xsimd::fma3<xsimd::avx2>> {
  static std::uint64_t positive(xsimd::batch<float, xsimd::fma3<xsimd::avx2>> x) noexcept {
    return static_cast<std::uint32_t>(
        _mm256_movemask_ps(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GT_OQ)));
  }
};
#endif

template <class A>
struct LshHash {
  using B = xsimd::batch<float, A>;
  static constexpr int W = static_cast<int>(B::size);
  static constexpr int kNV = 64 / W;             // vectors per 64 planes
  static constexpr int kRows = W == 16 ? 4 : 1;  // rows per register block

  template <int R>
  static void block(const float* x, std::int64_t xs, std::int32_t D, const float* wt,
                    std::int32_t J, std::uint64_t* bits) noexcept {
    const std::int32_t words = J / 64;
    for (std::int32_t w = 0; w < words; ++w) {
      B acc[R][kNV];
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < kNV; ++c) acc[r][c] = B(0.0f);
      const float* wp = wt + std::int64_t{w} * 64;
      for (std::int32_t d = 0; d < D; ++d) {
        B pv[kNV];
        for (int c = 0; c < kNV; ++c) pv[c] = B::load_unaligned(wp + std::int64_t{d} * J + c * W);
        for (int r = 0; r < R; ++r) {
          const B xb(x[r * xs + d]);
          for (int c = 0; c < kNV; ++c) acc[r][c] = xsimd::fma(pv[c], xb, acc[r][c]);
        }
      }
      for (int r = 0; r < R; ++r) {
        std::uint64_t m = 0;
        for (int c = 0; c < kNV; ++c) m |= SignMask<A>::positive(acc[r][c]) << (c * W);
        bits[r * words + w] = m;
      }
    }
  }

  static void run(const float* x, std::int64_t rows, std::int64_t xs, std::int32_t D,
                  const float* wt, std::int32_t J, std::uint64_t* bits) noexcept {
    const std::int32_t words = J / 64;
    std::int64_t r = 0;
    for (; r + kRows <= rows; r += kRows) block<kRows>(x + r * xs, xs, D, wt, J, bits + r * words);
    for (; r < rows; ++r) block<1>(x + r * xs, xs, D, wt, J, bits + r * words);
  }
};

template <class A, int D, class KvT>
struct LshAttend {
  using B = xsimd::batch<float, A>;
  using Load = RowLoad<A, KvT>;
  static constexpr int W = static_cast<int>(B::size);
  static constexpr int kNV = D / W;
  static constexpr int kLoads = kNV / Load::kVecs;
  static constexpr int kLines = static_cast<int>(D * sizeof(KvT) / 64);
  static constexpr int kAhead = 8;  // rows prefetched ahead
  static constexpr int kSlice = kNV < 4 ? kNV : 4;
  static constexpr int kHeadTile = 4;
  static constexpr int kBlock = 32;  // V rows per block (8 KiB of bf16 at D = 128)

  static void prefetch_row(const std::byte* p) noexcept {
    for (int c = 0; c < kLines; ++c) __builtin_prefetch(p + 64 * c, 0, 3);
  }

  static void dots(const float* q, std::int32_t G, const std::byte* const* k, std::int32_t n,
                   float* out, std::int32_t ld) noexcept {
    for (int j = 0; j < std::min(n, kAhead); ++j) prefetch_row(k[j]);
    for (std::int32_t j = 0; j < n; ++j) {
      if (j + kAhead < n) prefetch_row(k[j + kAhead]);
      B row[kNV];
      for (int i = 0; i < kLoads; ++i) Load::load(k[j], i, row + i * Load::kVecs);
      for (std::int32_t g = 0; g < G; ++g) {
        const float* qg = q + std::int64_t{g} * D;
        B acc = row[0] * B::load_unaligned(qg);
        for (int v = 1; v < kNV; ++v) acc = xsimd::fma(row[v], B::load_unaligned(qg + v * W), acc);
        out[std::int64_t{g} * ld + j] = xsimd::hadd(acc);
      }
    }
  }

  template <int HT>
  static void tile(const float* w, std::int32_t ld, const std::byte* const* v, std::int32_t j0,
                   std::int32_t nb, int s, float* acc) noexcept {
    B a[HT][kSlice];
    for (int h = 0; h < HT; ++h)
      for (int i = 0; i < kSlice; ++i) a[h][i] = B::load_unaligned(acc + h * D + (s + i) * W);
    for (std::int32_t j = j0; j < j0 + nb; ++j) {
      B row[kSlice];
      for (int i = 0; i < kSlice / Load::kVecs; ++i)
        Load::load(v[j], s / Load::kVecs + i, row + i * Load::kVecs);
      for (int h = 0; h < HT; ++h) {
        const B wb(w[std::int64_t{h} * ld + j]);
        for (int i = 0; i < kSlice; ++i) a[h][i] = xsimd::fma(row[i], wb, a[h][i]);
      }
    }
    for (int h = 0; h < HT; ++h)
      for (int i = 0; i < kSlice; ++i) a[h][i].store_unaligned(acc + h * D + (s + i) * W);
  }

  static void accumulate(const float* w, std::int32_t ld, std::int32_t G, const std::byte* const* v,
                         std::int32_t n, float* acc) noexcept {
    for (int j = 0; j < std::min(n, kBlock); ++j) prefetch_row(v[j]);
    for (std::int32_t j0 = 0; j0 < n; j0 += kBlock) {
      const std::int32_t nb = std::min<std::int32_t>(kBlock, n - j0);
      for (std::int32_t j = j0 + kBlock; j < std::min(n, j0 + 2 * kBlock); ++j) prefetch_row(v[j]);
      for (int s = 0; s < kNV; s += kSlice) {
        std::int32_t g = 0;
        for (; g + kHeadTile <= G; g += kHeadTile)
          tile<kHeadTile>(w + std::int64_t{g} * ld, ld, v, j0, nb, s, acc + std::int64_t{g} * D);
        for (; g < G; ++g)
          tile<1>(w + std::int64_t{g} * ld, ld, v, j0, nb, s, acc + std::int64_t{g} * D);
      }
    }
  }
};

template <class A, int D, class KvT>
LshKernels lsh_kernels_of() noexcept {
  return {&LshAttend<A, D, KvT>::dots, &LshAttend<A, D, KvT>::accumulate, RowLoad<A, KvT>::kOrder,
          2 * static_cast<std::int32_t>(xsimd::batch<float, A>::size)};
}

template <class A>
LshKernels lsh_kernels_simd(std::int32_t head_dim, DType kv) noexcept {
  auto by_type = [&]<int D>() -> LshKernels {
    switch (kv) {
      case DType::kF32: return lsh_kernels_of<A, D, float>();
      case DType::kF16: return lsh_kernels_of<A, D, f16>();
      case DType::kBF16: return lsh_kernels_of<A, D, bf16>();
    }
    return {};
  };
  switch (head_dim) {
    case 64: return by_type.template operator()<64>();
    case 128: return by_type.template operator()<128>();
    case 256: return by_type.template operator()<256>();
    default: return {};
  }
}

}  // namespace hattn::cpu::detail
