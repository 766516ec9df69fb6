// Portable LSH kernels, for CPUs without AVX2 (and as a check on the others).
#include <cstring>

#include "cpu/lsh_kernels.hpp"

namespace hattn::cpu::detail {
namespace {

void hash_scalar(const float* x, std::int64_t rows, std::int64_t xs, std::int32_t D,
                 const float* wt, std::int32_t J, std::uint64_t* bits) noexcept {
  const std::int32_t words = J / 64;
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int32_t w = 0; w < words; ++w) {
      float acc[64] = {};
      for (std::int32_t d = 0; d < D; ++d) {
        const float xv = x[r * xs + d];
        const float* p = wt + std::int64_t{d} * J + std::int64_t{w} * 64;
        for (int i = 0; i < 64; ++i) acc[i] += p[i] * xv;
      }
      std::uint64_t m = 0;
      for (int i = 0; i < 64; ++i) m |= std::uint64_t{acc[i] > 0.0f} << i;
      bits[r * words + w] = m;
    }
  }
}

template <class KvT>
float load(const std::byte* row, int d) noexcept {
  KvT x;
  std::memcpy(&x, row + d * sizeof(KvT), sizeof(KvT));
  return to_float(x);
}

template <int D, class KvT>
void dots_scalar(const float* q, std::int32_t G, const std::byte* const* k, std::int32_t n,
                 float* out, std::int32_t ld) noexcept {
  float row[D];
  for (std::int32_t j = 0; j < n; ++j) {
    for (int d = 0; d < D; ++d) row[d] = load<KvT>(k[j], d);
    for (std::int32_t g = 0; g < G; ++g) {
      float s = 0.0f;
      for (int d = 0; d < D; ++d) s += q[std::int64_t{g} * D + d] * row[d];
      out[std::int64_t{g} * ld + j] = s;
    }
  }
}

template <int D, class KvT>
void accumulate_scalar(const float* w, std::int32_t ld, std::int32_t G, const std::byte* const* v,
                       std::int32_t n, float* acc) noexcept {
  float row[D];
  for (std::int32_t j = 0; j < n; ++j) {
    for (int d = 0; d < D; ++d) row[d] = load<KvT>(v[j], d);
    for (std::int32_t g = 0; g < G; ++g) {
      const float wg = w[std::int64_t{g} * ld + j];
      for (int d = 0; d < D; ++d) acc[std::int64_t{g} * D + d] += wg * row[d];
    }
  }
}

template <int D>
LshKernels by_type(DType kv) noexcept {
  switch (kv) {
    case DType::kF32:
      return {&dots_scalar<D, float>, &accumulate_scalar<D, float>, Order::kNatural, 1};
    case DType::kF16: return {&dots_scalar<D, f16>, &accumulate_scalar<D, f16>, Order::kNatural, 1};
    case DType::kBF16:
      return {&dots_scalar<D, bf16>, &accumulate_scalar<D, bf16>, Order::kNatural, 1};
  }
  return {};
}

}  // namespace

HashFn lsh_hash_scalar() noexcept { return &hash_scalar; }

LshKernels lsh_kernels_scalar(std::int32_t head_dim, DType kv) noexcept {
  switch (head_dim) {
    case 64: return by_type<64>(kv);
    case 128: return by_type<128>(kv);
    case 256: return by_type<256>(kv);
    default: return {};
  }
}

}  // namespace hattn::cpu::detail
