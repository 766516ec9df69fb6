#pragma once
// The SIMD attention kernel, written once over xsimd batches and instantiated
// per ISA in its own translation unit (kernels_avx2.cpp, kernels_avx512.cpp).
// Include only from those TUs: it must be compiled with the ISA's flags.
//
// Per block of W rows (W = SIMD width):
//   1. scores: each K row is widened to f32 once and dotted with every query
//      head of the group (q read from L1); W dot-product vectors per head are
//      reduced to one vector of W scores with a transpose-add (haddp);
//   2. online softmax in base 2 (q is pre-scaled by log2 e): new max, rescale
//      factor, p = exp2(s - m) with an accurate exp2;
//   3. values: per slice of 4 vectors of the head dim, the group's
//      accumulators stay in registers while the block's V rows stream by.
// bf16 rows are widened without shuffles: a 32-bit lane holding elements
// (2i, 2i+1) gives element 2i by a left shift and 2i+1 by masking, so
// vectors hold even then odd elements ("kernel order"); q and the
// accumulators use the same order and the driver undoes it at the end.

#include <xsimd/xsimd.hpp>

#include <immintrin.h>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "cpu/attend.hpp"

namespace hattn::cpu::detail {

template <class A>
struct SimdOps;

#if defined(__AVX512F__)
template <>
struct SimdOps<xsimd::avx512f> {
  using B = xsimd::batch<float, xsimd::avx512f>;
  static float hmax(B x) noexcept { return _mm512_reduce_max_ps(x); }
  static B load_f16(const std::byte* p) noexcept {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // r[i] = sum of the lanes of row[i]. (xsimd 8.1's avx512 haddp returns the
  // sums in a permuted order, so it is not used here.)
  static B haddp(const B* row) noexcept {
    __m512 w[8], x[4], y[2];
    for (int i = 0; i < 8; ++i) {  // fold 512 -> 256: [row i | row i+8]
      const __m512 a = row[i], b = row[i + 8];
      w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xee));
    }
    for (int i = 0; i < 4; ++i)  // fold 256 -> 128: quads hold rows i, i+8, i+4, i+12
      x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[i], w[i + 4], 0x88),
                           _mm512_shuffle_f32x4(w[i], w[i + 4], 0xdd));
    for (int i = 0; i < 2; ++i)  // fold 128 -> 64 within each quad
      y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[i], x[i + 2], 0x44),
                           _mm512_shuffle_ps(x[i], x[i + 2], 0xee));
    const __m512 z =  // fold 64 -> 32: lane 4k + m holds row base[k] + {0, 2, 1, 3}[m]
        _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xdd));
    const __m512i to_row_order =
        _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
    return _mm512_permutexvar_ps(to_row_order, z);
  }
  static B mask_tail(B x, int n) noexcept {  // lanes >= n -> -inf
    return _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), static_cast<__mmask16>((1u << n) - 1u), x);
  }
};
#endif

#if defined(__AVX2__)
template <>
struct SimdOps<xsimd::fma3<xsimd::avx2>> {
  using B = xsimd::batch<float, xsimd::fma3<xsimd::avx2>>;
  static float hmax(B x) noexcept {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  static B load_f16(const std::byte* p) noexcept {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static B mask_tail(B x, int n) noexcept {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
    return _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), x, keep);
  }
  static B haddp(const B* row) noexcept { return xsimd::haddp(row); }
};
#endif

// Widening loads of one row in kernel order: load(row, i, out) fills
// kVecs vectors for load index i (0 .. D / (W * kVecs) - 1).
template <class A, class KvT>
struct RowLoad;

template <class A>
struct RowLoad<A, float> {
  using B = xsimd::batch<float, A>;
  static constexpr int kVecs = 1;
  static constexpr int kPermBlock = 0;
  static void load(const std::byte* row, int i, B* out) noexcept {
    out[0] = B::load_unaligned(reinterpret_cast<const float*>(row) + i * B::size);
  }
};

template <class A>
struct RowLoad<A, f16> {
  using B = xsimd::batch<float, A>;
  static constexpr int kVecs = 1;
  static constexpr int kPermBlock = 0;
  static void load(const std::byte* row, int i, B* out) noexcept {
    out[0] = SimdOps<A>::load_f16(row + i * B::size * 2);
  }
};

template <class A>
struct RowLoad<A, bf16> {
  using B = xsimd::batch<float, A>;
  using U = xsimd::batch<std::uint32_t, A>;
  static constexpr int kVecs = 2;
  static constexpr int kPermBlock = 2 * B::size;
  static void load(const std::byte* row, int i, B* out) noexcept {
    const U x = U::load_unaligned(reinterpret_cast<const std::uint32_t*>(row) + i * B::size);
    out[0] = xsimd::bitwise_cast<B>(x << 16);
    out[1] = xsimd::bitwise_cast<B>(x & U(0xffff0000u));
  }
};

template <class A, int D, class KvT>
struct SimdAttend {
  using B = xsimd::batch<float, A>;
  using Ops = SimdOps<A>;
  using Load = RowLoad<A, KvT>;
  static constexpr int W = static_cast<int>(B::size);
  static constexpr int kNV = D / W;                 // f32 vectors per row
  static constexpr int kLoads = kNV / Load::kVecs;  // loads per row
  static constexpr int kHeadTile = 4;               // heads sharing one widened K vector
  static constexpr int kSlice = kNV < 4 ? kNV : 4;  // V vectors kept in registers per head
  static constexpr int kPrefetchDist = 2 * W;       // rows ahead
  static constexpr int kLinesPerRow = static_cast<int>(D * sizeof(KvT) / 64);
  static_assert(kNV % Load::kVecs == 0 && kNV % kSlice == 0 && kSlice % Load::kVecs == 0);

  static void prefetch_rows(const AttendArgs& a, int from, int to) noexcept {
    for (int r = from; r < to; ++r)
      for (int c = 0; c < kLinesPerRow; ++c) {
        __builtin_prefetch(a.k[r] + 64 * c, 0, 3);
        __builtin_prefetch(a.v[r] + 64 * c, 0, 3);
      }
  }

  static void run(const AttendArgs& a) noexcept {
    const int G = a.G;
    alignas(64) float dots_mem[kMaxGroupPerPass][W][W];  // [head][row] dot-product vectors
    alignas(64) float p[kMaxGroupPerPass][W];
    float alpha[kMaxGroupPerPass];
    const int total = a.n + a.n_ahead;
    prefetch_rows(a, 0, total < kPrefetchDist ? total : kPrefetchDist);

    for (int t0 = 0; t0 < a.n; t0 += W) {
      const int nb = a.n - t0 < W ? a.n - t0 : W;
      {
        const int pf0 = t0 + kPrefetchDist;
        const int pf1 = pf0 + W < total ? pf0 + W : total;
        prefetch_rows(a, pf0, pf1);
      }
      // 1. scores
      for (int h0 = 0; h0 < G; h0 += kHeadTile) {
        const int ht = G - h0 < kHeadTile ? G - h0 : kHeadTile;
        for (int t = 0; t < nb; ++t) {
          B acc[kHeadTile];
          for (int h = 0; h < kHeadTile; ++h) acc[h] = B(0.0f);
          const std::byte* krow = a.k[t0 + t];
          for (int i = 0; i < kLoads; ++i) {
            B kv[Load::kVecs];
            Load::load(krow, i, kv);
            for (int j = 0; j < Load::kVecs; ++j) {
              const int vi = i * Load::kVecs + j;
              for (int h = 0; h < kHeadTile; ++h)
                if (h < ht)
                  acc[h] = xsimd::fma(kv[j], B::load_aligned(a.q + (h0 + h) * D + vi * W), acc[h]);
            }
          }
          for (int h = 0; h < ht; ++h) acc[h].store_aligned(dots_mem[h0 + h][t]);
        }
      }
      // 2. online softmax
      for (int h = 0; h < G; ++h) {
        B rows[W];
        for (int t = 0; t < W; ++t) rows[t] = t < nb ? B::load_aligned(dots_mem[h][t]) : B(0.0f);
        B s = Ops::haddp(rows);
        if (nb < W) s = Ops::mask_tail(s, nb);
        const float m_old = a.m[h];
        const float bm = Ops::hmax(s);
        const float m_new = bm > m_old ? bm : m_old;
        alpha[h] = std::exp2(m_old - m_new);  // m_old = -inf -> 0
        const B pv = xsimd::exp2(s - B(m_new));
        pv.store_aligned(p[h]);
        a.l[h] = a.l[h] * alpha[h] + xsimd::hadd(pv);
        a.m[h] = m_new;
      }
      // 3. values
      for (int s0 = 0; s0 < kNV; s0 += kSlice) {
        for (int h0 = 0; h0 < G; h0 += kHeadTile) {
          const int ht = G - h0 < kHeadTile ? G - h0 : kHeadTile;
          B acc[kHeadTile][kSlice];
          for (int h = 0; h < kHeadTile; ++h) {
            const B al(h < ht ? alpha[h0 + h] : 0.0f);
            for (int j = 0; j < kSlice; ++j)
              acc[h][j] =
                  h < ht ? B::load_aligned(a.acc + (h0 + h) * D + (s0 + j) * W) * al : B(0.0f);
          }
          for (int t = 0; t < nb; ++t) {
            B vv[kSlice];
            for (int j = 0; j < kSlice; j += Load::kVecs)
              Load::load(a.v[t0 + t], (s0 + j) / Load::kVecs, vv + j);
            for (int h = 0; h < kHeadTile; ++h)
              if (h < ht) {
                const B ph(p[h0 + h][t]);
                for (int j = 0; j < kSlice; ++j) acc[h][j] = xsimd::fma(ph, vv[j], acc[h][j]);
              }
          }
          for (int h = 0; h < kHeadTile; ++h)
            if (h < ht)
              for (int j = 0; j < kSlice; ++j)
                acc[h][j].store_aligned(a.acc + (h0 + h) * D + (s0 + j) * W);
        }
      }
    }
  }
};

// A plain switch, not hattn::dispatch: an ISA TU must not instantiate
// anything a baseline TU could also instantiate (see kernels_avx512.cpp).
template <class A, int D>
Kernel simd_kernel_d(DType kv) noexcept {
  switch (kv) {
    case DType::kF32: return {&SimdAttend<A, D, float>::run, RowLoad<A, float>::kPermBlock};
    case DType::kF16: return {&SimdAttend<A, D, f16>::run, RowLoad<A, f16>::kPermBlock};
    case DType::kBF16: return {&SimdAttend<A, D, bf16>::run, RowLoad<A, bf16>::kPermBlock};
  }
  return {};
}

template <class A>
Kernel simd_kernel(std::int32_t head_dim, DType kv) noexcept {
  switch (head_dim) {
    case 64: return simd_kernel_d<A, 64>(kv);
    case 128: return simd_kernel_d<A, 128>(kv);
    case 256: return simd_kernel_d<A, 256>(kv);
    default: return {};
  }
}

}  // namespace hattn::cpu::detail
