#pragma once
// Partition policy: per layer and per sequence, which device attends to which
// tokens. The CPU always attends a prefix [0, cpu_tokens) of the sequence (over
// the host KV) and the device the rest [cpu_tokens, len) (over its own KV);
// the two partials are merged exactly (core/merge.hpp). So
//   all on CPU:    cpu_tokens = len
//   all on device: cpu_tokens = 0
//   split:         e.g. MagicPIG: an LSH-sampled CPU backend over the prefix,
//                  the exact recent tail (and dense layers) on the device.

#include <algorithm>
#include <cstdint>
#include <functional>
#include <utility>

namespace hattn::runtime {

class PartitionPolicy {
 public:
  // f(layer, seq, len) -> tokens the CPU attends, clamped to [0, len]. `seq`
  // is the host KV cache's sequence index; len includes this step's token.
  using Fn = std::function<std::int64_t(std::int32_t layer, std::int32_t seq, std::int64_t len)>;

  PartitionPolicy() : PartitionPolicy(all_cpu()) {}
  explicit PartitionPolicy(Fn f) : f_(std::move(f)) {}

  std::int64_t cpu_tokens(std::int32_t layer, std::int32_t seq, std::int64_t len) const {
    return std::clamp<std::int64_t>(f_(layer, seq, len), 0, len);
  }

  static PartitionPolicy all_cpu() {
    return PartitionPolicy([](std::int32_t, std::int32_t, std::int64_t len) { return len; });
  }
  static PartitionPolicy all_device() {
    return PartitionPolicy(
        [](std::int32_t, std::int32_t, std::int64_t) -> std::int64_t { return 0; });
  }
  // Layers < dense_layers entirely on the device; the others: the last
  // `device_tail` tokens on the device, the prefix on the CPU.
  static PartitionPolicy device_tail(std::int64_t device_tail, std::int32_t dense_layers = 0) {
    return PartitionPolicy([=](std::int32_t layer, std::int32_t, std::int64_t len) {
      return layer < dense_layers ? std::int64_t{0} : len - device_tail;
    });
  }

 private:
  Fn f_;
};

}  // namespace hattn::runtime
