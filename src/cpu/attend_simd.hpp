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
//      factor, p = exp2(s - m) with an exp2 accurate to about 1 ulp;
//   3. values: per slice of 4 vectors of the head dim, the group's
//      accumulators stay in registers while the block's V rows stream by.
// Blocks are walked as the layout streams best (Walk), and the rows two
// blocks ahead are prefetched towards L2, one row's lines per row computed,
// in address order where the rows lie back to back (Ahead).
// bf16 rows are widened without shuffles: a 32-bit lane holding elements
// (2i, 2i+1) gives element 2i by a left shift and 2i+1 by masking, so
// vectors hold even then odd elements ("kernel order"); q and the
// accumulators use the same order and the driver undoes it at the end.

#include <xsimd/xsimd.hpp>

#include <immintrin.h>

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/attend.hpp"
#include "cpu/prefetch.hpp"

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
  // 2^x for the softmax weights, x <= 0 or -inf: x = k + f with k an integer
  // and |f| <= 1/2, 2^f from a degree-6 polynomial (a weighted least-squares
  // fit; relative error 1.6e-8 with its coefficients rounded to float, before
  // the rounding of the evaluation), scaled by 2^k with vscalefps. x below
  // -125 gives 0, so no weight is denormal; NaN stays NaN (an unordered
  // compare), as with xsimd::exp2. At most 0.95 ulp from exp2 in double over
  // [-125, 0]. 11 operations, about half of xsimd::exp2, which also handles
  // large positive x.
  static B exp2_nonpos(B x) noexcept {
    const __m512 shifter = _mm512_set1_ps(0x1.8p23f);  // x + shifter rounds x to an integer
    const __m512 k = _mm512_sub_ps(_mm512_add_ps(x, shifter), shifter);
    const __m512 f = _mm512_sub_ps(x, k);
    __m512 p = _mm512_set1_ps(1.5353360504377633e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3398873852565885e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.61843691766262e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5503323674201965e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022647738456726f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931471824645996f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    const __mmask16 normal =
        _mm512_cmp_ps_mask(x, _mm512_set1_ps(-125.0f), _CMP_NLT_UQ);  // x >= -125 or NaN
    return _mm512_maskz_scalef_ps(normal, p, k);
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
  static B exp2_nonpos(B x) noexcept { return xsimd::exp2(x); }
};
#endif

// Makes the compiler materialize x in a register here (an empty asm that
// "modifies" it), so later uses share one load instead of each folding its own.
template <class Batch>
inline void in_register(Batch& x) noexcept {
  typename Batch::register_type r = x;
  asm volatile("" : "+x"(r));
  x = r;
}

// Widening loads of one row in kernel order: load(row, i, out) fills
// kVecs vectors for load index i (0 .. D / (W * kVecs) - 1).
template <class A, class KvT>
struct RowLoad;

template <class A>
struct RowLoad<A, float> {
  using B = xsimd::batch<float, A>;
  static constexpr int kVecs = 1;
  static constexpr Order kOrder = Order::kNatural;
  static void load(const std::byte* row, int i, B* out) noexcept {
    out[0] = B::load_unaligned(reinterpret_cast<const float*>(row) + i * B::size);
  }
};

template <class A>
struct RowLoad<A, f16> {
  using B = xsimd::batch<float, A>;
  static constexpr int kVecs = 1;
  static constexpr Order kOrder = Order::kNatural;
  static void load(const std::byte* row, int i, B* out) noexcept {
    out[0] = SimdOps<A>::load_f16(row + i * B::size * 2);
  }
};

template <class A>
struct RowLoad<A, bf16> {
  using B = xsimd::batch<float, A>;
  using U = xsimd::batch<std::uint32_t, A>;
  static constexpr int kVecs = 2;
  static constexpr Order kOrder = Order::kEvenOdd;
  static void load(const std::byte* row, int i, B* out) noexcept {
    const U x = U::load_unaligned(reinterpret_cast<const std::uint32_t*>(row) + i * B::size);
    out[0] = xsimd::bitwise_cast<B>(x << 16);
    out[1] = xsimd::bitwise_cast<B>(x & U(0xffff0000u));
  }
};

// Score policy of SimdAttend: the plain kernel uses the scores as they are.
struct PlainScores {
  // Rows are prefetched a block ahead, all at once (they are sequential in
  // memory, so the hardware prefetchers carry most of the stream).
  static constexpr bool kRowPrefetch = false;
  // Whether the kernel also computes |k - mu| per row (mu from key_mean()).
  static constexpr bool kKeyNorm = false;
  static const float* key_mean(const AttendArgs&) noexcept { return nullptr; }
  template <class B>
  static B apply(const AttendArgs&, B s, int /*t0*/, int /*head*/, B /*kn*/) noexcept {
    return s;
  }
};

template <class A, int D, class KvT, int kSliceMax = 8, class Scores = PlainScores>
struct SimdAttend {
  using B = xsimd::batch<float, A>;
  using Ops = SimdOps<A>;
  using Load = RowLoad<A, KvT>;
  static constexpr int W = static_cast<int>(B::size);
  static constexpr int kNV = D / W;                 // f32 vectors per row
  static constexpr int kLoads = kNV / Load::kVecs;  // loads per row
  // V vectors per head kept in registers while a block's rows stream by, and
  // heads per V tile: 16 accumulators in all with 32 registers (AVX-512), 8
  // with 16 (AVX2: 4 heads x 2 vectors, so each V vector is loaded and
  // widened once per block and the tile, its V vectors and the broadcast
  // weights fit; 4 heads x 8 vectors spilled every accumulator).
  static constexpr int kSlice = W == 16 ? (kNV < kSliceMax ? kNV : kSliceMax) : 2;
  static constexpr int kHeadTile = W == 16 ? (16 / kSlice < 4 ? 16 / kSlice : 4) : 4;
  // With 32 vector registers the score phase keeps whole query rows in
  // registers (no reload of q per key row): as many heads as fit in 16.
  static constexpr bool kQInRegs = W == 16;
  static constexpr int kScoreTile =
      kQInRegs ? (16 / kNV > 4 ? 4 : (16 / kNV < 1 ? 1 : 16 / kNV)) : kHeadTile;
  // K rows scored together by a score tile: with 16 registers two rows share
  // each load of q (from L1) and give 2 * kScoreTile independent FMA chains.
  static constexpr int kScoreRows = kQInRegs ? 1 : 2;
  // With 16 registers a value pass is 8 FMAs per row: the ahead block's V
  // lines are prefetched by the score passes instead, whose rows carry more
  // work, so the value rows stay a straight run of loads and FMAs (Zen 3,
  // values alone from L2: 20.6 -> 14.6 ns per KV head-row).
  static constexpr bool kVAheadInScores = W == 8;
  static_assert(kNV % Load::kVecs == 0 && kNV % kSlice == 0 && kSlice % Load::kVecs == 0);

  static constexpr std::size_t kRowBytes = D * sizeof(KvT);
  static constexpr int kLinesPerRow = static_cast<int>(kRowBytes / 64);
  // Rows a gathered-row kernel (Scores::kRowPrefetch) prefetches ahead: K
  // rows kAheadK ahead, V rows kAheadV ahead. AVX-512: three blocks for both
  // (Zen 4, 64K tokens, one query head per call: 1 block 2.3-2.6 ms per step,
  // 2-4 blocks 1.6-2.0; every other line only was worse once each row carried
  // less arithmetic). AVX2 (Zen 3, a bs:1 step's sampled rows at 64K on both
  // cores, variants alternating in one process over the same row sets, ms):
  // one distance for both was best near one block (4, 8, 16, 24, 40, 64 rows:
  // 1.96, 1.98, 2.03, 2.04, 2.06, 2.17), and K closer with V further was
  // 3-8 % faster than 8 / 8 (6 / 16: 2.35-2.43 against 2.54-2.64 ms); the V
  // rows are used after the whole block's K rows. In whole steps of
  // bench_lsh about 1 % (docs/lsh.md, session 13).
  static constexpr int kAheadK = W == 8 ? 6 : 3 * W;
  static constexpr int kAheadV = W == 8 ? 2 * W : 3 * W;
  // A second stage pulls the gathered rows from L2 into L1 (prefetcht0)
  // shortly before their use: K rows kNearK ahead, V rows kNearV ahead; 0
  // for none. By then the rows are in L2 or on their way, so each line holds
  // an L1 miss buffer only briefly. AVX2 (Zen 3, the same harness: the kernel
  // 10-12 % faster; K / V at 2 / 4, 3 / 4, 3 / 6, 3 / 8, 2 / 8 and 4 / 8 rows
  // all within 1 %. Whole bench_lsh steps, alternating in one process: 6-10 %
  // faster at 16K and 64K, bs:1 and bs:8, diffuse and peaky.) AVX-512 (an
  // Emerald Rapids guest, bench_lsh lsh_vs_dense at 64K, three rounds of
  // separate builds, speedup at bs:1 / bs:8): none 8.01-8.21 / 8.25-8.32,
  // 3 / 16 rows 8.25-8.34 / 8.14-8.47, 2 / 8 rows 8.36-8.50 / 8.47-8.70
  // (docs/lsh.md, session 16; not measured on Zen 4).
  static constexpr int kNearK = W == 8 ? 3 : 2;
  static constexpr int kNearV = W == 8 ? W : W / 2;

  // The first k_rows K rows and v_rows V rows of KV head hk towards L2: a
  // gathered-row call (Scores::kRowPrefetch), before its first block. (Towards
  // L1 a burst of 3 W rows' lines overflowed the L1's miss buffers; LSH
  // step at 64K, two batches of six alternating runs, medians: bs:1 1.48 and
  // 1.56 ms against 1.64 and 1.58, bs:8 11.6 and 11.2 against 11.7 and 12.7.)
  static void prefetch_head(const AttendArgs& a, int hk, int k_rows, int v_rows) noexcept {
    for (int r = 0; r < k_rows; ++r) prefetch_row(a.k[r] + hk * a.k_head_stride);
    for (int r = 0; r < v_rows; ++r) prefetch_row(a.v[r] + hk * a.v_head_stride);
  }

  // Every line of one row, towards L2 (or with kL1, L1).
  template <bool kL1 = false>
  static void prefetch_row(const std::byte* row) noexcept {
    for (int c = 0; c < kLinesPerRow; ++c) {
      if constexpr (kL1)
        prefetch_l1(row + 64 * c);
      else
        prefetch_l2(row + 64 * c);
    }
  }

  // Blocks the streamed rows are prefetched ahead, in walk order: 8 KiB of K
  // and 8 KiB of V ahead for bf16 rows of 128. (One thread, bf16, 64K rows of
  // 8 heads from memory: 17.6 / 18.3 / 17.8 / 15.8 / 14.7 GB/s for 1 / 2 / 3 /
  // 4 / 6 blocks, 20.3 from cache; both threads of bench_cpu_dense: 1-3 within
  // noise.)
  static constexpr int kAheadBlocks = 2;

  // The rows of a block kAheadBlocks ahead in walk order, prefetched towards
  // L2 (prefetcht1) while this block is computed: row t's lines while row t
  // is (for back-to-back rows, as many lines in address order: kc, vc), and
  // split between the passes over the row (query-head tiles, slices of the
  // head dim), so the requests are spread out. They then leave the
  // L1's miss buffers to the rows in use and to the per-head q and
  // accumulators. (On Zen 4 a burst of prefetches to L1 halved a stream's
  // rate; without prefetches the hardware prefetchers fell behind whenever
  // the state missed L1; splitting f32 rows' 8 lines over two passes took one
  // thread from 14.1 to 19.1 GB/s: docs/cpu-dense.md.)
  struct Ahead {
    const std::byte* const* k = nullptr;  // row pointers of the block's rows
    const std::byte* const* v = nullptr;
    std::ptrdiff_t koff = 0, voff = 0;  // byte offset of the block's KV head
    int nb = 0;                         // rows; 0: nothing to prefetch
    // The lines of a row pass `part` of `parts` prefetches: [c0, c1) of L.
    struct Span {
      int c0, c1;
    };
    static Span span(int part, int parts) noexcept {
      return {part * kLinesPerRow / parts, (part + 1) * kLinesPerRow / parts};
    }
    // When the block's rows lie back to back (row t at row 0 + t * L lines,
    // as in HND pages of W or more tokens), kc and vc run through its lines
    // in address order: each call takes as many lines as its span holds, so
    // a row's passes together still prefetch L lines, but one sequential
    // stream goes out instead of a span of every row per pass, and no row
    // pointer is read. (Ice Lake guest, both threads, bench_cpu_dense at
    // kv:32768: docs/cpu-dense.md, session 18.) Otherwise (nullptr) row t's
    // span is prefetched from its own pointer.
    const std::byte* kc = nullptr;
    const std::byte* vc = nullptr;
    // (The cursor is set only for a full ahead block, so t < nb holds there.)
    void k_lines(int t, Span s) noexcept {
      if (kc != nullptr)
        from_cursor(kc, s);
      else if (t < nb)
        lines(k[t] + koff, s);
    }
    void v_lines(int t, Span s) noexcept {
      if (vc != nullptr)
        from_cursor(vc, s);
      else if (t < nb)
        lines(v[t] + voff, s);
    }
    static void from_cursor(const std::byte*& cursor, Span s) noexcept {
      for (int c = s.c0; c < s.c1; ++c, cursor += 64) prefetch_l2(cursor);
    }
    static void lines(const std::byte* row, Span s) noexcept {
      for (int c = s.c0; c < s.c1; ++c) prefetch_l2(row + 64 * c);
    }
    // Sets kc and vc for a block whose K (V) rows lie back to back.
    void set_cursors() noexcept {
      if (back_to_back(k, nb)) kc = k[0] + koff;
      if (back_to_back(v, nb)) vc = v[0] + voff;
    }
    // Whether rows[0..nb) are back to back: a full block is checked with
    // vector compares, a partial one (the end of a call) is not used.
    static bool back_to_back(const std::byte* const* rows, int nb) noexcept {
      if (nb != W) return false;
      using P = xsimd::batch<std::uint64_t, A>;
      constexpr int kP = static_cast<int>(P::size);
      alignas(64) static constexpr auto kOffsets = [] {
        std::array<std::uint64_t, W> o{};
        for (int t = 0; t < W; ++t) o[static_cast<std::size_t>(t)] = std::uint64_t(t) * kRowBytes;
        return o;
      }();
      const P base(reinterpret_cast<std::uint64_t>(rows[0]));
      auto ok = P::load_unaligned(reinterpret_cast<const std::uint64_t*>(rows)) - base ==
                P::load_aligned(kOffsets.data());
      for (int i = kP; i < W; i += kP)
        ok = ok & (P::load_unaligned(reinterpret_cast<const std::uint64_t*>(rows + i)) - base ==
                   P::load_aligned(kOffsets.data() + i));
      return xsimd::all(ok);
    }
  };

  // Rows of one KV head walked before the next head (see AttendArgs::visit).
  static int visit_rows(const AttendArgs& a) noexcept { return a.visit > W ? a.visit / W * W : W; }

  // One block: rows [t0, t0 + nb) of KV head hk, and what to prefetch.
  struct Block {
    int hk = 0, t0 = 0, nb = 0;
    Ahead ahead;
  };

  // The blocks of a call in the order their rows are read: per visit of
  // visit_rows(a) rows, head by head, each head's blocks in row order. Each
  // head sees its blocks in row order whatever the visit, so results do not
  // depend on it. A loop (`for (Walk w(a, pf); w.next(b);)`) rather than a
  // callback, so target-attributed kernels can use it.
  class Walk {
   public:
    Walk(const AttendArgs& a, bool prefetch) noexcept : a_(a), visit_(visit_rows(a)) {
      cur_ = {0, a.n < visit_ ? a.n : visit_, 0, 0, a.n <= 0 || a.NH <= 0};
      ahead_ = cur_;
      ahead_.done = ahead_.done || !prefetch;
      for (int i = 0; i < kAheadBlocks && !ahead_.done; ++i) step(ahead_);
    }
    bool next(Block& b) noexcept {
      if (cur_.done) return false;
      b.hk = cur_.hk;
      b.t0 = cur_.t0;
      b.nb = cur_.v1 - cur_.t0 < W ? cur_.v1 - cur_.t0 : W;
      b.ahead = {};
      if (!ahead_.done) {
        b.ahead = {a_.k + ahead_.t0, a_.v + ahead_.t0, ahead_.hk * a_.k_head_stride,
                   ahead_.hk * a_.v_head_stride,
                   ahead_.v1 - ahead_.t0 < W ? ahead_.v1 - ahead_.t0 : W};
        b.ahead.set_cursors();
        step(ahead_);
      }
      step(cur_);
      return true;
    }

   private:
    struct Pos {
      int v0, v1, hk, t0;  // visit [v0, v1), head, block start
      bool done;
    };
    void step(Pos& p) const noexcept {
      if (p.t0 + W < p.v1) {
        p.t0 += W;
      } else if (p.hk + 1 < a_.NH) {
        ++p.hk;
        p.t0 = p.v0;
      } else {
        p.v0 = p.v1;
        p.v1 = a_.n - p.v0 < visit_ ? a_.n : p.v0 + visit_;
        p.hk = 0;
        p.t0 = p.v0;
        p.done = p.v0 >= a_.n;
      }
    }
    const AttendArgs& a_;
    int visit_;
    Pos cur_{}, ahead_{};
  };

  // Online softmax in base 2 for one query head and block: reduces the W
  // dot-product vectors (nb valid) to scores, raises the running max m
  // (rescaling the running sum l; alpha = the factor, 1 when m holds) and
  // returns the weights 2^(s - m). The caller adds them, or what it rounds
  // them to, to l.
  template <class Transform>
  static B block_weights(const float (*dots)[W], int nb, float& m, B& l, float& alpha,
                         Transform&& transform) noexcept {
    B rows[W];
    for (int t = 0; t < W; ++t) rows[t] = t < nb ? B::load_aligned(dots[t]) : B(0.0f);
    B s = transform(Ops::haddp(rows));
    if (nb < W) s = Ops::mask_tail(s, nb);
    alpha = 1.0f;
    // Rare after the first block: a compare, not the block maximum (a chain
    // of shuffles), decides whether the maximum grows.
    // (bm > m is tested again: with a NaN score hmax may return NaN, which,
    // as before this shortcut, does not become the maximum.)
    if (xsimd::any(s > B(m))) {
      const float bm = Ops::hmax(s);
      if (bm > m) {
        alpha = std::exp2(m - bm);  // m = -inf -> 0
        m = bm;
        l = l * B(alpha);
      }
    }
    if (m == -INFINITY) return B(0.0f);  // every score so far masked out (sampled kernels)
    return Ops::exp2_nonpos(s - B(m));
  }

  // Per-call view of one KV head's rows and state.
  struct Head {
    const float* q;  // [G][D]
    float* acc;      // [G][D]
    const std::byte* const* k;
    const std::byte* const* v;
    std::ptrdiff_t koff, voff;  // byte offset of this head's rows
    int n;                      // rows of the call
    const float* kmu;           // [D], kernel order: Scores::kKeyNorm only
    // The ahead block's lines each score pass and each value pass prefetch,
    // computed once per call (a division each: per pass and block, the
    // divisions cost AVX2's 8-row blocks a fifth of their time).
    const typename Ahead::Span* kspans;
    const typename Ahead::Span* vspans;
  };

  // The prefetches of a gathered-row call (Scores::kRowPrefetch) while row i
  // is computed: K and V rows towards L2 kAheadK / kAheadV ahead, then into
  // L1 kNearK / kNearV ahead.
  static void prefetch_gathered(const Head& hd, int i) noexcept {
    if (i + kAheadK < hd.n) prefetch_row(hd.k[i + kAheadK] + hd.koff);
    if (i + kAheadV < hd.n) prefetch_row(hd.v[i + kAheadV] + hd.voff);
    if constexpr (kNearK > 0)
      if (i + kNearK < hd.n) prefetch_row<true>(hd.k[i + kNearK] + hd.koff);
    if constexpr (kNearV > 0)
      if (i + kNearV < hd.n) prefetch_row<true>(hd.v[i + kNearV] + hd.voff);
  }
  static constexpr int kMaxScorePasses = (kMaxGroupPerPass + kScoreTile - 1) / kScoreTile;
  static constexpr int kMaxValuePasses =
      (kMaxGroupPerPass + kHeadTile - 1) / kHeadTile * (kNV / kSlice);

  // Scores of rows [t0, t0 + nb) for query heads [h0, h0 + HT): dots[h][t]
  // holds the W-lane partial products of row t, reduced later.
  // Passes over a block's K rows (score tiles) and V rows (head tiles x
  // slices of the head dim): the ahead block's lines are split among them.
  static int score_passes(int G) noexcept { return (G + kScoreTile - 1) / kScoreTile; }
  static int value_passes(int G) noexcept {
    return (G + kHeadTile - 1) / kHeadTile * (kNV / kSlice);
  }

  template <int HT>
  static void score_tile(const Head& hd, int t0, int nb, int h0, float (*dots)[W][W],
                         float (*ndots)[W], Ahead& ahead) noexcept {
    const typename Ahead::Span lines = hd.kspans[h0 / kScoreTile];
    // With 32 registers the tile's query rows are loaded once, not per row.
    constexpr bool kRegs = kQInRegs && HT * kNV <= 16;
    B qr[kRegs ? HT : 1][kRegs ? kNV : 1];
    if constexpr (kRegs)
      for (int h = 0; h < HT; ++h)
        for (int i = 0; i < kNV; ++i) qr[h][i] = B::load_aligned(hd.q + (h0 + h) * D + i * W);
    int t = 0;
    if constexpr (kScoreRows > 1)
      for (; t + kScoreRows <= nb; t += kScoreRows)
        score_rows<HT, kScoreRows, kRegs>(hd, t0, t, h0, dots, ndots, ahead, lines, qr);
    for (; t < nb; ++t) score_rows<HT, 1, kRegs>(hd, t0, t, h0, dots, ndots, ahead, lines, qr);
  }

  // Rows [t, t + R) of the block at t0: dots[h][t + r] = the W-lane partial
  // products of row t + r with query head h0 + h. With kRegs the tile's query
  // rows are in qr, else they are read from L1.
  template <int HT, int R, bool kRegs>
  static void score_rows(const Head& hd, int t0, int t, int h0, float (*dots)[W][W],
                         float (*ndots)[W], Ahead& ahead, typename Ahead::Span lines,
                         const B (&qr)[kRegs ? HT : 1][kRegs ? kNV : 1]) noexcept {
    const float* q = hd.q + h0 * D;
    auto q_at = [&](int h, int vi) {
      if constexpr (kRegs)
        return qr[h][vi];
      else
        return B::load_aligned(q + h * D + vi * W);
    };
    const std::byte* krow[R];
    for (int r = 0; r < R; ++r) {
      // Gathered rows (random addresses): once per row, by the first tile.
      if constexpr (Scores::kRowPrefetch)
        if (h0 == 0) prefetch_gathered(hd, t0 + t + r);
      ahead.k_lines(t + r, lines);
      if constexpr (kVAheadInScores) ahead.v_lines(t + r, lines);
      krow[r] = hd.k[t0 + t + r] + hd.koff;
    }
    B acc[R][HT];
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < HT; ++h) acc[r][h] = B(0.0f);
    // |k - mu|^2 in W lanes, once per row (the first tile).
    constexpr bool kNorm = Scores::kKeyNorm;
    B nacc[R];
    for (int r = 0; r < R; ++r) nacc[r] = B(0.0f);
    for (int i = 0; i < kLoads; ++i) {
      B kv[R][Load::kVecs];
      for (int r = 0; r < R; ++r) Load::load(krow[r], i, kv[r]);
      for (int j = 0; j < Load::kVecs; ++j) {
        for (int h = 0; h < HT; ++h) {
          B qv = q_at(h, i * Load::kVecs + j);
          // GCC would fold this load into each of the R FMAs (R loads of q
          // instead of one); with 16 registers the loads, not the FMAs,
          // then bound the tile (AVX2 kernel from L2: 51 -> 47 ns per KV
          // head-row with the barrier).
          if constexpr (!kRegs && R > 1) in_register(qv);
          for (int r = 0; r < R; ++r) acc[r][h] = xsimd::fma(kv[r][j], qv, acc[r][h]);
        }
        if constexpr (kNorm)
          if (h0 == 0) {
            const B mu = B::load_aligned(hd.kmu + (i * Load::kVecs + j) * W);
            for (int r = 0; r < R; ++r) {
              const B dv = kv[r][j] - mu;
              nacc[r] = xsimd::fma(dv, dv, nacc[r]);
            }
          }
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int h = 0; h < HT; ++h) acc[r][h].store_aligned(dots[h0 + h][t + r]);
      if constexpr (kNorm)
        if (h0 == 0) nacc[r].store_aligned(ndots[t + r]);
    }
  }

  // acc[h] = alpha[h] * acc[h] + sum_t p[h][t] v[t] for query heads
  // [h0, h0 + HT), a slice of the head dim at a time so the accumulators stay
  // in registers while the block's V rows stream by.
  template <int HT>
  static void value_tile(const Head& hd, int t0, int nb, int h0, const float (*p)[W],
                         const float* alpha, Ahead& ahead) noexcept {
    for (int s0 = 0; s0 < kNV; s0 += kSlice) {
      const int pass = h0 / kHeadTile * (kNV / kSlice) + s0 / kSlice;
      B acc[HT][kSlice];
      for (int h = 0; h < HT; ++h) {
        const B al(alpha[h0 + h]);
        for (int j = 0; j < kSlice; ++j)
          acc[h][j] = B::load_aligned(hd.acc + (h0 + h) * D + (s0 + j) * W) * al;
      }
      auto row = [&](int t) {
        if constexpr (!kVAheadInScores) ahead.v_lines(t, hd.vspans[pass]);
        B vv[kSlice];
        for (int j = 0; j < kSlice; j += Load::kVecs)
          Load::load(hd.v[t0 + t] + hd.voff, (s0 + j) / Load::kVecs, vv + j);
        for (int h = 0; h < HT; ++h) {
          const B ph(p[h0 + h][t]);
          for (int j = 0; j < kSlice; ++j) acc[h][j] = xsimd::fma(ph, vv[j], acc[h][j]);
        }
      };
      // With 16 registers a pass holds only 8 FMAs per row: a full block's
      // rows are unrolled (a constant trip count, no loop bound per row).
      if (W == 8 && nb == W)
        for (int t = 0; t < W; ++t) row(t);
      else
        for (int t = 0; t < nb; ++t) row(t);
      for (int h = 0; h < HT; ++h)
        for (int j = 0; j < kSlice; ++j)
          acc[h][j].store_aligned(hd.acc + (h0 + h) * D + (s0 + j) * W);
    }
  }

  // Calls f(std::integral_constant<int, HT>, h0) over tiles of up to Tile
  // heads covering [0, G).
  template <int Tile, class F>
  static void for_each_tile(int G, F&& f) noexcept {
    int h0 = 0;
    for (; h0 + Tile <= G; h0 += Tile) f(std::integral_constant<int, Tile>{}, h0);
    const int rest = G - h0;
    if constexpr (Tile > 1)
      if (rest == 1) f(std::integral_constant<int, 1>{}, h0);
    if constexpr (Tile > 2)
      if (rest == 2) f(std::integral_constant<int, 2>{}, h0);
    if constexpr (Tile > 3)
      if (rest == 3) f(std::integral_constant<int, 3>{}, h0);
  }

  static void run(const AttendArgs& a) noexcept {
    const int G = a.G, NG = a.NH * a.G;
    if constexpr (Scores::kRowPrefetch)  // the rows before the first ahead ones
      prefetch_head(a, 0, a.n < kAheadK ? a.n : kAheadK, a.n < kAheadV ? a.n : kAheadV);
    alignas(64) float dots[kMaxGroupPerPass][W][W];
    alignas(64) float ndots[W][W];  // |k - mu|^2 partials (Scores::kKeyNorm)
    alignas(64) float p[kMaxGroupPerPass][W];
    float alpha[kMaxGroupPerPass];
    float m[kMaxHeadsPerPass];
    B lsum[kMaxHeadsPerPass];  // running sums stay vectors; reduced once per call
    for (int i = 0; i < NG; ++i) {
      m[i] = a.m[i];
      alignas(64) float l0[W] = {a.l[i]};
      lsum[i] = B::load_aligned(l0);
    }

    typename Ahead::Span kspans[kMaxScorePasses], vspans[kMaxValuePasses];
    for (int i = 0, n = score_passes(G); i < n; ++i) kspans[i] = Ahead::span(i, n);
    if constexpr (!kVAheadInScores)
      for (int i = 0, n = value_passes(G); i < n; ++i) vspans[i] = Ahead::span(i, n);

    Block blk;
    for (Walk w(a, !Scores::kRowPrefetch); w.next(blk);) {
      const int hk = blk.hk, t0 = blk.t0, nb = blk.nb;
      const Head hd{a.q + hk * G * D,
                    a.acc + hk * G * D,
                    a.k,
                    a.v,
                    hk * a.k_head_stride,
                    hk * a.v_head_stride,
                    a.n,
                    Scores::key_mean(a),
                    kspans,
                    vspans};
      float* mh = m + hk * G;
      B* lh = lsum + hk * G;
      for_each_tile<kScoreTile>(G, [&](auto ht, int h0) {
        score_tile<ht.value>(hd, t0, nb, h0, dots, ndots, blk.ahead);
      });
      B kn(0.0f);
      if constexpr (Scores::kKeyNorm) {
        B rows[W];
        for (int t = 0; t < W; ++t) rows[t] = t < nb ? B::load_aligned(ndots[t]) : B(0.0f);
        kn = xsimd::sqrt(Ops::haddp(rows));
      }
      for (int h = 0; h < G; ++h) {
        const B pv = block_weights(dots[h], nb, mh[h], lh[h], alpha[h],
                                   [&](B sc) { return Scores::apply(a, sc, t0, hk * G + h, kn); });
        pv.store_aligned(p[h]);
        lh[h] = lh[h] + pv;
      }
      for_each_tile<kHeadTile>(
          G, [&](auto ht, int h0) { value_tile<ht.value>(hd, t0, nb, h0, p, alpha, blk.ahead); });
    }
    for (int i = 0; i < NG; ++i) {
      a.m[i] = m[i];
      a.l[i] = xsimd::hadd(lsum[i]);
    }
  }
};

// The dense kernels' value tiles with 32 registers: slices of 4 vectors for 4
// query heads, so each V row is loaded (and widened) once per block rather
// than once per pair of heads. Emerald Rapids guest, bench_cpu_dense at
// kv:32768, three alternating rounds of separate builds, medians of the rounds'
// bw_fraction at bs:1 / bs:8, 2 heads x 8 vectors -> 4 x 4: bf16 0.640 / 0.704
// -> 0.644 / 0.716, f16 0.620 / 0.659 -> 0.637 / 0.681, f32 0.791 / 0.851 ->
// 0.834 / 0.850; the kernel alone from cache 16.6-18.1 -> 18.1-19.4 GiB/s
// (docs/cpu-dense.md, session 17). The sampled (LSH) kernels keep 8.
inline constexpr int kDenseSliceMax = 4;

// A plain switch, not hattn::dispatch: an ISA TU must not instantiate
// anything a baseline TU could also instantiate (see kernels_avx512.cpp).
template <class A, int D, class KvT>
Kernel simd_kernel_of() noexcept {
  constexpr Order o = RowLoad<A, KvT>::kOrder;
  return {&SimdAttend<A, D, KvT, kDenseSliceMax>::run, o, o,
          2 * static_cast<std::int32_t>(xsimd::batch<float, A>::size)};
}

template <class A, int D>
Kernel simd_kernel_d(DType kv) noexcept {
  switch (kv) {
    case DType::kF32: return simd_kernel_of<A, D, float>();
    case DType::kF16: return simd_kernel_of<A, D, f16>();
    case DType::kBF16: return simd_kernel_of<A, D, bf16>();
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
