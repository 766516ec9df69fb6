// Portable LSH kernels, for CPUs without AVX2 (and as a check on the others).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/lsh_kernels.hpp"
#include "cpu/scalar_row.hpp"

namespace hattn::cpu::detail {
namespace {

void hash_scalar(const float* x, std::int64_t rows, std::int64_t xs, std::int32_t D,
                 const float* wt, std::int32_t words, std::int32_t w0, std::int32_t w1,
                 std::uint64_t* bits) noexcept {
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int32_t w = w0; w < w1; ++w) {
      float acc[64] = {};
      for (std::int32_t d = 0; d < D; ++d) {
        const float xv = x[r * xs + d];
        const float* p = wt + (std::int64_t{w} * D + d) * 64;
        for (int i = 0; i < 64; ++i) acc[i] += p[i] * xv;
      }
      std::uint64_t m = 0;
      for (int i = 0; i < 64; ++i) m |= std::uint64_t{acc[i] > 0.0f} << i;
      bits[r * words + w] = m;
    }
  }
}

// The sampled kernel: the dense kernels' blocked online softmax in base 2,
// with the score transform of LshScoreCtx.
template <int D, class KvT>
void attend_scalar(const AttendArgs& a) noexcept {
  constexpr int kBlock = 16;
  const auto& c = *static_cast<const LshScoreCtx*>(a.ctx);
  float row[D];
  float s[kMaxGroupPerPass][kBlock];
  for (std::int32_t t0 = 0; t0 < a.n; t0 += kBlock) {
    const std::int32_t nb = std::min(kBlock, a.n - t0);
    for (std::int32_t t = 0; t < nb; ++t) {
      float n2 = 0.0f;
      for (int d = 0; d < D; ++d) {
        row[d] = row_element<KvT>(a.k[t0 + t], d);
        n2 += (row[d] - c.mu[d]) * (row[d] - c.mu[d]);
      }
      const float kn = std::sqrt(n2);
      for (std::int32_t g = 0; g < a.G; ++g) {
        float dot = 0.0f;
        for (int d = 0; d < D; ++d) dot += a.q[std::int64_t{g} * D + d] * row[d];
        float sv = dot;
        if (c.corr != nullptr) {
          const float den = c.qn[g] * kn;
          float cs = den > 0.0f ? (dot * c.inv_qscale - c.qmu[g]) / den : 0.0f;
          cs = std::min(std::max(cs, -1.0f), 1.0f);
          sv += lsh_correction(c.corr, c.intervals, cs) * 1.4426950408889634f;
        }
        if (c.umask != nullptr && ((c.umask[t0 + t] >> g) & 1u) == 0) sv = -INFINITY;
        s[g][t] = sv;
      }
    }
    for (std::int32_t g = 0; g < a.G; ++g) {
      float bm = -INFINITY;
      for (std::int32_t t = 0; t < nb; ++t) bm = std::max(bm, s[g][t]);
      float* acc = a.acc + std::int64_t{g} * D;
      if (bm > a.m[g]) {
        const float alpha = std::exp2(a.m[g] - bm);
        for (int d = 0; d < D; ++d) acc[d] *= alpha;
        a.l[g] *= alpha;
        a.m[g] = bm;
      }
      if (a.m[g] == -INFINITY) continue;
      for (std::int32_t t = 0; t < nb; ++t) {
        const float p = std::exp2(s[g][t] - a.m[g]);
        if (p == 0.0f) continue;
        a.l[g] += p;
        for (int d = 0; d < D; ++d) acc[d] += p * row_element<KvT>(a.v[t0 + t], d);
      }
    }
  }
}

template <int D>
Kernel by_type(DType kv) noexcept {
  switch (kv) {
    case DType::kF32: return {&attend_scalar<D, float>, Order::kNatural, Order::kNatural, 1};
    case DType::kF16: return {&attend_scalar<D, f16>, Order::kNatural, Order::kNatural, 1};
    case DType::kBF16: return {&attend_scalar<D, bf16>, Order::kNatural, Order::kNatural, 1};
  }
  return {};
}

std::int32_t scan_scalar(std::uint8_t* marks, std::int64_t words, std::int32_t m,
                         std::uint64_t* hits, std::uint32_t* list) noexcept {
  std::int32_t n = 0;
  for (std::int64_t w = 0; w < words; ++w) {
    std::uint64_t h = 0;
    for (int i = 0; i < 64; ++i) h |= std::uint64_t{(marks[64 * w + i] >> (m - 1)) & 1u} << i;
    hits[w] = h;
    std::fill_n(marks + 64 * w, 64, std::uint8_t{0});
    if (list != nullptr) n = list_word(h, static_cast<std::uint32_t>(w * 64), list, n);
  }
  return n;
}

}  // namespace

ScanFn lsh_scan_scalar() noexcept { return &scan_scalar; }
HashFn lsh_hash_scalar() noexcept { return &hash_scalar; }

Kernel lsh_kernel_scalar(std::int32_t head_dim, DType kv) noexcept {
  switch (head_dim) {
    case 64: return by_type<64>(kv);
    case 128: return by_type<128>(kv);
    case 256: return by_type<256>(kv);
    default: return {};
  }
}

}  // namespace hattn::cpu::detail
