#pragma once
// The host's last-level cache, for benchmarks that must not measure it: the
// KV sets a case cycles through, the read-bandwidth probe and the buffer
// written between two timed steps are sized from it. (Fixed sizes chosen on
// hosts with a 32 MiB L3 let a 260 MiB L3 serve part of each step:
// docs/cpu-dense.md, "An Intel Xeon with a 260 MiB L3".)

#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <fstream>
#include <string>

namespace bench_cache {

// Bytes of the largest cache sysconf reports, else of the largest in
// /sys/devices/system/cpu/cpu0/cache; 0 when neither says.
inline std::size_t last_level_bytes() {
  static const std::size_t n = [] {
    std::size_t best = 0;
    for (const int name : {_SC_LEVEL2_CACHE_SIZE, _SC_LEVEL3_CACHE_SIZE, _SC_LEVEL4_CACHE_SIZE}) {
      const long v = sysconf(name);
      if (v > 0) best = std::max(best, static_cast<std::size_t>(v));
    }
    if (best != 0) return best;
    for (int i = 0; i < 8; ++i) {  // index0 is L1d: take the largest
      std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/size");
      std::size_t kib = 0;
      if (f >> kib) best = std::max(best, kib << 10);  // "266240K"
    }
    return best;
  }();
  return n;
}

// max(floor, factor x the last-level cache), rounded up to a multiple of unit.
inline std::size_t beyond(std::size_t floor, std::size_t factor, std::size_t unit = 1) {
  const std::size_t n = std::max(floor, factor * last_level_bytes());
  return (n + unit - 1) / unit * unit;
}

}  // namespace bench_cache
