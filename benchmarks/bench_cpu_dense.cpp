// CPU dense decode benchmark: how close hattn::cpu::DenseDecode streams the KV
// cache to the machine's read bandwidth.
//
// Cases (names are fixed; scripts read them):
//   membw/read                      the read-bandwidth probe, all cores
//   cpu_dense/<kv>/kv:<n>/bs:<b>    kv in {bf16, f16, f32}, n in {1024 .. 131072},
//                                   b in {1, 8, 32}; cases over 8 GiB of KV are left out
//
// Timing is wall clock. Google Benchmark appends "/real_time" to the name of
// every instance registered with UseRealTime(), which would break the names
// above, so by default the cases are registered without it and report rates
// from their own wall-clock measurement of the timed loop (the JSON real_time
// field is wall clock either way; only the choice of iteration count follows
// the main thread's CPU time, capped by the library at 5x min_time of wall
// clock). HATTN_BENCH_USE_REAL_TIME=1 registers them with UseRealTime()
// instead: the same rates, "/real_time" names.
//
// Every cpu_dense case: 32 query heads, 8 KV heads, head dim 128, pages of 16
// tokens (HATTN_BENCH_PAGE_SIZE overrides) in HND order (HostPagePool), f32 query and output, all
// cores (default CpuExecutor), wall-clock time. Each iteration runs one decode step on the next of
// N distinct KV sets, N * KV bytes >= max(512 MiB, 8 x the last-level cache), so no iteration
// finds its KV in cache (bench_cache.hpp). Only run() is timed; the plans are made beforehand.
//
// Reported: bytes_per_second (KV bytes = 2 * sum(len) * H_kv * D * sizeof(kv)
// per iteration), bw_fraction = that rate / the probe's rate, probe_GBps (the
// probe's rate, 1e9 B/s; probe_before_GBps and probe_after_GBps are its two
// halves), and the kernel ISA as the label.
//
// The probe: a parallel sum over max(1 GiB, 8 x the last-level cache) in 4 MiB chunks on the
// same executor, with wide loads and several accumulators, the median of 5 passes, measured
// right before and right after each case's timed loop (untimed); a case's
// probe is the mean of the two. The buffer is allocated and written once,
// before any case memory exists. HATTN_PROBE_DEBUG=1 prints every pass. (On
// the development VM the read bandwidth moves between about 30 and about
// 55 GB/s within seconds; a probe taken once per process misled.)

#include <benchmark/benchmark.h>

#include <algorithm>
#include <array>
#include <bit>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <new>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <unistd.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HATTN_BENCH_X86 1
#endif

#include "bench_cache.hpp"
#include "hattn/core/dtype.hpp"
#include "hattn/core/kv_view.hpp"
#include "hattn/core/page_pool.hpp"
#include "hattn/core/problem.hpp"
#include "hattn/cpu/dense_decode.hpp"
#include "hattn/cpu/executor.hpp"
#include "hattn/cpu/isa.hpp"

namespace {

using Clock = std::chrono::steady_clock;

constexpr std::int32_t kQHeads = 32;
constexpr std::int32_t kKvHeads = 8;
constexpr std::int32_t kHeadDim = 128;
constexpr std::int32_t kDefaultPageSize = 16;
// HATTN_BENCH_PAGE_SIZE=<n> overrides the page size (an exploration knob: the
// case names stay the same; docs/cpu-dense.md measures 64-token pages).
std::int32_t page_size() {
  static const std::int32_t n = [] {
    const char* e = std::getenv("HATTN_BENCH_PAGE_SIZE");
    const int v = e != nullptr ? std::atoi(e) : 0;
    return v > 0 ? v : kDefaultPageSize;
  }();
  return n;
}
constexpr std::size_t kMiB = std::size_t{1} << 20;
constexpr std::size_t kGiB = std::size_t{1} << 30;
constexpr std::size_t kMaxKvBytes = 8 * kGiB;  // larger cases are not registered
// KV sets cycled through >= this, and the probe's buffer: 8 x the LLC or more.
// (A 260 MiB L3 served part of a 512 MiB rotation: bw_fraction 0.67 / 0.86
// for bf16 / f32 at kv:32768 bs:1 against 0.64 / 0.82 with 2 GiB.)
constexpr std::size_t kCacheFactor = 8;
std::size_t rotation_bytes() { return bench_cache::beyond(512 * kMiB, kCacheFactor); }
constexpr std::size_t kProbeChunk = 4 * kMiB;
constexpr int kCaseProbePasses = 5;  // per probe: before and after each case
constexpr std::size_t kFillChunk = 2 * kMiB;

const hattn::CpuExecutor& executor() {
  static const hattn::CpuExecutor ex;  // all cores
  return ex;
}

bool env_flag(const char* name) {
  const char* e = std::getenv(name);
  return e != nullptr && *e != '\0' && *e != '0';
}

// HATTN_BENCH_VERBOSE=1 prints the setup time of each case to stderr.
bool verbose() {
  static const bool v = env_flag("HATTN_BENCH_VERBOSE");
  return v;
}

// HATTN_BENCH_USE_REAL_TIME=1: register with UseRealTime() (see the top).
bool use_real_time() {
  static const bool v = env_flag("HATTN_BENCH_USE_REAL_TIME");
  return v;
}

// A case's probe, measured right before and right after its timed loop (the
// rate divides by their mean). On the development guest the read bandwidth
// moves between ~30 and ~55 GB/s within seconds, so a probe taken once per
// process, minutes before a case, gave fractions from 0.5 to 1.37 for one
// kernel (docs/cpu-dense.md, "The bandwidth probe").
struct CaseProbe {
  double before = 0, after = 0;
  double rate() const noexcept { return 0.5 * (before + after); }
};

// Rate counters of a case whose timed loop moved `bytes` in `elapsed` seconds
// of wall clock: bytes_per_second, bw_fraction (of the probe's mean) and the
// probe's figures in GB/s (probe_GBps, probe_before_GBps, probe_after_GBps).
void report_rates(benchmark::State& state, std::int64_t bytes, double elapsed,
                  const CaseProbe& probe) {
  const double rate = elapsed > 0 ? static_cast<double>(bytes) / elapsed : 0.0;
  if (use_real_time()) {
    state.SetBytesProcessed(bytes);  // the library divides by the same wall time
  } else {
    // SetBytesProcessed would divide by the main thread's CPU time.
    state.counters["bytes_per_second"] =
        benchmark::Counter(rate, benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
  }
  state.counters["bw_fraction"] = rate / probe.rate();
  state.counters["probe_GBps"] = probe.rate() * 1e-9;
  state.counters["probe_before_GBps"] = probe.before * 1e-9;
  state.counters["probe_after_GBps"] = probe.after * 1e-9;
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// --- memory -------------------------------------------------------------------

struct FreeDeleter {
  void operator()(void* p) const noexcept { std::free(p); }
};
using Buffer = std::unique_ptr<std::byte[], FreeDeleter>;

// 2 MiB aligned and (on Linux) backed by huge pages where the kernel allows,
// as HostPagePool does, so the probe and the pool see the same TLB behaviour.
Buffer alloc_buffer(std::size_t bytes) {
  constexpr std::size_t kAlign = 2 * kMiB;
  const std::size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
  void* p = std::aligned_alloc(kAlign, rounded);
  if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  (void)madvise(p, rounded, MADV_HUGEPAGE);
#endif
  return Buffer(static_cast<std::byte*>(p));
}

// Writes one byte of every 4 KiB page, in parallel, so the kernel backs the
// memory now, on all cores, instead of inside a serial copy later.
void prefault(void* p, std::size_t bytes) {
  auto* b = static_cast<volatile unsigned char*>(p);
  const std::size_t chunks = (bytes + kFillChunk - 1) / kFillChunk;
  executor().parallel_for(static_cast<std::int64_t>(chunks), [&](std::int64_t c) {
    const std::size_t begin = static_cast<std::size_t>(c) * kFillChunk;
    const std::size_t end = std::min(bytes, begin + kFillChunk);
    for (std::size_t i = begin; i < end; i += 4096) b[i] = 0;
  });
}

std::size_t physical_memory_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page = sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page <= 0) return 0;
  return static_cast<std::size_t>(pages) * static_cast<std::size_t>(page);
}

// --- read-bandwidth probe -------------------------------------------------------

// Sum of n 64-bit words (n a multiple of 32, p 64-byte aligned). Integer adds:
// one cycle of latency, so a few accumulators keep the loads the bottleneck.
using SumFn = std::uint64_t (*)(const std::uint64_t*, std::size_t) noexcept;

std::uint64_t sum_baseline(const std::uint64_t* p, std::size_t n) noexcept {
  std::uint64_t a[8] = {};
  for (std::size_t i = 0; i < n; i += 8)
    for (std::size_t j = 0; j < 8; ++j) a[j] += p[i + j];
  return a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7];
}

#if defined(HATTN_BENCH_X86)
__attribute__((target("avx2"))) std::uint64_t sum_avx2(const std::uint64_t* p,
                                                       std::size_t n) noexcept {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (std::size_t i = 0; i < n; i += 32) {
    const auto* v = reinterpret_cast<const __m256i*>(p + i);
    a0 = _mm256_add_epi64(a0, _mm256_load_si256(v + 0));
    a1 = _mm256_add_epi64(a1, _mm256_load_si256(v + 1));
    a2 = _mm256_add_epi64(a2, _mm256_load_si256(v + 2));
    a3 = _mm256_add_epi64(a3, _mm256_load_si256(v + 3));
    a0 = _mm256_add_epi64(a0, _mm256_load_si256(v + 4));
    a1 = _mm256_add_epi64(a1, _mm256_load_si256(v + 5));
    a2 = _mm256_add_epi64(a2, _mm256_load_si256(v + 6));
    a3 = _mm256_add_epi64(a3, _mm256_load_si256(v + 7));
  }
  alignas(32) std::uint64_t t[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t),
                     _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3)));
  return t[0] + t[1] + t[2] + t[3];
}

__attribute__((target("avx512f"))) std::uint64_t sum_avx512(const std::uint64_t* p,
                                                            std::size_t n) noexcept {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (std::size_t i = 0; i < n; i += 32) {
    const std::uint64_t* v = p + i;
    a0 = _mm512_add_epi64(a0, _mm512_load_si512(v + 0));
    a1 = _mm512_add_epi64(a1, _mm512_load_si512(v + 8));
    a2 = _mm512_add_epi64(a2, _mm512_load_si512(v + 16));
    a3 = _mm512_add_epi64(a3, _mm512_load_si512(v + 24));
  }
  alignas(64) std::uint64_t t[8];
  _mm512_store_si512(t, _mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
  return t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
}
#endif

struct SumKernel {
  SumFn fn;
  const char* isa;
};

SumKernel pick_sum_kernel() {
#if defined(HATTN_BENCH_X86)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return {sum_avx512, "avx512"};
  if (__builtin_cpu_supports("avx2")) return {sum_avx2, "avx2"};
#endif
  return {sum_baseline, "baseline"};
}

// A buffer of `bytes` (a multiple of kProbeChunk), written in parallel so every
// page is really backed, then summed in parallel chunks.
class ReadBuffer {
 public:
  explicit ReadBuffer(std::size_t bytes)
      : bytes_(bytes), data_(alloc_buffer(bytes)), sums_(bytes / kProbeChunk) {
    auto* w = reinterpret_cast<std::uint64_t*>(data_.get());
    const std::size_t words = kProbeChunk / sizeof(std::uint64_t);
    executor().parallel_for(static_cast<std::int64_t>(chunks()), [&](std::int64_t c) {
      std::uint64_t* p = w + static_cast<std::size_t>(c) * words;
      for (std::size_t i = 0; i < words; ++i) p[i] = (static_cast<std::uint64_t>(c) << 32) ^ i;
    });
  }

  std::size_t bytes() const noexcept { return bytes_; }
  std::size_t chunks() const noexcept { return sums_.size(); }

  // One parallel pass over the whole buffer; returns its duration in seconds.
  double pass(SumFn fn) {
    const auto* w = reinterpret_cast<const std::uint64_t*>(data_.get());
    const std::size_t words = kProbeChunk / sizeof(std::uint64_t);
    const auto t0 = Clock::now();
    executor().parallel_for(static_cast<std::int64_t>(chunks()), [&](std::int64_t c) {
      sums_[static_cast<std::size_t>(c)] = fn(w + static_cast<std::size_t>(c) * words, words);
    });
    const double s = seconds_since(t0);
    std::uint64_t total = 0;
    for (std::uint64_t x : sums_) total += x;
    benchmark::DoNotOptimize(total);
    return s;
  }

 private:
  std::size_t bytes_;
  Buffer data_;
  std::vector<std::uint64_t> sums_;
};

// --- one case's memory, built lazily, freed when the next case starts ------------

struct Fixture {
  virtual ~Fixture() = default;
};

std::unique_ptr<Fixture> g_fixture;
std::string g_fixture_key;

// The fixture for `key`, built by make() unless it is the current one. The
// previous case's fixture is freed first, so only one case's memory is alive.
template <class T, class Make>
T& fixture(const std::string& key, Make&& make) {
  if (g_fixture == nullptr || g_fixture_key != key) {
    g_fixture.reset();
    g_fixture_key.clear();
    g_fixture = make();
    g_fixture_key = key;
  }
  return static_cast<T&>(*g_fixture);
}

void release_fixture() {
  g_fixture.reset();
  g_fixture_key.clear();
}

// The read-bandwidth probe: a buffer of max(1 GiB, 8 x the LLC), in whole
// chunks, allocated (and written) once, before any case memory exists, and
// kept for the whole process.
ReadBuffer& probe_buffer() {
  static ReadBuffer buf{bench_cache::beyond(kGiB, kCacheFactor, kProbeChunk)};
  return buf;
}

// The machine's read bandwidth with all cores now: the median of `passes`
// passes over the probe buffer (robust to a stray slow or fast pass).
double probe_rate(int passes) {
  ReadBuffer& buf = probe_buffer();
  const SumKernel k = pick_sum_kernel();
  std::vector<double> t(static_cast<std::size_t>(passes));
  for (double& x : t) {
    x = buf.pass(k.fn);
    if (std::getenv("HATTN_PROBE_DEBUG"))
      std::fprintf(stderr, "probe pass %.2f GB/s\n", static_cast<double>(buf.bytes()) / x / 1e9);
  }
  std::nth_element(t.begin(), t.begin() + passes / 2, t.end());
  return static_cast<double>(buf.bytes()) / t[static_cast<std::size_t>(passes / 2)];
}

// --- random KV ------------------------------------------------------------------

std::uint64_t splitmix64(std::uint64_t& s) noexcept {
  std::uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// 65536 samples of N(0, 1) (clamped to +-6, finite in every dtype) as the
// dtype's bit patterns; a fill indexes it with random 16-bit numbers.
template <class Bits>
std::vector<Bits> normal_table(hattn::DType dt) {
  std::mt19937_64 rng(0x5eed0000u + static_cast<unsigned>(dt));
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<Bits> t(65536);
  for (Bits& b : t) {
    const float x = std::clamp(nd(rng), -6.0f, 6.0f);
    if constexpr (sizeof(Bits) == 4) {
      b = std::bit_cast<std::uint32_t>(x);
    } else if (dt == hattn::DType::kBF16) {
      b = hattn::to_bf16(x).bits;
    } else {
      b = hattn::to_f16(x).bits;
    }
  }
  return t;
}

// Fills `bytes` (a multiple of 4 elements) of `dst` with N(0, 1) values of
// dtype `dt`, in parallel chunks, each with its own generator.
template <class Bits>
void fill_random_bits(void* dst, std::size_t bytes, hattn::DType dt, std::uint64_t seed) {
  const std::vector<Bits> table = normal_table<Bits>(dt);
  auto* out = static_cast<Bits*>(dst);
  const std::size_t n = bytes / sizeof(Bits);
  const std::size_t per_chunk = kFillChunk / sizeof(Bits);
  const std::size_t chunks = (n + per_chunk - 1) / per_chunk;
  executor().parallel_for(static_cast<std::int64_t>(chunks), [&](std::int64_t c) {
    const std::size_t begin = static_cast<std::size_t>(c) * per_chunk;
    const std::size_t end = std::min(n, begin + per_chunk);
    std::uint64_t s = seed * 0x100000001b3ull + static_cast<std::uint64_t>(c);
    std::size_t i = begin;
    for (; i + 4 <= end; i += 4) {
      const std::uint64_t r = splitmix64(s);
      out[i + 0] = table[r & 0xffff];
      out[i + 1] = table[(r >> 16) & 0xffff];
      out[i + 2] = table[(r >> 32) & 0xffff];
      out[i + 3] = table[r >> 48];
    }
    for (; i < end; ++i) out[i] = table[splitmix64(s) & 0xffff];
  });
}

void fill_random(void* dst, std::size_t bytes, hattn::DType dt, std::uint64_t seed) {
  if (dt == hattn::DType::kF32)
    fill_random_bits<std::uint32_t>(dst, bytes, dt, seed);
  else
    fill_random_bits<std::uint16_t>(dst, bytes, dt, seed);
}

// --- cpu_dense cases ------------------------------------------------------------

struct DenseCase {
  hattn::DType kv_dtype;
  std::int64_t kv_len;
  std::int32_t batch;
  // kBf16Products cases are named cpu_dense_bf16products/...: the opt-in
  // mode that rounds q and the softmax weights to bf16 (AVX512_BF16 CPUs).
  hattn::cpu::DenseDecode::Precision precision = hattn::cpu::DenseDecode::Precision::kF32;

  std::size_t kv_bytes() const noexcept {
    return 2 * static_cast<std::size_t>(kv_len) * static_cast<std::size_t>(batch) * kKvHeads *
           kHeadDim * hattn::size_of(kv_dtype);
  }
  std::size_t num_sets() const noexcept {
    return std::max<std::size_t>(1, (rotation_bytes() + kv_bytes() - 1) / kv_bytes());
  }
  std::string name() const {
    const bool bf16p = precision == hattn::cpu::DenseDecode::Precision::kBf16Products;
    return (bf16p ? "cpu_dense_bf16products/" : "cpu_dense/") +
           std::string(hattn::to_string(kv_dtype)) + "/kv:" + std::to_string(kv_len) +
           "/bs:" + std::to_string(batch);
  }
  hattn::DecodeProblem problem() const {
    hattn::DecodeProblem p;
    p.batch_size = batch;
    p.num_q_heads = kQHeads;
    p.num_kv_heads = kKvHeads;
    p.head_dim = kHeadDim;
    p.kv_dtype = kv_dtype;
    p.q_dtype = hattn::DType::kF32;
    p.o_dtype = hattn::DType::kF32;
    return p;
  }
};

struct DenseFixture final : Fixture {
  std::string error;  // non-empty: the case cannot run
  hattn::cpu::DenseDecode backend;
  std::optional<hattn::HostPagePool> pool;
  std::vector<hattn::PageTable> tables;  // one per KV set
  std::vector<hattn::PagedKvView> views;
  std::vector<std::unique_ptr<std::byte[]>> workspaces;
  std::vector<hattn::cpu::DecodePlan> plans;
  std::vector<float> q, o, lse;
  hattn::QueryView qv;
  hattn::PartialView out;
  std::size_t next = 0;  // the KV set the next iteration reads (kept across runs)
};

std::unique_ptr<Fixture> make_dense_fixture(const DenseCase& c) {
  const auto t_start = Clock::now();
  auto fx = std::make_unique<DenseFixture>();
  fx->backend = hattn::cpu::DenseDecode(hattn::cpu_isa_default(), c.precision);
  const std::size_t sets = c.num_sets();
  const std::size_t phys = physical_memory_bytes();
  if (phys != 0 && sets * c.kv_bytes() > phys / 10 * 8) {
    fx->error = "not enough memory for this case";
    return fx;
  }
  const hattn::DecodeProblem p = c.problem();
  if (const hattn::Status s = hattn::cpu::DenseDecode::can_implement(p); !s) {
    fx->error = s.message();
    return fx;
  }

  // Pages for every sequence of every set, handed out by the pool through
  // append (its only way of giving a sequence pages); the contents appended
  // are placeholders, overwritten below.
  const std::int64_t pages_per_seq = (c.kv_len + page_size() - 1) / page_size();
  hattn::PagePoolOptions po;
  po.dtype = c.kv_dtype;
  po.num_kv_heads = kKvHeads;
  po.head_dim = kHeadDim;
  po.page_size = page_size();
  po.num_pages = pages_per_seq * c.batch * static_cast<std::int64_t>(sets);
  po.layout = hattn::KvLayout::kHND;
  fx->pool.emplace(po);
  hattn::HostPagePool& pool = *fx->pool;
  const std::size_t pool_bytes = pool.page_bytes() * static_cast<std::size_t>(po.num_pages);
  prefault(pool.k_data(), pool_bytes);
  prefault(pool.v_data(), pool_bytes);

  constexpr std::int64_t kAppendTokens = 1024;
  const std::size_t token_bytes = std::size_t{kKvHeads} * kHeadDim * hattn::size_of(c.kv_dtype);
  const std::vector<std::byte> src(static_cast<std::size_t>(kAppendTokens) * token_bytes);
  std::vector<std::vector<hattn::HostPagePool::SeqId>> seqs(sets);
  for (std::size_t s = 0; s < sets; ++s) {
    for (std::int32_t b = 0; b < c.batch; ++b) {
      hattn::HostPagePool::SeqId id = 0;
      hattn::Status st = pool.create_sequence(&id);
      for (std::int64_t done = 0; st && done < c.kv_len; done += kAppendTokens)
        st = pool.append(id, src.data(), src.data(), std::min(kAppendTokens, c.kv_len - done));
      if (!st) {
        fx->error = st.message();
        return fx;
      }
      seqs[s].push_back(id);
    }
  }
  const double t_append = seconds_since(t_start);
  fill_random(pool.k_data(), pool_bytes, c.kv_dtype, 1);
  fill_random(pool.v_data(), pool_bytes, c.kv_dtype, 2);
  const double t_fill = seconds_since(t_start);

  // Query, output, and one plan per KV set.
  const std::size_t qo = static_cast<std::size_t>(c.batch) * kQHeads * kHeadDim;
  fx->q.resize(qo);
  fx->o.assign(qo, 0.0f);
  fx->lse.assign(static_cast<std::size_t>(c.batch) * kQHeads, 0.0f);
  std::mt19937_64 rng(42);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (float& x : fx->q) x = nd(rng);
  fx->qv = hattn::make_query_view(fx->q.data(), hattn::DType::kF32, c.batch, kQHeads, kHeadDim);
  fx->out = hattn::make_partial_view(fx->o.data(), hattn::DType::kF32, fx->lse.data(), c.batch,
                                     kQHeads, kHeadDim);

  const std::size_t ws_bytes = hattn::cpu::DenseDecode::workspace_size(p);
  fx->tables.resize(sets);
  fx->views.resize(sets);
  fx->plans.resize(sets);
  for (std::size_t s = 0; s < sets; ++s) {
    hattn::Status st = pool.build_page_table(seqs[s], &fx->tables[s]);
    if (st) {
      fx->views[s] = pool.view(fx->tables[s]);
      // Default-initialized: only what the plan and run use gets touched.
      fx->workspaces.emplace_back(new std::byte[ws_bytes]);
      st = fx->backend.plan(p, fx->views[s], fx->workspaces.back().get(), ws_bytes, &fx->plans[s]);
    }
    if (!st) {
      fx->error = st.message();
      return fx;
    }
  }
  // One untimed step on every set checks the setup and touches every
  // workspace, so no page fault lands in the timed loop.
  for (std::size_t s = 0; s < sets; ++s) {
    const hattn::Status st =
        fx->backend.run(fx->plans[s], fx->qv, fx->views[s], fx->out, executor());
    if (!st) {
      fx->error = st.message();
      return fx;
    }
  }
  fx->next = 0;
  if (verbose())
    std::fprintf(stderr, "[setup] %s: %zu sets, %.1f MiB, %.2f s (pages %.2f s, fill %.2f s)\n",
                 c.name().c_str(), sets, static_cast<double>(sets * c.kv_bytes()) / kMiB,
                 seconds_since(t_start), t_append, t_fill - t_append);
  return fx;
}

void bm_cpu_dense(benchmark::State& state, const DenseCase& c) {
  (void)probe_buffer();  // allocated before any case memory
  DenseFixture* fx = nullptr;
  try {
    fx = &fixture<DenseFixture>(c.name(), [&] { return make_dense_fixture(c); });
  } catch (const std::exception& e) {
    release_fixture();
    state.SkipWithError((std::string("setup failed: ") + e.what()).c_str());
    return;
  }
  if (!fx->error.empty()) {
    state.SkipWithError(fx->error.c_str());
    return;
  }
  state.SetLabel(std::string(hattn::to_string(fx->backend.isa())) +
                 (fx->backend.uses_bf16_products(c.kv_dtype) ? "+bf16products" : ""));

  const hattn::CpuExecutor& ex = executor();
  const std::size_t sets = fx->plans.size();
  std::size_t s = fx->next;
  bool failed = false;
  CaseProbe pr;
  pr.before = probe_rate(kCaseProbePasses);
  const auto t0 = Clock::now();
  for (auto _ : state) {
    const hattn::Status st = fx->backend.run(fx->plans[s], fx->qv, fx->views[s], fx->out, ex);
    if (!st) {
      state.SkipWithError(st.message());
      failed = true;
      break;
    }
    if (++s == sets) s = 0;
  }
  const double elapsed = seconds_since(t0);
  fx->next = s;
  if (failed) return;
  pr.after = probe_rate(kCaseProbePasses);

  report_rates(state, state.iterations() * static_cast<std::int64_t>(c.kv_bytes()), elapsed, pr);
  benchmark::DoNotOptimize(fx->o.data());
}

// --- membw/read -----------------------------------------------------------------

void bm_membw_read(benchmark::State& state) {
  ReadBuffer& buf = probe_buffer();
  const SumKernel k = pick_sum_kernel();
  state.SetLabel(k.isa);
  CaseProbe pr;
  pr.before = probe_rate(kCaseProbePasses);
  const auto t0 = Clock::now();
  for (auto _ : state) (void)buf.pass(k.fn);
  const double elapsed = seconds_since(t0);
  pr.after = probe_rate(kCaseProbePasses);
  report_rates(state, state.iterations() * static_cast<std::int64_t>(buf.bytes()), elapsed, pr);
}

void register_benchmarks() {
  const bool real_time = use_real_time();
  auto* read =
      benchmark::RegisterBenchmark("membw/read", bm_membw_read)->Unit(benchmark::kMillisecond);
  if (real_time) read->UseRealTime();
  constexpr std::array kDTypes = {hattn::DType::kBF16, hattn::DType::kF16, hattn::DType::kF32};
  constexpr std::array<std::int64_t, 5> kLens = {1024, 4096, 16384, 32768, 131072};
  constexpr std::array<std::int32_t, 3> kBatches = {1, 8, 32};
  for (hattn::DType dt : kDTypes)
    for (std::int64_t n : kLens)
      for (std::int32_t b : kBatches) {
        const DenseCase c{dt, n, b};
        if (c.kv_bytes() > kMaxKvBytes) continue;
        auto* bm = benchmark::RegisterBenchmark(c.name().c_str(), [c](benchmark::State& st) {
                     bm_cpu_dense(st, c);
                   })->Unit(benchmark::kMicrosecond);
        if (real_time) bm->UseRealTime();
      }
  // The opt-in bf16-products mode, for bf16 KV.
  for (std::int64_t n : kLens)
    for (std::int32_t b : kBatches) {
      const DenseCase c{hattn::DType::kBF16, n, b,
                        hattn::cpu::DenseDecode::Precision::kBf16Products};
      if (c.kv_bytes() > kMaxKvBytes) continue;
      auto* bm = benchmark::RegisterBenchmark(c.name().c_str(), [c](benchmark::State& st) {
                   bm_cpu_dense(st, c);
                 })->Unit(benchmark::kMicrosecond);
      if (real_time) bm->UseRealTime();
    }
}

}  // namespace

int main(int argc, char** argv) {
  register_benchmarks();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  release_fixture();
  benchmark::Shutdown();
  return 0;
}
