// GPU dense decode benchmark: how close hattn::cuda::DenseDecode streams the
// KV cache to the device's memory bandwidth.
//
// Cases (names are fixed; scripts read them):
//   cuda_membw/copy                  the bandwidth probe: a device-to-device copy
//                                    of 1 GiB, bytes read + written
//   cuda_dense/<kv>/kv:<n>/bs:<b>    kv in {bf16, f16}, n in {4096, 32768, 131072},
//                                    b in {1, 8, 64}
//
// Every cuda_dense case: Llama-3-8B attention (32 query heads, 8 KV heads,
// head dim 128), a paged KV cache of random values with pages of 16 tokens
// (HATTN_BENCH_PAGE_SIZE overrides) in HND order, every sequence n tokens, f32
// query and output, the plan made once beforehand.
// Each timed iteration enqueues `reps` decode steps, each on the next of
// several KV sets (sets * KV bytes >= 256 MiB, so no step finds its KV in the
// 50 MiB L2), between two CUDA events; the events' elapsed time / reps is the
// step time (set as the iteration's manual time too).
//
// Google Benchmark appends "/manual_time" to the name of an instance
// registered with UseManualTime(), which would break the names above, so by
// default the cases are registered without it and report their rates from the
// events' time themselves; HATTN_BENCH_USE_MANUAL_TIME=1 registers them with
// UseManualTime() (same rates, "/manual_time" names, GB's time columns = event time).
//
// Reported: bytes_per_second (KV bytes = 2 * b * n * 8 * 128 * sizeof(kv) per
// step), bw_fraction = that / the probe's rate, probe_GBps, chunks (KV chunks
// per sequence in the plan), and the device name as the label.
//
// Without a CUDA device it prints a message and exits 0.

#include <benchmark/benchmark.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "hattn/core/dtype.hpp"
#include "hattn/core/kv_view.hpp"
#include "hattn/core/problem.hpp"
#include "hattn/cuda/buffer.hpp"
#include "hattn/cuda/dense_decode.hpp"
#include "hattn/cuda/stream.hpp"

namespace {

using hattn::cuda::DeviceBuffer;
using hattn::cuda::Event;
using hattn::cuda::Stream;

constexpr std::int32_t kQHeads = 32;
constexpr std::int32_t kKvHeads = 8;
constexpr std::int32_t kHeadDim = 128;
constexpr std::int32_t kDefaultPageSize = 16;

// HATTN_BENCH_PAGE_SIZE=<n> overrides the page size (an exploration knob: the
// case names stay the same).
std::int32_t page_size() {
  const char* e = std::getenv("HATTN_BENCH_PAGE_SIZE");
  const int n = e != nullptr ? std::atoi(e) : 0;
  return n > 0 ? n : kDefaultPageSize;
}
constexpr std::size_t kMiB = std::size_t{1} << 20;
constexpr std::size_t kProbeBytes = std::size_t{1} << 30;
constexpr double kMinTimedSeconds = 2e-3;  // per iteration: amortizes the launch after the event

double g_probe_bytes_per_second = 0.0;
std::string g_device_name;

bool use_manual_time() {
  const char* v = std::getenv("HATTN_BENCH_USE_MANUAL_TIME");
  return v != nullptr && std::string(v) == "1";
}

bool ok(cudaError_t e, benchmark::State& state, const char* what) {
  if (e == cudaSuccess) return true;
  state.SkipWithError((std::string(what) + ": " + cudaGetErrorString(e)).c_str());
  return false;
}
bool ok(const hattn::Status& s, benchmark::State& state, const char* what) {
  if (s) return true;
  state.SkipWithError((std::string(what) + ": " + s.message()).c_str());
  return false;
}

// Seconds of `reps` calls of f between two events on `stream`.
template <class F>
bool time_on_stream(const Stream& stream, int reps, F&& f, double* seconds) {
  Event start, stop;
  if (!start.create(true) || !stop.create(true)) return false;
  if (!start.record(stream)) return false;
  for (int r = 0; r < reps; ++r)
    if (!f(r)) return false;
  if (!stop.record(stream) || !stop.synchronize()) return false;
  float ms = 0.0f;
  if (!Event::elapsed_ms(start, stop, &ms)) return false;
  *seconds = ms * 1e-3;
  return true;
}

// The probe: median of several 1 GiB device-to-device copies (read + write).
double measure_probe(const Stream& stream) {
  DeviceBuffer src, dst;
  if (!src.allocate(kProbeBytes) || !dst.allocate(kProbeBytes)) return 0.0;
  cudaMemset(src.data(), 1, kProbeBytes);
  std::vector<double> rates;
  for (int pass = 0; pass < 11; ++pass) {
    double s = 0.0;
    const bool good = time_on_stream(
        stream, 1,
        [&](int) {
          return cudaMemcpyAsync(dst.data(), src.data(), kProbeBytes, cudaMemcpyDeviceToDevice,
                                 stream.get()) == cudaSuccess;
        },
        &s);
    if (!good || s <= 0.0) return 0.0;
    if (pass > 0) rates.push_back(2.0 * static_cast<double>(kProbeBytes) / s);  // pass 0: warm-up
  }
  std::sort(rates.begin(), rates.end());
  return rates[rates.size() / 2];
}

void set_rates(benchmark::State& state, double bytes, double seconds) {
  const double rate = seconds > 0.0 ? bytes / seconds : 0.0;
  state.counters["bytes_per_second"] =
      benchmark::Counter(rate, benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
  state.counters["bw_fraction"] =
      g_probe_bytes_per_second > 0.0 ? rate / g_probe_bytes_per_second : 0.0;
  state.counters["probe_GBps"] = g_probe_bytes_per_second * 1e-9;
  state.SetLabel(g_device_name);
}

void bm_membw_copy(benchmark::State& state) {
  Stream stream;
  if (!ok(stream.create(), state, "stream")) return;
  DeviceBuffer src, dst;
  if (!ok(src.allocate(kProbeBytes), state, "probe buffer") ||
      !ok(dst.allocate(kProbeBytes), state, "probe buffer"))
    return;
  cudaMemset(src.data(), 1, kProbeBytes);
  double total_s = 0.0, total_bytes = 0.0;
  for (auto _ : state) {
    double s = 0.0;
    if (!time_on_stream(
            stream, 1,
            [&](int) {
              return cudaMemcpyAsync(dst.data(), src.data(), kProbeBytes, cudaMemcpyDeviceToDevice,
                                     stream.get()) == cudaSuccess;
            },
            &s)) {
      state.SkipWithError("copy failed");
      return;
    }
    state.SetIterationTime(s);
    total_s += s;
    total_bytes += 2.0 * static_cast<double>(kProbeBytes);
  }
  set_rates(state, total_bytes, total_s);
}

// Random N(0, 1) values of `dtype` over the whole buffer: a 32 MiB block made
// on the host, copied over and over.
cudaError_t fill_random(DeviceBuffer& buf, hattn::DType dtype, std::uint32_t seed) {
  const std::size_t es = hattn::size_of(dtype);
  const std::size_t tile = std::min<std::size_t>(buf.size(), 32 * kMiB) / es * es;
  std::vector<unsigned char> host(tile);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (std::size_t i = 0; i < tile / es; ++i)
    hattn::store_from_float(host.data(), dtype, static_cast<std::ptrdiff_t>(i), normal(rng));
  for (std::size_t at = 0; at < buf.size(); at += tile) {
    const std::size_t n = std::min(tile, buf.size() - at);
    if (const cudaError_t e = cudaMemcpy(static_cast<unsigned char*>(buf.data()) + at, host.data(),
                                         n, cudaMemcpyHostToDevice);
        e != cudaSuccess)
      return e;
  }
  return cudaSuccess;
}

void bm_cuda_dense(benchmark::State& state, hattn::DType kv_dtype, std::int64_t n,
                   std::int32_t batch) {
  Stream stream;
  if (!ok(stream.create(), state, "stream")) return;
  const std::size_t es = hattn::size_of(kv_dtype);
  const std::int32_t page = page_size();
  const std::int64_t pages_per_seq = (n + page - 1) / page;
  const std::int64_t pages_per_set = pages_per_seq * batch;
  const std::size_t page_elems = static_cast<std::size_t>(page) * kKvHeads * kHeadDim;
  const double step_bytes = 2.0 * static_cast<double>(batch) * static_cast<double>(n) * kKvHeads *
                            kHeadDim * static_cast<double>(es);
  const auto set_bytes = static_cast<std::size_t>(pages_per_set) * page_elems * es;
  const std::int64_t sets = std::max<std::int64_t>(
      1, static_cast<std::int64_t>((256 * kMiB + set_bytes - 1) / set_bytes));
  const std::int64_t num_pages = pages_per_set * sets;

  // K and V pools of every set, random N(0, 1) values (never a constant:
  // zeros or one repeated word can run faster than real data), tiled from
  // one 32 MiB block.
  DeviceBuffer k, v;
  if (!ok(k.allocate(static_cast<std::size_t>(num_pages) * page_elems * es), state, "K pool") ||
      !ok(v.allocate(static_cast<std::size_t>(num_pages) * page_elems * es), state, "V pool") ||
      !ok(fill_random(k, kv_dtype, 1), state, "K fill") ||
      !ok(fill_random(v, kv_dtype, 2), state, "V fill"))
    return;

  // Page tables: set s owns pages [s * pages_per_set, (s + 1) * pages_per_set).
  std::vector<std::int32_t> indptr(static_cast<std::size_t>(batch) + 1), last(batch);
  for (std::int32_t b = 0; b <= batch; ++b)
    indptr[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(b * pages_per_seq);
  for (auto& x : last) x = static_cast<std::int32_t>(n - (pages_per_seq - 1) * page);
  std::vector<std::int32_t> indices(static_cast<std::size_t>(num_pages));
  for (std::int64_t i = 0; i < num_pages; ++i)
    indices[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i);
  DeviceBuffer d_indptr, d_last, d_indices;
  if (!ok(d_indptr.allocate(indptr.size() * 4), state, "indptr") ||
      !ok(d_last.allocate(last.size() * 4), state, "last_page_len") ||
      !ok(d_indices.allocate(indices.size() * 4), state, "indices"))
    return;
  cudaMemcpy(d_indptr.data(), indptr.data(), indptr.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(d_last.data(), last.data(), last.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(d_indices.data(), indices.data(), indices.size() * 4, cudaMemcpyHostToDevice);

  // Query (random) and output.
  std::vector<float> q(static_cast<std::size_t>(batch) * kQHeads * kHeadDim);
  std::mt19937 rng(42);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (auto& x : q) x = normal(rng);
  DeviceBuffer d_q, d_o, d_lse;
  if (!ok(d_q.allocate(q.size() * 4), state, "q") || !ok(d_o.allocate(q.size() * 4), state, "o") ||
      !ok(d_lse.allocate(static_cast<std::size_t>(batch) * kQHeads * 4), state, "lse"))
    return;
  cudaMemcpy(d_q.data(), q.data(), q.size() * 4, cudaMemcpyHostToDevice);

  const hattn::DecodeProblem problem{.batch_size = batch,
                                     .num_q_heads = kQHeads,
                                     .num_kv_heads = kKvHeads,
                                     .head_dim = kHeadDim,
                                     .kv_dtype = kv_dtype,
                                     .q_dtype = hattn::DType::kF32,
                                     .o_dtype = hattn::DType::kF32,
                                     .sm_scale = std::nullopt};
  hattn::cuda::DenseDecode backend;
  if (!ok(hattn::cuda::DenseDecode::for_device(0, &backend), state, "device")) return;
  DeviceBuffer ws;
  if (!ok(ws.allocate(hattn::cuda::DenseDecode::workspace_size(problem)), state, "workspace"))
    return;
  cudaMemset(ws.data(), 0, ws.size());
  const std::vector<std::int64_t> lens(static_cast<std::size_t>(batch), n);
  hattn::cuda::DecodePlan plan;
  if (!ok(backend.plan(problem, lens, ws.data(), ws.size(), &plan), state, "plan")) return;

  std::vector<hattn::PagedKvView> views(static_cast<std::size_t>(sets));
  for (std::int64_t s = 0; s < sets; ++s) {
    hattn::PagedKvView& kv = views[static_cast<std::size_t>(s)];
    kv.k = k.data();
    kv.v = v.data();
    kv.dtype = kv_dtype;
    kv.num_kv_heads = kKvHeads;
    kv.head_dim = kHeadDim;
    kv.page_size = page;
    kv.num_pages = num_pages;
    kv.k_strides = kv.v_strides =
        hattn::packed_strides(hattn::KvLayout::kHND, page, kKvHeads, kHeadDim);
    kv.batch_size = batch;
    kv.indptr = d_indptr.as<const std::int32_t>();
    kv.indices = d_indices.as<const std::int32_t>() + s * pages_per_set;
    kv.last_page_len = d_last.as<const std::int32_t>();
  }
  const auto qv = hattn::make_query_view(d_q.data(), hattn::DType::kF32, batch, kQHeads, kHeadDim);
  const auto out = hattn::make_partial_view(d_o.data(), hattn::DType::kF32, d_lse.as<float>(),
                                            batch, kQHeads, kHeadDim);
  std::int64_t next = 0;
  const auto step = [&](int) {
    const hattn::PagedKvView& kv = views[static_cast<std::size_t>(next++ % sets)];
    return static_cast<bool>(backend.run(plan, qv, kv, out, stream));
  };

  // Warm-up (and a first estimate of the step time for `reps`).
  double warm = 0.0;
  if (!time_on_stream(stream, static_cast<int>(std::min<std::int64_t>(sets, 8)), step, &warm)) {
    state.SkipWithError("run failed");
    return;
  }
  const double per_step = warm / static_cast<double>(std::min<std::int64_t>(sets, 8));
  const int reps = static_cast<int>(
      std::clamp<double>(kMinTimedSeconds / std::max(per_step, 1e-7), 1.0, 1000.0));
  if (!ok(hattn::cuda::DenseDecode::device_errors(plan, stream), state, "device errors")) return;

  double total_s = 0.0, total_bytes = 0.0;
  for (auto _ : state) {
    double s = 0.0;
    if (!time_on_stream(stream, reps, step, &s)) {
      state.SkipWithError("run failed");
      return;
    }
    state.SetIterationTime(s / reps);
    total_s += s;
    total_bytes += step_bytes * reps;
  }
  set_rates(state, total_bytes, total_s);
  state.counters["chunks"] = plan.num_chunks;
  state.counters["reps"] = reps;
}

void register_all() {
  const bool manual = use_manual_time();
  auto* probe = benchmark::RegisterBenchmark("cuda_membw/copy", bm_membw_copy);
  probe->Unit(benchmark::kMicrosecond);
  if (manual) probe->UseManualTime();
  for (const hattn::DType kv : {hattn::DType::kBF16, hattn::DType::kF16})
    for (const std::int64_t n : {4096, 32768, 131072})
      for (const std::int32_t b : {1, 8, 64}) {
        const std::string name = "cuda_dense/" + std::string(hattn::to_string(kv)) +
                                 "/kv:" + std::to_string(n) + "/bs:" + std::to_string(b);
        auto* bm = benchmark::RegisterBenchmark(
            name.c_str(), [kv, n, b](benchmark::State& st) { bm_cuda_dense(st, kv, n, b); });
        bm->Unit(benchmark::kMicrosecond);
        if (manual) bm->UseManualTime();
      }
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess || devices == 0) {
    std::printf("bench_cuda_dense: no CUDA device (%s): nothing to measure\n",
                e != cudaSuccess ? cudaGetErrorString(e) : "device count 0");
    return 0;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) g_device_name = prop.name;
  {
    Stream stream;
    if (stream.create()) g_probe_bytes_per_second = measure_probe(stream);
  }
  std::printf("bench_cuda_dense: %s, probe (1 GiB D2D copy, read + write) %.1f GB/s\n",
              g_device_name.c_str(), g_probe_bytes_per_second * 1e-9);
  register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
