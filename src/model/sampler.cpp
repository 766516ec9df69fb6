#include "hattn/model/sampler.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace hattn::model {

std::int32_t argmax(std::span<const float> logits) noexcept {
  std::int32_t best = 0;
  for (std::size_t i = 1; i < logits.size(); ++i)
    if (logits[i] > logits[static_cast<std::size_t>(best)]) best = static_cast<std::int32_t>(i);
  return best;
}

std::int32_t Sampler::sample(std::span<const float> logits) {
  if (!(opt_.temperature > 0.0f) || logits.size() <= 1) return argmax(logits);
  const std::size_t n = logits.size();
  order_.resize(n);
  std::iota(order_.begin(), order_.end(), 0);
  std::sort(order_.begin(), order_.end(), [&](std::int32_t a, std::int32_t b) {
    const float la = logits[static_cast<std::size_t>(a)], lb = logits[static_cast<std::size_t>(b)];
    return la > lb || (la == lb && a < b);
  });
  const double top = logits[static_cast<std::size_t>(order_[0])];
  probs_.resize(n);
  double sum = 0.0;
  for (std::size_t i = 0; i < n; ++i) {
    probs_[i] = std::exp((logits[static_cast<std::size_t>(order_[i])] - top) / opt_.temperature);
    sum += probs_[i];
  }
  // Nucleus: the smallest prefix (by probability) whose mass reaches top_p.
  std::size_t keep = n;
  if (opt_.top_p < 1.0f) {
    double mass = 0.0;
    for (std::size_t i = 0; i < n; ++i) {
      mass += probs_[i] / sum;
      if (mass >= opt_.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  double kept = 0.0;
  for (std::size_t i = 0; i < keep; ++i) kept += probs_[i];
  const double u = std::uniform_real_distribution<double>(0.0, kept)(rng_);
  double acc = 0.0;
  for (std::size_t i = 0; i < keep; ++i) {
    acc += probs_[i];
    if (u < acc) return order_[i];
  }
  return order_[keep - 1];
}

}  // namespace hattn::model
