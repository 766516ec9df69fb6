#include "hattn/cpu/simhash.hpp"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <stdexcept>

#include "cpu/lsh_kernels.hpp"
#include "hattn/detail/splitmix.hpp"

namespace hattn::cpu {

namespace {

using ::hattn::detail::splitmix64;

// Uniform in (0, 1]: 53 random bits.
double uniform(std::uint64_t seed, std::uint64_t i) noexcept {
  const std::uint64_t r = splitmix64(seed ^ splitmix64(i));
  return (static_cast<double>(r >> 11) + 1.0) * 0x1.0p-53;
}

}  // namespace

float simhash_normal(std::uint64_t seed, std::uint64_t i) noexcept {
  // Box-Muller on the pair (2p, 2p + 1): element 2p takes the cosine, 2p + 1 the sine.
  const std::uint64_t p = i / 2;
  const double r = std::sqrt(-2.0 * std::log(uniform(seed, 2 * p)));
  const double t = 2.0 * std::numbers::pi * uniform(seed, 2 * p + 1);
  return static_cast<float>(i % 2 == 0 ? r * std::cos(t) : r * std::sin(t));
}

SimHash::SimHash(std::int32_t dim, std::int32_t K, std::int32_t L, std::uint64_t seed, CpuIsa isa)
    : dim_(dim),
      K_(K),
      L_(L),
      padded_(0),
      isa_(cpu_isa_available(isa) ? isa : cpu_isa_supported()) {
  if (K < 1 || K > 16) throw std::invalid_argument("SimHash: K must be in 1..16");
  if (L < 1) throw std::invalid_argument("SimHash: L must be >= 1");
  if (dim < 1) throw std::invalid_argument("SimHash: dim must be >= 1");
  if (std::int64_t{K} * L > 65536) throw std::invalid_argument("SimHash: K * L must be <= 65536");
  const std::int64_t planes = std::int64_t{K} * L;
  padded_ = static_cast<std::int32_t>((planes + 63) / 64 * 64);
  wt_.assign(static_cast<std::size_t>(dim) * padded_, 0.0f);
  for (std::int64_t j = 0; j < planes; ++j)
    for (std::int32_t d = 0; d < dim; ++d)
      wt_[(static_cast<std::size_t>(j / 64) * dim + d) * 64 + static_cast<std::size_t>(j % 64)] =
          simhash_normal(seed, static_cast<std::uint64_t>(j) * dim + d);
}

void SimHash::hash(const float* x, std::int64_t rows, std::int64_t x_stride,
                   std::uint16_t* codes) const noexcept {
  const std::int32_t w = words();
  // K * L <= 65536 planes: at most 1024 words per row.
  constexpr std::int64_t kBitsWords = 4096;
  std::uint64_t bits[kBitsWords];
  const std::int64_t kChunk = kBitsWords / w;
  for (std::int64_t r0 = 0; r0 < rows; r0 += kChunk) {
    const std::int64_t nr = std::min(kChunk, rows - r0);
    sign_bits(x + r0 * x_stride, nr, x_stride, 0, w, bits);
    this->codes(bits, nr, codes + r0 * L_);
  }
}

void SimHash::sign_bits(const float* x, std::int64_t rows, std::int64_t x_stride, std::int32_t w0,
                        std::int32_t w1, std::uint64_t* bits) const noexcept {
  detail::lsh_hash_for(isa_)(x, rows, x_stride, dim_, wt_.data(), words(), w0, w1, bits);
}

void SimHash::codes(const std::uint64_t* bits, std::int64_t rows,
                    std::uint16_t* codes) const noexcept {
  const std::int32_t words = this->words();
  const std::uint32_t mask = (1u << K_) - 1u;
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::uint64_t* b = bits + r * words;
    std::uint16_t* out = codes + r * L_;
    for (std::int32_t l = 0; l < L_; ++l) {
      const std::int64_t bit = std::int64_t{l} * K_;
      const std::int64_t w = bit / 64, s = bit % 64;
      std::uint64_t v = b[w] >> s;
      if (s + K_ > 64) v |= b[w + 1] << (64 - s);
      out[l] = static_cast<std::uint16_t>(v & mask);
    }
  }
}

}  // namespace hattn::cpu
