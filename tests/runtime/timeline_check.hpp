#pragma once
// The checks every orchestrated step's timeline must pass, on host and on CUDA
// streams: each phase of each (step, layer, micro-batch) at most once; stage
// A, the copy to the host, CPU attention, the copy back and stage B all there,
// each ending after it begins, in the pipeline's causal order. On host streams
// every time is the host clock's, so the order is exact; CUDA streams convert
// their event stamps to the host clock per stream, with an error of
// microseconds, so across tracks a phase may seem to end up to
// `cross_track_skew_ns` after the one it precedes.

#include <catch2/catch.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <map>
#include <tuple>
#include <vector>

#include "hattn/runtime/timeline.hpp"

namespace hattn_test {

inline void check_timeline(const std::vector<hattn::runtime::TimelineEntry>& entries, int steps,
                           int layers, int mbs, std::int64_t cross_track_skew_ns) {
  using hattn::runtime::Phase;
  using hattn::runtime::TimelineEntry;
  using Key = std::tuple<int, int, int>;
  std::map<Key, std::array<const TimelineEntry*, hattn::runtime::kNumPhases>> by;
  for (const TimelineEntry& e : entries) {
    CHECK(e.begin_ns <= e.end_ns);
    auto& slot = by[{e.step, e.layer, e.micro_batch}][static_cast<std::size_t>(e.phase)];
    CHECK(slot == nullptr);
    slot = &e;
  }
  CHECK(by.size() == static_cast<std::size_t>(steps * layers * mbs));
  for (const auto& [key, ph] : by) {
    INFO("step " << std::get<0>(key) << " layer " << std::get<1>(key) << " mb "
                 << std::get<2>(key));
    CHECK(std::get<0>(key) < steps);
    const Phase chain[] = {Phase::kStageA, Phase::kCopyToHost, Phase::kCpuAttention,
                           Phase::kCopyToDevice, Phase::kStageB};
    for (Phase p : chain) REQUIRE(ph[static_cast<std::size_t>(p)] != nullptr);
    for (std::size_t i = 0; i + 1 < std::size(chain); ++i) {
      const TimelineEntry* a = ph[static_cast<std::size_t>(chain[i])];
      const TimelineEntry* b = ph[static_cast<std::size_t>(chain[i + 1])];
      const bool same =
          hattn::runtime::track_of(chain[i]) == hattn::runtime::track_of(chain[i + 1]);
      CHECK(a->end_ns <= b->begin_ns + (same ? 0 : cross_track_skew_ns));
    }
  }
}

}  // namespace hattn_test
