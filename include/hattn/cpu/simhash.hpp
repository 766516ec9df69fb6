#pragma once
// SimHash: K * L random hyperplanes with iid N(0, 1) entries, drawn from a
// seeded generator (splitmix64 + Box-Muller: the same numbers on every
// platform and standard library). Bit b of table l for a vector x is
// [x . w_(l*K + b) > 0]; the code of table l packs the K bits as integers do,
// sum_b bit_b << b.

#include <cstddef>
#include <cstdint>
#include <vector>

#include "hattn/cpu/isa.hpp"

namespace hattn::cpu {

class SimHash {
 public:
  // Throws std::invalid_argument for K outside 1..16, L < 1, K * L > 65536
  // or dim < 1.
  SimHash(std::int32_t dim, std::int32_t K, std::int32_t L, std::uint64_t seed,
          CpuIsa isa = cpu_isa_default());

  std::int32_t dim() const noexcept { return dim_; }
  std::int32_t K() const noexcept { return K_; }
  std::int32_t L() const noexcept { return L_; }
  CpuIsa isa() const noexcept { return isa_; }

  // Entry d of hyperplane j (j = l * K + b).
  float plane(std::int32_t j, std::int32_t d) const noexcept {
    return wt_[(static_cast<std::size_t>(j / 64) * dim_ + d) * 64 + j % 64];
  }

  // codes[r * L + l] = code of table l for row r of x ([rows][dim], f32,
  // `x_stride` floats between rows). Every vector is hashed by the same
  // kernel, so a query and a key see the same arithmetic.
  void hash(const float* x, std::int64_t rows, std::int64_t x_stride,
            std::uint16_t* codes) const noexcept;

  // hash() in two parts, for callers that split the planes among threads:
  // sign_bits() sets bits[r * words() + w] (bit i: x_r . plane_(64 w + i) > 0)
  // for the blocks of 64 planes w in [w0, w1), 0 <= w0 <= w1 <= words(), with
  // the same arithmetic as hash(); codes() packs all words() of each row.
  std::int32_t words() const noexcept { return padded_ / 64; }
  void sign_bits(const float* x, std::int64_t rows, std::int64_t x_stride, std::int32_t w0,
                 std::int32_t w1, std::uint64_t* bits) const noexcept;
  void codes(const std::uint64_t* bits, std::int64_t rows, std::uint16_t* codes) const noexcept;

  std::size_t bytes() const noexcept { return wt_.size() * sizeof(float); }

 private:
  std::int32_t dim_, K_, L_;
  std::int32_t padded_;  // K * L rounded up to 64
  CpuIsa isa_;
  // Blocks of 64 planes, [padded_ / 64][dim][64], zero beyond K * L: a block
  // is one contiguous read (as [dim][padded_] it was 128 strided pieces).
  std::vector<float> wt_;
};

// The i-th standard normal of the stream `seed` (what SimHash's planes are
// made of; exposed so tests can rebuild them independently).
float simhash_normal(std::uint64_t seed, std::uint64_t i) noexcept;

}  // namespace hattn::cpu
