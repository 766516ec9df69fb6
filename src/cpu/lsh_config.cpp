#include <algorithm>
#include <cmath>
#include <numbers>
#include <string>

#include "hattn/cpu/lsh_config.hpp"

namespace hattn::cpu {

Status validate(const LshConfig& c) noexcept {
  auto bad = [](const char* what) { return Status{StatusCode::kInvalidArgument, what}; };
  if (c.K < 1 || c.K > 16)
    return bad("LshConfig: K must be in 1..16 (codes are stored in 16 bits)");
  if (c.L < 1 || std::int64_t{c.K} * c.L > 65536)
    return bad("LshConfig: L must be >= 1 and K * L <= 65536");
  if (c.min_collisions < 1 || c.min_collisions > 255)
    return bad("LshConfig: min_collisions must be in 1..255");
  if (c.L < c.min_collisions) return bad("LshConfig: L must be >= min_collisions");
  if (!(c.eps > 0.0f) || !std::isfinite(c.eps)) return bad("LshConfig: eps must be > 0 and finite");
  if (c.sink < 0) return bad("LshConfig: sink must be >= 0");
  if (c.window < 0) return bad("LshConfig: window must be >= 0");
  if (c.max_exact_tail < c.window || c.max_exact_tail < 1)
    return bad("LshConfig: max_exact_tail must be >= window and >= 1");
  if (c.projection != LshConfig::Projection::kShared &&
      c.projection != LshConfig::Projection::kPerHead)
    return bad("LshConfig: projection must be kShared or kPerHead");
  if (c.gather != LshConfig::Gather::kPerHead && c.gather != LshConfig::Gather::kUnion)
    return bad("LshConfig: gather must be kPerHead or kUnion");
  return Status::ok();
}

double lsh_bit_probability(double cos) noexcept {
  if (std::isnan(cos)) cos = 0.0;
  return 1.0 - std::acos(std::clamp(cos, -1.0, 1.0)) / std::numbers::pi;
}

double lsh_sample_probability(double cos, std::int32_t K, std::int32_t L, std::int32_t m) noexcept {
  if (m <= 0) return 1.0;
  if (m > L) return 0.0;
  const double P = std::pow(lsh_bit_probability(cos), K);
  if (P <= 0.0) return 0.0;
  if (P >= 1.0) return 1.0;
  // pmf(i) = C(L, i) P^i (1 - P)^(L - i), computed in logs then by recurrence.
  const double lp = std::log(P), lq = std::log1p(-P);
  auto log_pmf = [&](std::int32_t i) {
    return std::lgamma(L + 1.0) - std::lgamma(i + 1.0) - std::lgamma(L - i + 1.0) + i * lp +
           (L - i) * lq;
  };
  if (P * L < m) {
    // Upper tail directly: terms decrease fast past the mean.
    double term = std::exp(log_pmf(m)), sum = 0.0;
    for (std::int32_t i = m; i <= L; ++i) {
      sum += term;
      if (term == 0.0 || term < sum * 1e-17) break;
      term *= static_cast<double>(L - i) / (i + 1) * (P / (1.0 - P));
    }
    return std::min(1.0, sum);
  }
  // 1 - lower tail: few terms (m of them).
  double lower = 0.0;
  for (std::int32_t i = 0; i < m; ++i) lower += std::exp(log_pmf(i));
  return std::clamp(1.0 - lower, 0.0, 1.0);
}

}  // namespace hattn::cpu
