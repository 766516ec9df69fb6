// Example 04: a decode step with compute overlapped with CPU attention.
//
// A small model-shaped pipeline (gemm_model.hpp: Eigen GEMMs for norm + QKV
// and O-proj + MLP) runs on a host "compute stream"; the KV cache lives in host
// memory and the CPU attends it on another thread. hattn's DecodeOrchestrator
// splits the batch into micro-batches and staggers them, so the CPU attends
// one micro-batch while the compute stream works on another:
//   1. build the host KV cache (HostKvCache: one page pool per layer);
//   2. create two HostStreams (compute, copy) and the CPU backend;
//   3. call orchestrator.step() once per decode step;
//   4. write the timeline as a Chrome trace (open it in ui.perfetto.dev).
//
// Run with --help for the options.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "gemm_model.hpp"
#include "hattn/cpu/executor.hpp"
#include "hattn/runtime/cpu_attention.hpp"
#include "hattn/runtime/host_kv_cache.hpp"
#include "hattn/runtime/host_stream.hpp"
#include "hattn/runtime/orchestrator.hpp"

namespace {

constexpr const char* kUsage = R"(Usage: 04_orchestrated_step [options]

Options (defaults in brackets):
  --layers N     decoder layers [4]
  --batch N      sequences [16]
  --mb N         micro-batches [2]
  --kv-len N     tokens already in each sequence's KV cache [1024]
  --hidden N     model width; heads are hidden/64 q heads, a quarter as many KV heads [512]
  --ffn N        MLP width [1024]
  --steps N      decode steps [3]
  --threads N    CPU attention threads [1]
  --trace FILE   write the timeline as Chrome trace JSON [orchestrated_step.json]
)";

struct Options {
  int layers = 4, batch = 16, mb = 2, kv_len = 1024, hidden = 512, ffn = 1024, steps = 3,
      threads = 1;
  std::string trace = "orchestrated_step.json";
};

bool parse(int argc, char** argv, Options* o) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i], v;
    if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    }
    if (const auto eq = a.find('='); eq != std::string::npos) {
      v = a.substr(eq + 1);
      a = a.substr(0, eq);
    } else if (i + 1 < argc) {
      v = argv[++i];
    }
    if (a == "--trace") {
      o->trace = v;
      continue;
    }
    int* target = a == "--layers"    ? &o->layers
                  : a == "--batch"   ? &o->batch
                  : a == "--mb"      ? &o->mb
                  : a == "--kv-len"  ? &o->kv_len
                  : a == "--hidden"  ? &o->hidden
                  : a == "--ffn"     ? &o->ffn
                  : a == "--steps"   ? &o->steps
                  : a == "--threads" ? &o->threads
                                     : nullptr;
    char* end = nullptr;
    const long n = v.empty() ? 0 : std::strtol(v.c_str(), &end, 10);
    if (!target || !end || *end != '\0' || n < 1 || n > (1 << 24)) {
      std::fprintf(stderr, "error: bad option '%s' (value '%s')\n%s", a.c_str(), v.c_str(), kUsage);
      return false;
    }
    *target = static_cast<int>(n);
  }
  if (o->hidden % 256 != 0) {
    std::fprintf(stderr, "error: --hidden must be a multiple of 256\n");
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  namespace rt = hattn::runtime;
  Options opt;
  if (!parse(argc, argv, &opt)) return 2;

  hattn_examples::GemmModelConfig mc;
  mc.num_layers = opt.layers;
  mc.batch = opt.batch;
  mc.num_micro_batches = opt.mb;
  mc.head_dim = 64;
  mc.q_heads = opt.hidden / 64;
  mc.kv_heads = mc.q_heads / 4;
  mc.hidden = opt.hidden;
  mc.ffn = opt.ffn;
  hattn_examples::GemmModel model(mc, 42);

  // 1. The host KV cache: every sequence starts with kv_len random tokens.
  const std::int64_t pages_per_seq = (opt.kv_len + opt.steps + 15) / 16 + 1;
  rt::HostKvCache kv(opt.layers, {.dtype = hattn::DType::kBF16,
                                  .num_kv_heads = mc.kv_heads,
                                  .head_dim = mc.head_dim,
                                  .page_size = 16,
                                  .num_pages = pages_per_seq * opt.batch,
                                  .layout = hattn::KvLayout::kHND});
  {
    const std::size_t row = static_cast<std::size_t>(mc.kv_heads) * mc.head_dim;
    std::vector<hattn::bf16> k(row * opt.kv_len), v(k.size());
    for (std::size_t i = 0; i < k.size(); ++i) {
      k[i] = hattn::to_bf16(std::sin(0.001f * static_cast<float>(i)));
      v[i] = hattn::to_bf16(std::cos(0.002f * static_cast<float>(i)));
    }
    for (int b = 0; b < opt.batch; ++b) {
      std::int32_t id = 0;
      hattn::Status s = kv.add_sequence(&id);
      for (int l = 0; s && l < opt.layers; ++l)
        s = kv.append(l, id, k.data(), v.data(), opt.kv_len);
      if (!s) {
        std::fprintf(stderr, "error: KV cache: %s\n", s.message());
        return 1;
      }
    }
  }

  // 2. Streams, the CPU backend and its arena, the orchestrator.
  const std::int32_t mbs = std::min(opt.mb, opt.batch);
  const auto max_mb = rt::micro_batch_range(opt.batch, mbs, 0).size;
  rt::OrchestratorOptions oo;
  oo.num_layers = opt.layers;
  oo.num_micro_batches = mbs;
  oo.slot = {.max_batch = max_mb,
             .num_q_heads = mc.q_heads,
             .num_kv_heads = mc.kv_heads,
             .head_dim = mc.head_dim,
             .kv_dtype = hattn::DType::kBF16,
             .code_bytes_per_seq = 0};
  rt::DenseCpuAttention backend({.batch_size = max_mb,
                                 .num_q_heads = mc.q_heads,
                                 .num_kv_heads = mc.kv_heads,
                                 .head_dim = mc.head_dim,
                                 .kv_dtype = hattn::DType::kBF16,
                                 .q_dtype = hattn::DType::kF32,
                                 .o_dtype = hattn::DType::kF32,
                                 .sm_scale = std::nullopt});
  hattn::CpuExecutor executor(opt.threads);
  rt::HostStream compute, copy;
  rt::DecodeOrchestrator<rt::HostStream, rt::DenseCpuAttention> orch(oo, compute, copy, kv, backend,
                                                                     executor);

  // 3. Decode steps.
  std::vector<std::int32_t> seqs(static_cast<std::size_t>(opt.batch));
  for (int b = 0; b < opt.batch; ++b) seqs[static_cast<std::size_t>(b)] = b;
  const auto stages = model.stages<rt::HostStream*>();
  std::printf("%d layers, batch %d in %d micro-batches, KV %d tokens, hidden %d, ffn %d\n",
              opt.layers, opt.batch, mbs, opt.kv_len, opt.hidden, opt.ffn);
  for (int step = 0; step < opt.steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    const hattn::Status s = orch.step(seqs, model.io(), stages);
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (!s) {
      std::fprintf(stderr, "error: step %d: %s: %s\n", step,
                   std::string(hattn::to_string(s.code())).c_str(), s.message());
      return 1;
    }
    std::printf("step %d: %.2f ms\n", step, ms);
  }
  if (!model.x().allFinite()) {
    std::fprintf(stderr, "error: hidden state is not finite\n");
    return 1;
  }

  // 4. The timeline: busy time per track and the trace file.
  double busy[3] = {0, 0, 0};
  for (const rt::TimelineEntry& e : orch.timeline().entries())
    busy[static_cast<int>(rt::track_of(e.phase))] +=
        static_cast<double>(e.end_ns - e.begin_ns) * 1e-6;
  std::printf("busy over all steps: compute %.2f ms, copies %.2f ms, CPU attention %.2f ms\n",
              busy[0], busy[1], busy[2]);
  std::ofstream out(opt.trace);
  out << orch.timeline().to_chrome_trace();
  if (!out) {
    std::fprintf(stderr, "error: cannot write %s\n", opt.trace.c_str());
    return 1;
  }
  std::printf("trace: %s (%zu events; open in ui.perfetto.dev)\n", opt.trace.c_str(),
              orch.timeline().size());
  return 0;
}
