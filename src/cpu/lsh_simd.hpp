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
struct MarkScan;

#if defined(__AVX512BW__)
template <>
struct MarkScan<xsimd::avx512f> {
  static std::int32_t run(std::uint8_t* marks, std::int64_t words, std::int32_t m,
                          std::uint64_t* hits, std::uint32_t* list) noexcept {
    const __m512i bit = _mm512_set1_epi8(static_cast<char>(1u << (m - 1)));
    const __m512i zero = _mm512_setzero_si512();
    std::int32_t n = 0;
    for (std::int64_t w = 0; w < words; ++w) {
      __m512i* p = reinterpret_cast<__m512i*>(marks) + w;
      const std::uint64_t h = _mm512_test_epi8_mask(_mm512_load_si512(p), bit);
      _mm512_store_si512(p, zero);
      hits[w] = h;
      if (list != nullptr) n = list_word(h, static_cast<std::uint32_t>(w * 64), list, n);
    }
    return n;
  }
};
#endif

#if defined(__AVX2__)
template <>
struct MarkScan<xsimd::fma3<xsimd::avx2>> {
  static std::int32_t run(std::uint8_t* marks, std::int64_t words, std::int32_t m,
                          std::uint64_t* hits, std::uint32_t* list) noexcept {
    std::int32_t n = 0;
    // Bit m - 1 of every byte moved to bit 7 (a 16-bit shift moves both bytes
    // of a lane alike), then one mask bit per byte.
    const __m128i sh = _mm_cvtsi32_si128(8 - m);
    const __m256i zero = _mm256_setzero_si256();
    for (std::int64_t w = 0; w < words; ++w) {
      __m256i* p = reinterpret_cast<__m256i*>(marks) + 2 * w;
      const auto lo = static_cast<std::uint32_t>(
          _mm256_movemask_epi8(_mm256_sll_epi16(_mm256_load_si256(p), sh)));
      const auto hi = static_cast<std::uint32_t>(
          _mm256_movemask_epi8(_mm256_sll_epi16(_mm256_load_si256(p + 1), sh)));
      const std::uint64_t h = std::uint64_t{hi} << 32 | lo;
      _mm256_store_si256(p, zero);
      _mm256_store_si256(p + 1, zero);
      hits[w] = h;
      if (list != nullptr) n = list_word(h, static_cast<std::uint32_t>(w * 64), list, n);
    }
    return n;
  }
};
#endif

template <class A>
struct LshHash {
  using B = xsimd::batch<float, A>;
  static constexpr int W = static_cast<int>(B::size);
  static constexpr int kNV = 64 / W;             // vectors per 64 planes
  static constexpr int kRows = W == 16 ? 4 : 1;  // rows per register block

  // Rows [0, R) against plane block w (64 planes, D * 64 contiguous floats).
  template <int R>
  static void block(const float* x, std::int64_t xs, std::int32_t D, const float* wt,
                    std::int32_t words, std::int32_t w, std::uint64_t* bits) noexcept {
    B acc[R][kNV];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < kNV; ++c) acc[r][c] = B(0.0f);
    const float* wp = wt + std::int64_t{w} * D * 64;
    for (std::int32_t d = 0; d < D; ++d) {
      B pv[kNV];
      for (int c = 0; c < kNV; ++c) pv[c] = B::load_unaligned(wp + std::int64_t{d} * 64 + c * W);
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

  // Plane block by plane block (each read from memory once), all rows
  // against it in register blocks of kRows.
  static void run(const float* x, std::int64_t rows, std::int64_t xs, std::int32_t D,
                  const float* wt, std::int32_t words, std::int32_t w0, std::int32_t w1,
                  std::uint64_t* bits) noexcept {
    for (std::int32_t w = w0; w < w1; ++w) {
      std::int64_t r = 0;
      for (; r + kRows <= rows; r += kRows)
        block<kRows>(x + r * xs, xs, D, wt, words, w, bits + r * words);
      for (; r < rows; ++r) block<1>(x + r * xs, xs, D, wt, words, w, bits + r * words);
    }
  }
};

// table[i] per lane. (xsimd 8.1's batch::gather is an out-of-line loop of
// scalar loads for these architectures.)
template <class A>
struct TableGather;

#if defined(__AVX512F__)
template <>
struct TableGather<xsimd::avx512f> {
  static xsimd::batch<float, xsimd::avx512f> at(
      const float* table, xsimd::batch<std::int32_t, xsimd::avx512f> i) noexcept {
    return _mm512_i32gather_ps(i, table, 4);
  }
};
#endif

#if defined(__AVX2__)
template <>
struct TableGather<xsimd::fma3<xsimd::avx2>> {
  static xsimd::batch<float, xsimd::fma3<xsimd::avx2>> at(
      const float* table, xsimd::batch<std::int32_t, xsimd::fma3<xsimd::avx2>> i) noexcept {
    return _mm256_i32gather_ps(table, i, 4);
  }
};
#endif

// Lanes t whose umask[t] lacks bit `head` become -inf.
template <class A>
struct SampledMask;

#if defined(__AVX512F__)
template <>
struct SampledMask<xsimd::avx512f> {
  static xsimd::batch<float, xsimd::avx512f> apply(xsimd::batch<float, xsimd::avx512f> s,
                                                   const std::uint16_t* um, int head) noexcept {
    const __m512i m =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(um)));
    const __mmask16 keep = _mm512_test_epi32_mask(m, _mm512_set1_epi32(1 << head));
    return _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), keep, s);
  }
};
#endif

#if defined(__AVX2__)
template <>
struct SampledMask<xsimd::fma3<xsimd::avx2>> {
  using B = xsimd::batch<float, xsimd::fma3<xsimd::avx2>>;
  static B apply(B s, const std::uint16_t* um, int head) noexcept {
    const __m256i m = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(um)));
    const __m256i bit = _mm256_set1_epi32(1 << head);
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(m, bit), bit));
    return _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), s, keep);
  }
};
#endif

// The sampled-attention score transform (see LshScoreCtx) as a SimdAttend
// score policy: W rows starting at t0, query head `head` of the pass.
template <class A>
struct LshScores {
  using B = xsimd::batch<float, A>;
  using I = xsimd::batch<std::int32_t, A>;
  static constexpr int W = static_cast<int>(B::size);
  static constexpr bool kRowPrefetch = true;
  static constexpr bool kKeyNorm = true;
  static const float* key_mean(const AttendArgs& a) noexcept {
    return static_cast<const LshScoreCtx*>(a.ctx)->mu;
  }

  static B apply(const AttendArgs& a, B s, int t0, int head, B kn) noexcept {
    const auto& c = *static_cast<const LshScoreCtx*>(a.ctx);
    const B zero(0.0f), one(1.0f);
    if (c.corr != nullptr) {
      const B d = s * B(c.inv_qscale);
      const B den = B(c.qn[head]) * kn;
      B cs = xsimd::select(den > zero, (d - B(c.qmu[head])) / den, zero);
      cs = xsimd::min(xsimd::max(cs, B(-1.0f)), one);
      const B x = (cs + one) * B(0.5f * static_cast<float>(c.intervals));
      const I i = xsimd::min(xsimd::to_int(x), I(c.intervals - 1));
      const B f = x - xsimd::to_float(i);
      const B t0v = TableGather<A>::at(c.corr, i), t1v = TableGather<A>::at(c.corr + 1, i);
      s = xsimd::fma(xsimd::fma(f, t1v - t0v, t0v), B(1.4426950408889634f), s);
    }
    return c.umask != nullptr ? SampledMask<A>::apply(s, c.umask + t0, head) : s;
  }
};

template <class A>
Kernel lsh_kernel_simd(std::int32_t head_dim, DType kv) noexcept {
  auto of = [&]<int D, class KvT>() -> Kernel {
    constexpr Order o = RowLoad<A, KvT>::kOrder;
    return {&SimdAttend<A, D, KvT, 8, LshScores<A>>::run, o, o,
            2 * static_cast<std::int32_t>(xsimd::batch<float, A>::size)};
  };
  auto by_type = [&]<int D>() -> Kernel {
    switch (kv) {
      case DType::kF32: return of.template operator()<D, float>();
      case DType::kF16: return of.template operator()<D, f16>();
      case DType::kBF16: return of.template operator()<D, bf16>();
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
