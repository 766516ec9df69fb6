#include "common/seed.hpp"

#include <cstdlib>
#include <stdexcept>

namespace hattn_test {

namespace {
std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::uint64_t initial_seed() {
  if (const char* env = std::getenv("HATTN_TEST_SEED"); env != nullptr && *env != '\0') {
    char* end = nullptr;
    const unsigned long long v = std::strtoull(env, &end, 0);
    if (end == env || *end != '\0')
      throw std::invalid_argument("HATTN_TEST_SEED is not an unsigned integer");
    return v;
  }
  std::random_device rd;
  return (std::uint64_t{rd()} << 32) ^ rd();
}
}  // namespace

std::uint64_t test_seed() {
  static const std::uint64_t seed = initial_seed();
  return seed;
}

std::mt19937_64 make_rng(std::string_view tag) {
  std::uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a of the tag
  for (const char c : tag) {
    h ^= static_cast<unsigned char>(c);
    h *= 0x100000001b3ull;
  }
  return std::mt19937_64(splitmix64(test_seed() ^ splitmix64(h)));
}

std::string seed_note() {
  const std::string s = std::to_string(test_seed());
  return "seed=" + s + " (HATTN_TEST_SEED=" + s + " reproduces)";
}

}  // namespace hattn_test
