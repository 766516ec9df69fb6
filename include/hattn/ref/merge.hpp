#pragma once
// Reference merge of two partials in double.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

#include "hattn/core/status.hpp"

namespace hattn::ref {

// Merge partial b into a, in place. Both hold `rows` heads of `head_dim`
// values: o[row * head_dim + d], lse2[row]. Empty partials (lse2 = -inf) are
// the identity.
inline Status merge(std::vector<double>& o_a, std::vector<double>& lse_a,
                    const std::vector<double>& o_b, const std::vector<double>& lse_b,
                    std::size_t head_dim) {
  if (o_a.size() != o_b.size() || lse_a.size() != lse_b.size() ||
      o_a.size() != lse_a.size() * head_dim)
    return {StatusCode::kInvalidArgument, "ref::merge: partials have different shapes"};
  const double ninf = -std::numeric_limits<double>::infinity();
  for (std::size_t r = 0; r < lse_a.size(); ++r) {
    const double m = std::max(lse_a[r], lse_b[r]);
    if (m == ninf) continue;
    const double ea = std::exp2(lse_a[r] - m), eb = std::exp2(lse_b[r] - m);
    const double wa = ea / (ea + eb), wb = eb / (ea + eb);
    for (std::size_t d = 0; d < head_dim; ++d) {
      const double xa = wa != 0.0 ? wa * o_a[r * head_dim + d] : 0.0;
      const double xb = wb != 0.0 ? wb * o_b[r * head_dim + d] : 0.0;
      o_a[r * head_dim + d] = xa + xb;
    }
    lse_a[r] = m + std::log2(ea + eb);
  }
  return Status::ok();
}

}  // namespace hattn::ref
