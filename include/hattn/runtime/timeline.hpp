#pragma once
// Timeline: the start and end of every stage of a decode step, per layer and
// micro-batch, on the track (thread or stream) that ran it. Exported as Chrome
// trace JSON ("X" complete events), which chrome://tracing and Perfetto
// (ui.perfetto.dev) display: one row per track, so the overlap of CPU
// attention with compute is visible at a glance.

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "hattn/runtime/wait.hpp"

namespace hattn::runtime {

enum class Phase : std::uint8_t {
  kStageA,           // engine: norm + QKV GEMM + RoPE          (compute stream)
  kDeviceAttention,  // engine: the device's share of attention (compute stream)
  kCopyToHost,       // q, k, v (codes) into a ring slot        (copy stream)
  kCpuAttention,     // append k, v to host KV + CPU backend    (CPU attention thread)
  kCopyToDevice,     // partial o, lse2 back                    (copy stream)
  kMerge,            // CPU partial with the device partial     (compute stream)
  kStageB,           // engine: O-proj + MLP                    (compute stream)
};
inline constexpr int kNumPhases = 7;

enum class Track : std::uint8_t { kCompute, kCopy, kCpu };

constexpr Track track_of(Phase p) noexcept {
  switch (p) {
    case Phase::kCopyToHost: return Track::kCopy;
    case Phase::kCpuAttention: return Track::kCpu;
    default: return Track::kCompute;
  }
}

constexpr std::string_view to_string(Phase p) noexcept {
  switch (p) {
    case Phase::kStageA: return "stage_a";
    case Phase::kDeviceAttention: return "device_attention";
    case Phase::kCopyToHost: return "copy_to_host";
    case Phase::kCpuAttention: return "cpu_attention";
    case Phase::kCopyToDevice: return "copy_to_device";
    case Phase::kMerge: return "merge";
    case Phase::kStageB: return "stage_b";
  }
  return "unknown";
}

constexpr std::string_view to_string(Track t) noexcept {
  switch (t) {
    case Track::kCompute: return "compute stream";
    case Track::kCopy: return "copy stream";
    case Track::kCpu: return "CPU attention";
  }
  return "unknown";
}

struct TimelineEntry {
  Phase phase{};
  std::int32_t step = 0;
  std::int32_t layer = 0;
  std::int32_t micro_batch = 0;
  std::int64_t begin_ns = 0;  // since the timeline's origin
  std::int64_t end_ns = 0;
};

// Thread-safe; entries are recorded from the streams' and the CPU thread.
class Timeline {
 public:
  Timeline() : origin_(Clock::now()) {}

  std::int64_t now_ns() const noexcept {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - origin_).count();
  }
  void record(const TimelineEntry& e) {
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.push_back(e);
  }
  void reserve(std::size_t n) {
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.reserve(n);
  }
  std::size_t size() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return entries_.size();
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.clear();
  }
  std::vector<TimelineEntry> entries() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return entries_;
  }
  // The entries recorded after the first `first` (a step's, say).
  std::vector<TimelineEntry> entries_since(std::size_t first) const {
    std::lock_guard<std::mutex> lock(mutex_);
    if (first >= entries_.size()) return {};
    return {entries_.begin() + static_cast<std::ptrdiff_t>(first), entries_.end()};
  }
  // When time 0 of the entries was.
  Clock::time_point origin() const noexcept { return origin_; }

  // {"traceEvents": [...]}: one process, a thread per track, an "X" event per
  // entry named "<phase> L<layer> mb<m>", times in microseconds.
  std::string to_chrome_trace() const {
    const std::vector<TimelineEntry> es = entries();
    std::string out = "{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n";
    char buf[256];
    for (int t = 0; t < 3; ++t) {
      std::snprintf(buf, sizeof buf,
                    "{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":1,\"tid\":%d,"
                    "\"args\":{\"name\":\"%s\"}}",
                    t + 1, to_string(static_cast<Track>(t)).data());
      out += t == 0 ? "" : ",\n";
      out += buf;
    }
    for (std::size_t i = 0; i < es.size(); ++i) {
      const TimelineEntry& e = es[i];
      const std::string_view name = to_string(e.phase);
      std::snprintf(buf, sizeof buf,
                    "{\"name\":\"%.*s L%d mb%d\",\"cat\":\"%.*s\",\"ph\":\"X\",\"pid\":1,"
                    "\"tid\":%d,\"ts\":%.3f,\"dur\":%.3f,\"args\":{\"step\":%d,\"layer\":%d,"
                    "\"micro_batch\":%d}}",
                    static_cast<int>(name.size()), name.data(), e.layer, e.micro_batch,
                    static_cast<int>(name.size()), name.data(),
                    static_cast<int>(track_of(e.phase)) + 1, static_cast<double>(e.begin_ns) * 1e-3,
                    static_cast<double>(e.end_ns - e.begin_ns) * 1e-3, e.step, e.layer,
                    e.micro_batch);
      out += ",\n";
      out += buf;
    }
    out += "\n]}\n";
    return out;
  }

 private:
  Clock::time_point origin_;
  mutable std::mutex mutex_;
  std::vector<TimelineEntry> entries_;
};

}  // namespace hattn::runtime
