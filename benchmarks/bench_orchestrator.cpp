// The decode-step orchestrator on host streams: how much of the compute and the
// CPU attention overlap. Compute stages are real Eigen GEMM stacks
// (examples/04_orchestrated_step/gemm_model.hpp) on the compute stream's
// thread, i.e. one core; CPU attention (cpu::DenseDecode) runs on a one-thread
// arena on the other. The MLP depth is calibrated once so that compute takes
// about as long as attention.
//
// Cases orchestrator/host/mb:<m>, m in {1, 2, 4}, and
// orchestrator/host/concurrent_bound (what the machine allows; see there).
// Counters, in ms per step:
//   step_ms             an orchestrated step (wall time)
//   compute_ms          the stages alone, run in sequence on one thread
//   attention_ms        the CPU attention alone (page tables + backend), one thread
// each the median over the iterations, measured in turn in every iteration.
//   overlap_efficiency  max(compute_ms, attention_ms) / step_ms: 1 is perfect
//                       overlap, 0.5 none when the two are equal.

#include <benchmark/benchmark.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "../examples/04_orchestrated_step/gemm_model.hpp"
#include "bench_orchestrator_common.hpp"
#include "hattn/cpu/executor.hpp"
#include "hattn/runtime/affinity.hpp"
#include "hattn/runtime/cpu_attention.hpp"
#include "hattn/runtime/host_kv_cache.hpp"
#include "hattn/runtime/host_stream.hpp"
#include "hattn/runtime/orchestrator.hpp"

#if defined(HATTN_BENCH_CUDA)
#include "bench_orchestrator_cuda.hpp"  // orchestrator/cuda/mb:<m>
#endif

namespace {

namespace rt = hattn::runtime;
using Ms = std::chrono::duration<double, std::milli>;

// The attention shape and its host KV cache: bench_orchestrator_common.hpp.
const bench_orch::Shape kShape{};  // bf16 KV, 8 layers, batch 16, 4096 tokens

hattn_examples::GemmModelConfig model_config(std::int32_t mbs, std::int32_t mlp_reps) {
  hattn_examples::GemmModelConfig c;
  c.num_layers = kShape.layers;
  c.batch = kShape.batch;
  c.num_micro_batches = mbs;
  c.q_heads = kShape.q_heads;
  c.kv_heads = kShape.kv_heads;
  c.head_dim = kShape.head_dim;
  // Small weights (~0.5 MB in all) stay in the compute core's L2 while the
  // attention streams the KV cache through memory: like an accelerator, the
  // compute does not compete for the host's memory bandwidth.
  c.hidden = 64;
  c.ffn = 256;
  c.mlp_reps = mlp_reps;
  c.shared_weights = true;
  return c;
}

// Where the pinned threads go: the CPU attention thread on
// HATTN_BENCH_ATTENTION_CPU (default 1), the compute stream on the other of
// CPUs 0 and 1. (On the 2-vCPU development guest, vCPU 1 streams memory
// ~30 % slower than vCPU 0 while computing as fast: the attention belongs
// on 0 there.)
int attention_cpu() {
  const char* e = std::getenv("HATTN_BENCH_ATTENTION_CPU");
  return e != nullptr && std::string(e) == "0" ? 0 : 1;
}
int compute_cpu() { return 1 - attention_cpu(); }

std::unique_ptr<rt::HostKvCache> make_cache() { return bench_orch::make_cache(kShape); }
std::vector<std::int32_t> all_seqs() { return kShape.seqs(); }
using bench_orch::median_ms;

// The stages of one step, in sequence on this thread.
double compute_alone_ms(hattn_examples::GemmModel& model, std::int32_t mbs, int reps = 5) {
  const auto seqs = all_seqs();
  return median_ms(reps, [&] {
    for (std::int32_t l = 0; l < kShape.layers; ++l)
      for (std::int32_t m = 0; m < mbs; ++m) {
        const auto r = rt::micro_batch_range(kShape.batch, mbs, m);
        rt::StageContext c;
        c.layer = l;
        c.micro_batch = m;
        c.first_seq = r.begin;
        c.seqs = {seqs.data() + r.begin, static_cast<std::size_t>(r.size)};
        c.io = &model.io()[static_cast<std::size_t>(m)];
        (void)model.stage_a(c);
        (void)model.stage_b(c);
      }
  });
}

// The CPU attention of one step (every layer and micro-batch), alone.
double attention_alone_ms(rt::HostKvCache& kv, std::int32_t mbs, const hattn::CpuExecutor& ex,
                          int reps = 5) {
  return bench_orch::attention_alone_ms(kShape, kv, mbs, ex, reps);
}

// MLP depth at which compute ~ attention (mb:2 split), found once.
std::int32_t calibrated_mlp_reps() {
  static const std::int32_t reps = [] {
    auto kv = make_cache();
    hattn::CpuExecutor ex(1);
    const double att = kv ? attention_alone_ms(*kv, 2, ex) : 1.0;
    hattn_examples::GemmModel m1(model_config(2, 1), 1), m3(model_config(2, 3), 1);
    const double c1 = compute_alone_ms(m1, 2), c3 = compute_alone_ms(m3, 2);
    const double per_rep = std::max((c3 - c1) / 2.0, 1e-3), base = c1 - per_rep;
    return static_cast<std::int32_t>(std::clamp(std::lround((att - base) / per_rep), 1L, 64L));
  }();
  return reps;
}

void BM_orchestrator_host(benchmark::State& state, std::int32_t mbs) {
  const std::int32_t reps = calibrated_mlp_reps();
  auto kv = make_cache();
  if (!kv) {
    state.SkipWithError("cannot build the KV cache");
    return;
  }
  hattn_examples::GemmModel model(model_config(mbs, reps), 7);
  hattn::CpuExecutor executor(1);  // attention on one core, compute on the other
  const auto max_mb = rt::micro_batch_range(kShape.batch, mbs, 0).size;
  rt::OrchestratorOptions oo;
  oo.num_layers = kShape.layers;
  oo.num_micro_batches = mbs;
  oo.slot = kShape.slot(max_mb);
  // HATTN_BENCH_TRACE_DIR=<dir>: record the timeline and write it there.
  oo.record_timeline = std::getenv("HATTN_BENCH_TRACE_DIR") != nullptr;
  // Thread placement (HATTN_BENCH_PIN=0 turns it off): the compute stream's
  // worker on CPU 0, the CPU attention thread (which runs the one-thread
  // arena's work itself) on CPU 1, so a woken thread is never queued behind
  // its waker on one core while the other idles.
  const char* pin_env = std::getenv("HATTN_BENCH_PIN");
  const bool pin = std::thread::hardware_concurrency() >= 2 &&
                   !(pin_env != nullptr && std::string(pin_env) == "0");
  if (pin) oo.cpu_thread_init = [] { (void)rt::pin_this_thread(attention_cpu()); };
  rt::DenseCpuAttention backend(kShape.problem(max_mb));
  rt::HostStream compute(
      pin ? std::function<void()>([] { (void)rt::pin_this_thread(compute_cpu()); })
          : std::function<void()>()),
      copy;
  rt::DecodeOrchestrator<rt::HostStream, rt::DenseCpuAttention> orch(oo, compute, copy, *kv,
                                                                     backend, executor);
  const auto seqs = all_seqs();
  const auto stages = model.stages<rt::HostStream*>();
  if (!orch.step(seqs, model.io(), stages)) {  // warm-up
    state.SkipWithError("warm-up step failed");
    return;
  }
  // Each iteration times an orchestrated step, then the stages alone and the
  // attention alone, so the three see the same machine (it is shared and
  // noisy); the counters are medians over the iterations.
  std::vector<double> step_ms, compute_ms, attention_ms;
  for (auto _ : state) {
    if (kv->seq_len(0, 0) >= kShape.kv_len + kShape.spare - 1) {
      state.SkipWithError("out of spare KV pages: raise Shape::spare");
      break;
    }
    const auto t0 = std::chrono::steady_clock::now();
    const hattn::Status s = orch.step(seqs, model.io(), stages);
    step_ms.push_back(Ms(std::chrono::steady_clock::now() - t0).count());
    if (!s) {
      state.SkipWithError(s.message());
      break;
    }
    // Each alone on the CPU it has in the step (the two vCPUs of the
    // development guest differ).
    if (pin) (void)rt::pin_this_thread(compute_cpu());
    compute_ms.push_back(compute_alone_ms(model, mbs, 1));
    if (pin) (void)rt::pin_this_thread(attention_cpu());
    attention_ms.push_back(attention_alone_ms(*kv, mbs, executor, 1));
  }
  if (step_ms.empty()) return;
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const double step_med = median(step_ms), compute_med = median(compute_ms),
               attention_med = median(attention_ms);
  state.counters["step_ms"] = step_med;
  state.counters["compute_ms"] = compute_med;
  state.counters["attention_ms"] = attention_med;
  state.counters["overlap_efficiency"] = std::max(compute_med, attention_med) / step_med;
  if (const char* dir = std::getenv("HATTN_BENCH_TRACE_DIR")) {
    std::ofstream(std::string(dir) + "/orchestrator_host_mb" + std::to_string(mbs) + ".json")
        << orch.timeline().to_chrome_trace();
  }
  state.counters["mlp_reps"] = reps;
  state.counters["pinned"] = pin ? 1 : 0;
  state.counters["attention_cpu"] = pin ? attention_cpu() : -1;
}

// What the machine allows, with no orchestrator: the stages (mb:2 split) on
// CPU 0 and the CPU attention on CPU 1 at the same time, each in its own loop
// started together, against each alone. If running side by side slows them,
// no schedule can reach overlap 1: overlap_bound = max(compute_ms,
// attention_ms) / max(compute_concurrent_ms, attention_concurrent_ms) is the
// ceiling an orchestrated mb:2 step can reach here (with perfect pipelining
// and no fill/drain).
void BM_concurrent_bound(benchmark::State& state) {
  const std::int32_t reps = calibrated_mlp_reps();
  auto kv = make_cache();
  if (!kv || std::thread::hardware_concurrency() < 2) {
    state.SkipWithError("needs the KV cache and 2 CPUs");
    return;
  }
  hattn_examples::GemmModel model(model_config(2, reps), 7);
  hattn::CpuExecutor executor(1);
  std::vector<double> c_alone, a_alone, c_conc, a_conc;
  for (auto _ : state) {
    (void)rt::pin_this_thread(compute_cpu());
    c_alone.push_back(compute_alone_ms(model, 2, 1));
    (void)rt::pin_this_thread(attention_cpu());
    a_alone.push_back(attention_alone_ms(*kv, 2, executor, 1));
    std::atomic<int> ready{0};
    double c = 0.0, a = 0.0;
    const auto start = [&ready] {
      ready.fetch_add(1);
      while (ready.load() < 2) {
      }
    };
    std::thread tc([&] {
      (void)rt::pin_this_thread(compute_cpu());
      start();
      c = compute_alone_ms(model, 2, 1);
    });
    std::thread ta([&] {
      (void)rt::pin_this_thread(attention_cpu());
      start();
      a = attention_alone_ms(*kv, 2, executor, 1);
    });
    tc.join();
    ta.join();
    c_conc.push_back(c);
    a_conc.push_back(a);
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const double ca = median(c_alone), aa = median(a_alone), cc = median(c_conc), ac = median(a_conc);
  state.counters["compute_ms"] = ca;
  state.counters["attention_ms"] = aa;
  state.counters["compute_concurrent_ms"] = cc;
  state.counters["attention_concurrent_ms"] = ac;
  state.counters["overlap_bound"] = std::max(ca, aa) / std::max(cc, ac);
  state.counters["mlp_reps"] = reps;
}

const bool registered = [] {
  benchmark::RegisterBenchmark("orchestrator/host/concurrent_bound", BM_concurrent_bound)
      ->Unit(benchmark::kMillisecond);
  for (std::int32_t m : {1, 2, 4})
    benchmark::RegisterBenchmark(("orchestrator/host/mb:" + std::to_string(m)).c_str(),
                                 BM_orchestrator_host, m)
        ->Unit(benchmark::kMillisecond);
  return true;
}();

}  // namespace

BENCHMARK_MAIN();
