#pragma once
// Merging partial results on the GPU: the device twin of hattn::merge_partials
// (core/merge.hpp), same formula, so a partial computed on the CPU (copied to
// the device) and one from cuda::DenseDecode combine into one output.
//
//   out = merge(a, b) per (batch, head); out may alias a or b exactly.
//
// Every o and lse2 pointer is device memory; views of any dtype and strides.

#include "hattn/core/problem.hpp"
#include "hattn/core/status.hpp"
#include "hattn/cuda/stream.hpp"

namespace hattn::cuda {

// Enqueued on `stream`; checks shapes and pointers on the host.
Status merge_partials(const PartialView& a, const PartialView& b, const PartialView& out,
                      StreamRef stream) noexcept;

}  // namespace hattn::cuda
