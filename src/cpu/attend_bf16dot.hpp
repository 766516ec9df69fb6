#pragma once
// AVX512_BF16 kernel for bf16 KV: both matrix products use vdpbf16ps, which
// multiplies bf16 pairs and accumulates in f32 — 32 products per instruction
// where an f32 FMA does 16. The price is the one GPU tensor-core kernels pay:
// q is rounded to bf16 for q.k, and the softmax weights p are rounded to bf16
// for p.v (the sum l uses the same rounded weights, so o stays an exactly
// normalized mix of V rows). Opt-in: DenseDecode::Precision::kBf16Products.
//
// Scores: a K row is 32 bf16 per vector, dotted with q (bf16, natural order).
// Values: two rows t, t+1 are interleaved with unpacklo/hi_epi16, so each
// 32-bit lane holds (v_t[d], v_t+1[d]) and one vdpbf16ps with the weight pair
// (p_t, p_t+1) adds both rows' contributions. The accumulators come out in
// Order::kUnpackPairs.
//
// Include only from kernels_avx512.cpp. Functions using BF16 intrinsics carry
// target("avx512bf16") and run only after cpu_has_avx512_bf16().

#include <immintrin.h>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "cpu/attend.hpp"
#include "cpu/attend_simd.hpp"

#define HATTN_TARGET_BF16 __attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl,avx512dq")))

namespace hattn::cpu::detail {

template <int D>
struct Bf16DotAttend {
  using Ops = SimdOps<xsimd::avx512f>;
  using Simd = SimdAttend<xsimd::avx512f, D, bf16>;  // shared softmax and prefetch
  static constexpr int W = 16;                       // rows per block, f32 lanes
  static constexpr int kChunks = D / 32;             // bf16 vectors per row
  static constexpr int kHeadTile = 4;
  static constexpr int kSliceChunks = kChunks < 2 ? kChunks : 2;  // V chunks in registers

  // Query heads per score tile: their bf16 rows stay in registers.
  static constexpr int kScoreTile = kChunks >= 8 ? 2 : 4;

  template <int HT>
  HATTN_TARGET_BF16 static void score_tile(const __m512i* qb, const std::byte* const* k,
                                           std::ptrdiff_t koff, int t0, int nb, int h0,
                                           float (*dots)[W][W], typename Simd::Ahead& ahead,
                                           int part, int parts) noexcept {
    const typename Simd::Ahead::Span lines = Simd::Ahead::span(part, parts);
    __m512i qr[HT][kChunks];
    for (int h = 0; h < HT; ++h)
      for (int c = 0; c < kChunks; ++c) qr[h][c] = qb[(h0 + h) * kChunks + c];
    for (int t = 0; t < nb; ++t) {
      ahead.k_lines(t, lines);
      const std::byte* row = k[t0 + t] + koff;
      __m512 acc[HT];
      for (int h = 0; h < HT; ++h) acc[h] = _mm512_setzero_ps();
      for (int c = 0; c < kChunks; ++c) {
        const __m512i kv = _mm512_loadu_si512(row + 64 * c);
        for (int h = 0; h < HT; ++h)
          acc[h] = _mm512_dpbf16_ps(acc[h], (__m512bh)kv, (__m512bh)qr[h][c]);
      }
      for (int h = 0; h < HT; ++h) _mm512_store_ps(dots[h0 + h][t], acc[h]);
    }
  }

  HATTN_TARGET_BF16 static void scores(const __m512i* qb, int G, const std::byte* const* k,
                                       std::ptrdiff_t koff, int t0, int nb, float (*dots)[W][W],
                                       typename Simd::Ahead& ahead) noexcept {
    // Passes over the rows: the ahead block's lines are split among them.
    const int parts = G / kScoreTile + G % kScoreTile;
    int h0 = 0, part = 0;
    for (; h0 + kScoreTile <= G; h0 += kScoreTile)
      score_tile<kScoreTile>(qb, k, koff, t0, nb, h0, dots, ahead, part++, parts);
    for (; h0 < G; ++h0) score_tile<1>(qb, k, koff, t0, nb, h0, dots, ahead, part++, parts);
  }

  template <int HT>
  HATTN_TARGET_BF16 static void value_tile(float* acc_mem, const std::byte* const* v,
                                           std::ptrdiff_t voff, int t0, int nb, int h0,
                                           const std::uint16_t (*pb)[W], const float* alpha,
                                           typename Simd::Ahead& ahead, int tile,
                                           int parts) noexcept {
    for (int c0 = 0; c0 < kChunks; c0 += kSliceChunks) {
      const typename Simd::Ahead::Span lines =
          Simd::Ahead::span(tile * (kChunks / kSliceChunks) + c0 / kSliceChunks, parts);
      __m512 acc[HT][kSliceChunks][2];
      for (int h = 0; h < HT; ++h) {
        const __m512 al = _mm512_set1_ps(alpha[h0 + h]);
        for (int c = 0; c < kSliceChunks; ++c)
          for (int j = 0; j < 2; ++j)
            acc[h][c][j] =
                _mm512_mul_ps(_mm512_load_ps(acc_mem + (h0 + h) * D + (c0 + c) * 32 + j * 16), al);
      }
      for (int t = 0; t < nb; t += 2) {
        ahead.v_lines(t, lines);
        ahead.v_lines(t + 1, lines);
        const std::byte* ra = v[t0 + t] + voff;
        // An odd tail pairs the last row with itself under weight 0.
        const std::byte* rb = t + 1 < nb ? v[t0 + t + 1] + voff : ra;
        __m512i pp[HT];
        for (int h = 0; h < HT; ++h) {
          std::uint32_t pair;
          std::memcpy(&pair, &pb[h0 + h][t], sizeof(pair));
          pp[h] = _mm512_set1_epi32(static_cast<int>(pair));
        }
        for (int c = 0; c < kSliceChunks; ++c) {
          const __m512i a = _mm512_loadu_si512(ra + 64 * (c0 + c));
          const __m512i b = _mm512_loadu_si512(rb + 64 * (c0 + c));
          const __m512i lo = _mm512_unpacklo_epi16(a, b);
          const __m512i hi = _mm512_unpackhi_epi16(a, b);
          for (int h = 0; h < HT; ++h) {
            acc[h][c][0] = _mm512_dpbf16_ps(acc[h][c][0], (__m512bh)lo, (__m512bh)pp[h]);
            acc[h][c][1] = _mm512_dpbf16_ps(acc[h][c][1], (__m512bh)hi, (__m512bh)pp[h]);
          }
        }
      }
      for (int h = 0; h < HT; ++h)
        for (int c = 0; c < kSliceChunks; ++c)
          for (int j = 0; j < 2; ++j)
            _mm512_store_ps(acc_mem + (h0 + h) * D + (c0 + c) * 32 + j * 16, acc[h][c][j]);
    }
  }

  HATTN_TARGET_BF16 static void values(float* acc_mem, int G, const std::byte* const* v,
                                       std::ptrdiff_t voff, int t0, int nb,
                                       const std::uint16_t (*pb)[W], const float* alpha,
                                       typename Simd::Ahead& ahead) noexcept {
    const int tiles = G / kHeadTile + G % kHeadTile, parts = tiles * (kChunks / kSliceChunks);
    int h0 = 0, tile = 0;
    for (; h0 + kHeadTile <= G; h0 += kHeadTile)
      value_tile<kHeadTile>(acc_mem, v, voff, t0, nb, h0, pb, alpha, ahead, tile++, parts);
    for (; h0 < G; ++h0)
      value_tile<1>(acc_mem, v, voff, t0, nb, h0, pb, alpha, ahead, tile++, parts);
  }

  HATTN_TARGET_BF16 static void run(const AttendArgs& a) noexcept {
    const int G = a.G, NG = a.NH * a.G;
    alignas(64) __m512i qb[kMaxHeadsPerPass * kChunks];
    alignas(64) float dots[kMaxGroupPerPass][W][W];
    alignas(64) std::uint16_t pb[kMaxGroupPerPass][W];  // lanes past the tail hold 0
    float alpha[kMaxGroupPerPass];
    float m[kMaxHeadsPerPass];
    Ops::B lsum[kMaxHeadsPerPass];  // running sums stay vectors; reduced once per call
    for (int i = 0; i < NG; ++i) {
      for (int c = 0; c < kChunks; ++c) {
        const float* q = a.q + i * D + 32 * c;
        // cvtne2ps_pbh(hi, lo): elements 0..15 from lo, 16..31 from hi.
        qb[i * kChunks + c] =
            (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(q + 16), _mm512_load_ps(q));
      }
      m[i] = a.m[i];
      lsum[i] = _mm512_mask_mov_ps(_mm512_setzero_ps(), 1, _mm512_set1_ps(a.l[i]));
    }
    typename Simd::Block blk;
    for (typename Simd::Walk w(a, true); w.next(blk);) {
      const int hk = blk.hk, t0 = blk.t0, nb = blk.nb;
      scores(qb + hk * G * kChunks, G, a.k, hk * a.k_head_stride, t0, nb, dots, blk.ahead);
      float* mh = m + hk * G;
      Ops::B* lh = lsum + hk * G;
      for (int h = 0; h < G; ++h) {
        const __m512 p =
            Simd::block_weights(dots[h], nb, mh[h], lh[h], alpha[h], [](auto s) { return s; });
        const __m256bh p16 = _mm512_cvtneps_pbh(p);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb[h]), (__m256i)p16);
        // Sum the rounded weights: o is then an exactly normalized mix.
        lh[h] = lh[h] + Ops::B(_mm512_cvtpbh_ps(p16));
      }
      values(a.acc + hk * G * D, G, a.v, hk * a.v_head_stride, t0, nb, pb, alpha, blk.ahead);
    }
    for (int i = 0; i < NG; ++i) {
      a.m[i] = m[i];
      a.l[i] = _mm512_reduce_add_ps(lsum[i]);
    }
  }
};

inline Kernel bf16dot_kernel(std::int32_t head_dim) noexcept {
  switch (head_dim) {
    case 64: return {&Bf16DotAttend<64>::run, Order::kNatural, Order::kUnpackPairs, 32};
    case 128: return {&Bf16DotAttend<128>::run, Order::kNatural, Order::kUnpackPairs, 32};
    case 256: return {&Bf16DotAttend<256>::run, Order::kNatural, Order::kUnpackPairs, 32};
    default: return {};
  }
}

}  // namespace hattn::cpu::detail
