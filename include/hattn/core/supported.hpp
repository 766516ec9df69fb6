#pragma once
// The one list of what hattn supports. Kernels are instantiated from these
// lists, can_implement checks against them, tests and benchmarks sweep them.

#include <cstdint>

#include "hattn/core/dispatch.hpp"
#include "hattn/core/dtype.hpp"

namespace hattn {

using SupportedHeadDims = ValueList<64, 128, 256>;
using SupportedKvDTypes = ValueList<DType::kBF16, DType::kF16, DType::kF32>;
using SupportedQueryDTypes = ValueList<DType::kF32, DType::kBF16, DType::kF16>;
using SupportedOutDTypes = ValueList<DType::kF32, DType::kBF16, DType::kF16>;

enum class CpuIsa : std::uint8_t { kScalar, kAvx2, kAvx512 };
using SupportedCpuIsas = ValueList<CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512>;

// Largest group (q heads per KV head) processed in one pass; larger groups are
// split into several passes over the same KV chunk, so any multiple works.
inline constexpr int kMaxGroupPerPass = 16;

}  // namespace hattn
