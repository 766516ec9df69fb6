#pragma once
// splitmix64's output function: a cheap, well-mixed 64-bit hash of a 64-bit
// value. The one mixer of the library (projection seeds, synthetic data).
#include <cstdint>

namespace hattn::detail {

constexpr std::uint64_t splitmix64(std::uint64_t x) noexcept {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace hattn::detail
