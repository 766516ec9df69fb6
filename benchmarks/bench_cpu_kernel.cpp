// The CPU attention kernel alone, on one thread, over rows in cache and rows in
// memory: how far the kernel is from its compute rate, and how much of the
// memory latency it hides. (bench_cpu_dense measures the whole backend.)
//
// Cases cpu_kernel/<isa>/<mode>/<where>: bf16 KV, 8 KV heads x 4 query heads,
// head dim 128, rows laid out as HND pages of 16 tokens, 256 rows per kernel
// call. <where> is "cache" (512 KiB re-read, whose rows serve as both the K
// and the V rows, so they fit any L2 seen so far: 1 MiB of separate K and V
// did not fit the 1.25 MiB L2 of an Ice Lake core) or "memory" (max(1 GiB, 4x
// the last-level cache) of K and of V, streamed once per iteration).
// <mode> is f32 products or bf16 products.
// Counter bytes_per_second: K and V bytes attended per second.
//
// Uses the kernel interface in src/cpu/attend.hpp (internal).

#include <benchmark/benchmark.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "bench_cache.hpp"
#include "cpu/attend.hpp"
#include "hattn/cpu/isa.hpp"

namespace {

using hattn::cpu::detail::AttendArgs;
using hattn::cpu::detail::Kernel;

constexpr int kHeadDim = 128, kGroup = 4, kKvHeads = 8, kPage = 16, kRowsPerCall = 256;
constexpr std::size_t kRowBytes = kHeadDim * 2;
constexpr std::size_t kPageBytes = kPage * kKvHeads * kRowBytes;

constexpr std::size_t kHugePage = std::size_t{2} << 20;  // buffers' alignment and size unit

struct FreeDeleter {
  void operator()(void* p) const noexcept { std::free(p); }
};

std::unique_ptr<std::byte, FreeDeleter> alloc_filled(std::size_t bytes) {
  void* p = std::aligned_alloc(kHugePage, bytes);
  if (p == nullptr) throw std::bad_alloc();
  (void)madvise(p, bytes, MADV_HUGEPAGE);
  auto* u = static_cast<std::uint16_t*>(p);
  for (std::size_t i = 0; i < bytes / 2; ++i)  // plausible bf16 values in [-2, 2)
    u[i] = static_cast<std::uint16_t>(0x3f00u | (i * 37u % 127u) | ((i & 1u) << 15));
  return std::unique_ptr<std::byte, FreeDeleter>(static_cast<std::byte*>(p));
}

void bm_kernel(benchmark::State& state, hattn::CpuIsa isa, bool bf16_products, bool in_cache,
               std::size_t bytes) {
  if (!hattn::cpu_isa_available(isa) || (bf16_products && !hattn::cpu_has_avx512_bf16())) {
    state.SkipWithError("ISA not available on this CPU");
    return;
  }
  const Kernel kernel =
      hattn::cpu::detail::kernel_for(isa, kHeadDim, hattn::DType::kBF16, bf16_products);
  const auto k = alloc_filled(bytes);
  const auto v = in_cache ? std::unique_ptr<std::byte, FreeDeleter>() : alloc_filled(bytes);
  const std::byte* const vbase = in_cache ? k.get() : v.get();
  const std::size_t pages = bytes / kPageBytes;
  const std::size_t rows = pages * kPage;
  // The kernel reads q and the accumulators with aligned loads.
  alignas(64) static float q[kKvHeads * kGroup * kHeadDim];
  alignas(64) static float acc[kKvHeads * kGroup * kHeadDim];
  std::fill(std::begin(q), std::end(q), 0.01f);
  std::vector<float> m(kKvHeads * kGroup), l(m.size());
  std::vector<const std::byte*> kr(kRowsPerCall), vr(kRowsPerCall);
  const auto stride = static_cast<std::ptrdiff_t>(kPage * kRowBytes);
  std::int64_t attended = 0;
  for (auto _ : state) {
    for (std::size_t r0 = 0; r0 + kRowsPerCall <= rows; r0 += kRowsPerCall) {
      for (int t = 0; t < kRowsPerCall; ++t) {
        const std::size_t r = r0 + static_cast<std::size_t>(t);
        const std::size_t off = r / kPage * kPageBytes + r % kPage * kRowBytes;
        kr[static_cast<std::size_t>(t)] = k.get() + off;
        vr[static_cast<std::size_t>(t)] = vbase + off;
      }
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.0f);
      const AttendArgs a{q,         acc,       m.data(), l.data(), kKvHeads,    kGroup,
                         kr.data(), vr.data(), stride,   stride,   kRowsPerCall};
      kernel.attend(a);
      attended += static_cast<std::int64_t>(2 * kRowsPerCall * kKvHeads * kRowBytes);
    }
    benchmark::DoNotOptimize(l.data());
  }
  state.SetBytesProcessed(attended);
}

void register_all() {
  struct Isa {
    hattn::CpuIsa isa;
    const char* name;
  };
  for (const Isa i : {Isa{hattn::CpuIsa::kAvx512, "avx512"}, Isa{hattn::CpuIsa::kAvx2, "avx2"}})
    for (const bool bf16p : {false, true}) {
      if (bf16p && i.isa != hattn::CpuIsa::kAvx512) continue;
      for (const bool memory : {false, true}) {
        const std::string name = std::string("cpu_kernel/") + i.name + "/" +
                                 (bf16p ? "bf16products" : "f32products") + "/" +
                                 (memory ? "memory" : "cache");
        const std::size_t bytes = memory ? bench_cache::beyond(std::size_t{1} << 30, 4, kHugePage)
                                         : (std::size_t{1} << 19);
        benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) {
          bm_kernel(st, i.isa, bf16p, !memory, bytes);
        })->Unit(benchmark::kMillisecond);
      }
    }
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
