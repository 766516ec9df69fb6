#pragma once
// Picking the next token from logits: greedy, or temperature + top-p
// (nucleus) sampling from a seeded generator (same seed, same tokens).

#include <cstdint>
#include <random>
#include <span>
#include <vector>

namespace hattn::model {

struct SamplingOptions {
  float temperature = 0.0f;  // <= 0: greedy (the lowest id among equal maxima)
  float top_p = 1.0f;        // keep the smallest set of tokens with this much mass
};

class Sampler {
 public:
  explicit Sampler(SamplingOptions options = {}, std::uint64_t seed = 0)
      : opt_(options), rng_(seed) {}
  std::int32_t sample(std::span<const float> logits);

 private:
  SamplingOptions opt_;
  std::mt19937_64 rng_;
  std::vector<std::int32_t> order_;
  std::vector<double> probs_;
};

std::int32_t argmax(std::span<const float> logits) noexcept;

}  // namespace hattn::model
