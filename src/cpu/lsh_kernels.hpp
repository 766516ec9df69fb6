#pragma once
// The interface between the LSH driver (baseline code) and its per-ISA
// kernels: hashing (sign bits of a block of dot products with the planes),
// and the two passes of attention over gathered rows.

#include <bit>
#include <cstddef>
#include <cstdint>
#if defined(__BMI__)
#include <immintrin.h>
#endif

#include "cpu/attend.hpp"
#include "hattn/core/dtype.hpp"

namespace hattn::cpu::detail {

// bits[r * words + w] bit i = [x_r . plane_(64 w + i) > 0] for rows of x
// ([rows][D], `x_stride` floats apart), words w in [w0, w1), and planes in
// blocks of 64: wt[w][d][i] is entry d of plane 64 w + i (each block one
// contiguous stream of D * 64 floats).
using HashFn = void (*)(const float* x, std::int64_t rows, std::int64_t x_stride, std::int32_t D,
                        const float* wt, std::int32_t words, std::int32_t w0, std::int32_t w1,
                        std::uint64_t* bits) noexcept;

// Retrieval counts a position's collisions in one byte as a thermometer
// code (each collision shifts in a 1: c = c << 1 | 1, saturating at 0xff), so
// "at least m collisions" (m <= 8) is bit m - 1. A scan turns the bytes into
// a bitset: hits[w] bit i = bit m - 1 of marks[64 w + i], for w < words; it
// also zeroes marks[0, 64 words) for the next walk. With a list (room for
// the number of set bits + 4), it writes there the positions of the set bits,
// ascending, and returns their count (else 0).
using ScanFn = std::int32_t (*)(std::uint8_t* marks, std::int64_t words, std::int32_t m,
                                std::uint64_t* hits, std::uint32_t* list) noexcept;
inline constexpr std::int32_t kMaxThermometer = 8;

// Appends the positions of the set bits of `bits` (base + bit index) to
// out[n...]: four are written whatever the word holds (a sampled set of ~2 %
// puts 0-4 bits in almost every word; countr_zero(0) = 64 lands in a slot
// past the count), so only a rare fuller word branches. (A loop over the bits
// of each word mispredicted about once per word: row pointers of a bs:1 step
// at 64K positions took 0.72-0.80 TSC Mcycles that way, 0.21-0.26 from this
// list.) Returns the new count.
inline std::int32_t list_word(std::uint64_t bits, std::uint32_t base, std::uint32_t* out,
                              std::int32_t n) noexcept {
  // With BMI (the ISA kernels) tzcnt, which gives 64 for 0 by itself: GCC
  // turns std::countr_zero's test for 0 into a branch on the whole word.
  auto tz = [](std::uint64_t x) noexcept {
#if defined(__BMI__)
    return static_cast<std::uint32_t>(_tzcnt_u64(x));
#else
    return static_cast<std::uint32_t>(std::countr_zero(x));
#endif
  };
  const int count = std::popcount(bits);
  for (int i = 0; i < 4; ++i, bits &= bits - 1) out[n + i] = base + tz(bits);
  for (int i = 4; i < count; ++i, bits &= bits - 1) out[n + i] = base + tz(bits);
  return n + count;
}

// The sampled part runs the dense kernels (AttendArgs: rows by pointer,
// online softmax in base 2, q pre-scaled by qscale = scale log2 e) with a
// score transform. For head g (of the pass) and row j the kernel's score
// s = qscale q_g.k_j becomes
//   s + log2(e) corr(cos),  cos = (s / qscale - qmu[g]) / (qn[g] kn[j])
// with kn[j] = |k_j - mu| computed by the kernel from the row it loads (a
// stored norm per key would be one more random cache miss per sampled row)
// (cos clamped to [-1, 1]; 0 when kn[j] = 0), corr linearly interpolated in a
// table of -ln(u + eps) at cos = -1 + 2 i / intervals (no correction when
// corr is null), and -inf where umask[j] lacks bit g (head g did not sample
// row j; a null umask means every row is sampled by every head). AttendArgs::ctx
// points to this; AttendArgs::NH must be 1.
struct LshScoreCtx {
  const float* mu;             // [D], 64-byte aligned: the key mean, in the kernel's q order
  const std::uint16_t* umask;  // [n + kLshPad] (the padding is read, not used), or null
  const float* qn;             // [G]
  const float* qmu;            // [G]: q_g . mu
  float inv_qscale;
  const float* corr;  // [intervals + 1] or null
  std::int32_t intervals;
};
inline constexpr std::int32_t kLshPad = 16;

// corr(cos) as LshScoreCtx defines it, one value at a time (the portable
// kernel, and LshAttention::score_correction; the SIMD kernels do the same
// per vector). cos must be in [-1, 1].
inline float lsh_correction(const float* corr, std::int32_t intervals, float cos) noexcept {
  const float x = (cos + 1.0f) * (0.5f * static_cast<float>(intervals));
  const std::int32_t i =
      static_cast<std::int32_t>(x) < intervals - 1 ? static_cast<std::int32_t>(x) : intervals - 1;
  const float f = x - static_cast<float>(i);
  return corr[i] + f * (corr[i + 1] - corr[i]);
}

ScanFn lsh_scan_scalar() noexcept;
ScanFn lsh_scan_avx2() noexcept;
ScanFn lsh_scan_avx512() noexcept;
HashFn lsh_hash_scalar() noexcept;
HashFn lsh_hash_avx2() noexcept;
HashFn lsh_hash_avx512() noexcept;
Kernel lsh_kernel_scalar(std::int32_t head_dim, DType kv) noexcept;
Kernel lsh_kernel_avx2(std::int32_t head_dim, DType kv) noexcept;
Kernel lsh_kernel_avx512(std::int32_t head_dim, DType kv) noexcept;

// Of the three translation units' entry points, the one for `isa`.
template <class F>
F lsh_pick(CpuIsa isa, F avx512, F avx2, F scalar) noexcept {
  switch (isa) {
    case CpuIsa::kAvx512: return avx512;
    case CpuIsa::kAvx2: return avx2;
    case CpuIsa::kScalar: break;
  }
  return scalar;
}

inline HashFn lsh_hash_for(CpuIsa isa) noexcept {
  return lsh_pick(isa, &lsh_hash_avx512, &lsh_hash_avx2, &lsh_hash_scalar)();
}

inline ScanFn lsh_scan_for(CpuIsa isa) noexcept {
  return lsh_pick(isa, &lsh_scan_avx512, &lsh_scan_avx2, &lsh_scan_scalar)();
}

inline Kernel lsh_kernel_for(CpuIsa isa, std::int32_t head_dim, DType kv) noexcept {
  return lsh_pick(isa, &lsh_kernel_avx512, &lsh_kernel_avx2, &lsh_kernel_scalar)(head_dim, kv);
}

}  // namespace hattn::cpu::detail
