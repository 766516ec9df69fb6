// Portable kernel: the same blocked online softmax as the SIMD kernels, in
// plain C++, for CPUs without AVX2 (and as a check on the others).
#include <cmath>
#include <cstring>

#include "cpu/attend.hpp"
#include "cpu/scalar_row.hpp"

namespace hattn::cpu::detail {
namespace {

constexpr int kBlock = 16;

template <int D, class KvT>
void attend_head(const AttendArgs& a, int hk, int t0, int nb) noexcept {
  float s[kMaxGroupPerPass][kBlock];
  float row[D];
  const float* q = a.q + hk * a.G * D;
  float* acc = a.acc + hk * a.G * D;
  float* m = a.m + hk * a.G;
  float* l = a.l + hk * a.G;
  for (int t = 0; t < nb; ++t) {
    for (int d = 0; d < D; ++d) row[d] = row_element<KvT>(a.k[t0 + t] + hk * a.k_head_stride, d);
    for (int h = 0; h < a.G; ++h) {
      float dot = 0.0f;
      for (int d = 0; d < D; ++d) dot += q[h * D + d] * row[d];
      s[h][t] = dot;
    }
  }
  for (int h = 0; h < a.G; ++h) {
    float m_new = m[h];
    for (int t = 0; t < nb; ++t) m_new = s[h][t] > m_new ? s[h][t] : m_new;
    const float alpha = std::exp2(m[h] - m_new);
    float sum = 0.0f;
    for (int t = 0; t < nb; ++t) {
      s[h][t] = std::exp2(s[h][t] - m_new);
      sum += s[h][t];
    }
    l[h] = l[h] * alpha + sum;
    m[h] = m_new;
    for (int d = 0; d < D; ++d) acc[h * D + d] *= alpha;
  }
  for (int t = 0; t < nb; ++t) {
    for (int d = 0; d < D; ++d) row[d] = row_element<KvT>(a.v[t0 + t] + hk * a.v_head_stride, d);
    for (int h = 0; h < a.G; ++h)
      for (int d = 0; d < D; ++d) acc[h * D + d] += s[h][t] * row[d];
  }
}

template <int D, class KvT>
void attend_scalar(const AttendArgs& a) noexcept {
  for (int t0 = 0; t0 < a.n; t0 += kBlock) {
    const int nb = a.n - t0 < kBlock ? a.n - t0 : kBlock;
    for (int hk = 0; hk < a.NH; ++hk) attend_head<D, KvT>(a, hk, t0, nb);
  }
}

template <int D>
Kernel kernel_d(DType kv) noexcept {
  switch (kv) {
    case DType::kF32: return {&attend_scalar<D, float>};
    case DType::kF16: return {&attend_scalar<D, f16>};
    case DType::kBF16: return {&attend_scalar<D, bf16>};
  }
  return {};
}

}  // namespace

Kernel kernel_scalar(std::int32_t head_dim, DType kv) noexcept {
  switch (head_dim) {
    case 64: return kernel_d<64>(kv);
    case 128: return kernel_d<128>(kv);
    case 256: return kernel_d<256>(kv);
    default: return {};
  }
}

}  // namespace hattn::cpu::detail
