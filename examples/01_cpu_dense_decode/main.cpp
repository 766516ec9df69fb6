// Example 01: CPU dense decode attention over a paged KV cache.
//
// One decode step of one attention layer, the way an inference engine would
// run it on the CPU:
//   1. keep the KV cache in a HostPagePool (pages of 16 tokens, HND layout);
//   2. build the page table of the batch and a view that reads it;
//   3. plan the step once, then run the backend (per layer) on an executor;
//   4. check the result against hattn::ref::decode, which accumulates in double.
//
// Run with --help for the options. The default (4 sequences of 4K..16K tokens,
// Llama-3-8B-like heads) reads about 170 MB of KV per step.

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "hattn/core/dtype.hpp"
#include "hattn/core/kv_view.hpp"
#include "hattn/core/page_pool.hpp"
#include "hattn/core/problem.hpp"
#include "hattn/core/status.hpp"
#include "hattn/cpu/dense_decode.hpp"
#include "hattn/cpu/executor.hpp"
#include "hattn/cpu/isa.hpp"
#include "hattn/ref/decode.hpp"

namespace {

// --- command line -------------------------------------------------------------

struct Options {
  int batch = 4;
  int kv_len = 16384;
  hattn::DType dtype = hattn::DType::kBF16;
  int threads = 0;  // 0: all cores
  std::string isa = "auto";
  int steps = 10;
};

constexpr const char* kUsage = R"(Usage: 01_cpu_dense_decode [options]

Runs CPU dense decode attention on a paged KV cache (8 KV heads, 32 query
heads, head dim 128, pages of 16 tokens, HND), times it and checks it against
the double-precision reference.

Options:
  --batch N      sequences in the batch (default 4)
  --kv-len N     tokens in the longest sequence; the others are spread down to
                 about N/4 (default 16384)
  --dtype T      KV cache dtype: bf16, f16 or f32 (default bf16)
  --threads N    worker threads, 0 = all cores (default 0)
  --isa I        kernels: auto, avx512, avx2 or scalar (default auto, which
                 honours the HATTN_CPU_ISA environment variable)
  --steps N      timed runs (default 10)
  -h, --help     show this help
Options take their value as the next argument or after '=' (--batch=8).
)";

bool parse_int(std::string_view s, int lo, int hi, int* out) {
  int v = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size() || v < lo || v > hi) return false;
  *out = v;
  return true;
}

bool parse_dtype(std::string_view s, hattn::DType* out) {
  for (hattn::DType t : {hattn::DType::kBF16, hattn::DType::kF16, hattn::DType::kF32})
    if (s == hattn::to_string(t)) {
      *out = t;
      return true;
    }
  return false;
}

// Returns 0 to go on, otherwise the exit code (after printing why).
int parse_args(int argc, char** argv, Options* opt) {
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::fputs(kUsage, stdout);
      return -1;
    }
    std::string_view value;
    bool has_value = false;
    if (const auto eq = arg.find('='); arg.starts_with("--") && eq != std::string_view::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      has_value = true;
    }
    const bool known = arg == "--batch" || arg == "--kv-len" || arg == "--dtype" ||
                       arg == "--threads" || arg == "--isa" || arg == "--steps";
    if (!known) {
      std::fprintf(stderr, "error: unknown option '%s' (see --help)\n", argv[i]);
      return 2;
    }
    if (!has_value) {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "error: option %s needs a value (see --help)\n", argv[i]);
        return 2;
      }
      value = argv[++i];
    }
    bool ok = false;
    if (arg == "--batch") ok = parse_int(value, 1, 1024, &opt->batch);
    if (arg == "--kv-len") ok = parse_int(value, 1, 1 << 22, &opt->kv_len);
    if (arg == "--threads") ok = parse_int(value, 0, 4096, &opt->threads);
    if (arg == "--steps") ok = parse_int(value, 1, 100000, &opt->steps);
    if (arg == "--dtype") ok = parse_dtype(value, &opt->dtype);
    if (arg == "--isa") {
      opt->isa = std::string(value);
      ok = value == "auto" || value == "avx512" || value == "avx2" || value == "scalar";
    }
    if (!ok) {
      std::fprintf(stderr, "error: bad value '%.*s' for %.*s (see --help)\n",
                   static_cast<int>(value.size()), value.data(), static_cast<int>(arg.size()),
                   arg.data());
      return 2;
    }
  }
  return 0;
}

// --- helpers ------------------------------------------------------------------

// Prints a failed Status and returns false.
bool check(const hattn::Status& s, const char* what) {
  if (s) return true;
  const std::string_view code = hattn::to_string(s.code());
  std::fprintf(stderr, "error: %s: %.*s: %s\n", what, static_cast<int>(code.size()), code.data(),
               s.message());
  return false;
}

// A small fast generator (xorshift64*): filling ~100M values with <random>
// distributions would take longer than the attention itself.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : s_(seed | 1) {}
  float uniform() {  // in [-1, 1)
    s_ ^= s_ >> 12;
    s_ ^= s_ << 25;
    s_ ^= s_ >> 27;
    const std::uint64_t r = s_ * 0x2545F4914F6CDD1DULL;
    return static_cast<float>(r >> 40) * (2.0f / 16777216.0f) - 1.0f;
  }

 private:
  std::uint64_t s_;
};

// Lengths spread evenly from kv_len/4 up to kv_len, a few tokens short of a
// page boundary so that last pages are only partly full.
std::vector<std::int64_t> sequence_lengths(int batch, int kv_len) {
  std::vector<std::int64_t> lens(static_cast<std::size_t>(batch));
  for (int b = 0; b < batch; ++b) {
    const std::int64_t lo = std::max(1, kv_len / 4);
    const std::int64_t even = batch == 1 ? kv_len : lo + (kv_len - lo) * b / (batch - 1);
    lens[static_cast<std::size_t>(b)] = std::max<std::int64_t>(1, even - 5 * (batch - 1 - b));
  }
  return lens;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  if (const int rc = parse_args(argc, argv, &opt); rc != 0) return rc < 0 ? 0 : rc;

  constexpr int kKvHeads = 8, kQHeads = 32, kHeadDim = 128, kPageSize = 16;
  const std::vector<std::int64_t> lens = sequence_lengths(opt.batch, opt.kv_len);
  std::int64_t total_tokens = 0, total_pages = 0;
  for (std::int64_t len : lens) {
    total_tokens += len;
    total_pages += (len + kPageSize - 1) / kPageSize;
  }

  // 1. The KV cache: a pool of pages, and one sequence per request, filled
  //    with random K/V the way prefill would fill it (append [n][H][D] rows).
  hattn::HostPagePool pool({.dtype = opt.dtype,
                            .num_kv_heads = kKvHeads,
                            .head_dim = kHeadDim,
                            .page_size = kPageSize,
                            .num_pages = total_pages,
                            .layout = hattn::KvLayout::kHND});
  Rng rng(2024);
  const std::size_t es = hattn::size_of(opt.dtype);
  constexpr std::int64_t kChunk = 1024;  // tokens appended at a time
  std::vector<std::byte> k_rows(kChunk * kKvHeads * kHeadDim * es), v_rows(k_rows.size());
  std::vector<hattn::HostPagePool::SeqId> seqs;
  for (std::int64_t len : lens) {
    hattn::HostPagePool::SeqId id = 0;
    if (!check(pool.create_sequence(&id), "create_sequence")) return 1;
    for (std::int64_t done = 0; done < len; done += kChunk) {
      const std::int64_t n = std::min(kChunk, len - done);
      for (std::int64_t i = 0; i < n * kKvHeads * kHeadDim; ++i) {
        hattn::store_from_float(k_rows.data(), opt.dtype, i, rng.uniform());
        hattn::store_from_float(v_rows.data(), opt.dtype, i, rng.uniform());
      }
      if (!check(pool.append(id, k_rows.data(), v_rows.data(), n), "append")) return 1;
    }
    seqs.push_back(id);
  }

  // 2. The batch's page table (CSR: indptr, indices, last_page_len) and a
  //    view of the pool through it. Views are cheap structs passed by value.
  hattn::PageTable table;
  if (!check(pool.build_page_table(seqs, &table), "build_page_table")) return 1;
  const hattn::PagedKvView kv = pool.view(table);

  // 3. The problem, the new query token of every sequence, and the output:
  //    o (normalized) and lse2 (base-2 log-sum-exp of the scores).
  const hattn::DecodeProblem problem{.batch_size = opt.batch,
                                     .num_q_heads = kQHeads,
                                     .num_kv_heads = kKvHeads,
                                     .head_dim = kHeadDim,
                                     .kv_dtype = opt.dtype,
                                     .q_dtype = hattn::DType::kF32,
                                     .o_dtype = hattn::DType::kF32,
                                     .sm_scale = std::nullopt};  // 1/sqrt(head_dim)
  std::vector<float> q(static_cast<std::size_t>(opt.batch) * kQHeads * kHeadDim);
  for (float& x : q) x = rng.uniform();
  std::vector<float> o(q.size());
  std::vector<float> lse2(static_cast<std::size_t>(opt.batch) * kQHeads);
  const hattn::QueryView qv =
      hattn::make_query_view(q.data(), hattn::DType::kF32, opt.batch, kQHeads, kHeadDim);
  const hattn::PartialView out = hattn::make_partial_view(o.data(), hattn::DType::kF32, lse2.data(),
                                                          opt.batch, kQHeads, kHeadDim);

  // 4. The backend: kernels for the ISA asked for (or the best this CPU has),
  //    an executor that owns a oneTBB arena, and a workspace for the plan.
  hattn::CpuIsa isa = hattn::cpu_isa_default();
  if (opt.isa != "auto") {
    for (hattn::CpuIsa i : {hattn::CpuIsa::kScalar, hattn::CpuIsa::kAvx2, hattn::CpuIsa::kAvx512})
      if (opt.isa == hattn::to_string(i)) isa = i;
    if (!hattn::cpu_isa_available(isa)) {
      std::fprintf(stderr, "note: this CPU cannot run %s kernels; using the best it can\n",
                   opt.isa.c_str());
    }
  }
  const hattn::cpu::DenseDecode backend(isa);
  const hattn::CpuExecutor executor(opt.threads);
  if (!check(hattn::cpu::DenseDecode::can_implement(problem), "can_implement")) return 1;
  std::vector<std::byte> workspace(hattn::cpu::DenseDecode::workspace_size(problem));

  // Plan once per decode step (the lengths changed), run once per layer.
  hattn::cpu::DecodePlan plan;
  if (!check(backend.plan(problem, kv, workspace.data(), workspace.size(), &plan), "plan"))
    return 1;
  if (!check(backend.run(plan, qv, kv, out, executor), "run")) return 1;  // warm-up

  using Clock = std::chrono::steady_clock;
  double best_ms = 1e300, sum_ms = 0.0;
  for (int s = 0; s < opt.steps; ++s) {
    const auto t0 = Clock::now();
    if (!check(backend.run(plan, qv, kv, out, executor), "run")) return 1;
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    best_ms = std::min(best_ms, ms);
    sum_ms += ms;
  }
  const double mean_ms = sum_ms / opt.steps;
  const double kv_bytes = 2.0 * static_cast<double>(total_tokens) * kKvHeads * kHeadDim *
                          static_cast<double>(es);  // K and V, each read once

  // 5. The reference: the same views, accumulated in double.
  hattn::ref::Result ref;
  if (!check(hattn::ref::decode(problem, qv, kv, &ref), "ref::decode")) return 1;
  double err_o = 0.0, err_lse = 0.0;
  for (std::size_t i = 0; i < o.size(); ++i) err_o = std::max(err_o, std::abs(o[i] - ref.o[i]));
  for (std::size_t i = 0; i < lse2.size(); ++i)
    err_lse = std::max(err_lse, std::abs(lse2[i] - ref.lse2[i]));

  const std::string_view isa_name = hattn::to_string(backend.isa());
  const std::string_view dtype_name = hattn::to_string(opt.dtype);
  std::printf("hattn example 01: CPU dense decode\n");
  std::printf("  batch %d, lengths", opt.batch);
  for (std::size_t b = 0; b < lens.size() && b < 8; ++b)
    std::printf(" %lld", static_cast<long long>(lens[b]));
  std::printf("%s (%lld tokens)\n", lens.size() > 8 ? " ..." : "",
              static_cast<long long>(total_tokens));
  std::printf("  heads %d q / %d kv, head dim %d, KV %.*s, pages of %d (HND)\n", kQHeads, kKvHeads,
              kHeadDim, static_cast<int>(dtype_name.size()), dtype_name.data(), kPageSize);
  std::printf("  ISA %.*s, %d threads, %lld work items\n", static_cast<int>(isa_name.size()),
              isa_name.data(), executor.concurrency(), static_cast<long long>(plan.num_items));
  std::printf("  time per step: %.3f ms mean, %.3f ms best over %d runs\n", mean_ms, best_ms,
              opt.steps);
  std::printf("  KV read: %.1f MB per step, %.2f GB/s (mean), %.2f GB/s (best)\n", kv_bytes / 1e6,
              kv_bytes / (mean_ms * 1e6), kv_bytes / (best_ms * 1e6));
  std::printf("  vs reference: max |o - ref| = %.3g, max |lse2 - ref| = %.3g\n", err_o, err_lse);

  // Outputs are f32 here; the loose bound only catches real bugs.
  constexpr double kTolerance = 1e-3;
  if (!(err_o <= kTolerance && err_lse <= kTolerance)) {
    std::fprintf(stderr, "error: result differs from the reference by more than %g\n", kTolerance);
    return 1;
  }
  std::printf("  OK\n");
  return 0;
}
