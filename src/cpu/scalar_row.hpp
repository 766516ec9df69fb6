#pragma once
// Element d of a K/V row, widened to f32: the row access of the portable
// kernels. Include only from baseline (not ISA-flagged) translation units.
#include <cstddef>
#include <cstring>

#include "hattn/core/dtype.hpp"

namespace hattn::cpu::detail {

template <class KvT>
inline float row_element(const std::byte* row, int d) noexcept {
  KvT x;
  std::memcpy(&x, row + d * sizeof(KvT), sizeof(KvT));
  return to_float(x);
}

}  // namespace hattn::cpu::detail
