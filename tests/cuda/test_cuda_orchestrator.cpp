// The decode-step orchestrator on CUDA streams (runtime/cuda_stream.hpp): the
// same toy engine as tests/runtime, its stages enqueued as host functions on
// the compute stream (so they run in stream order, as kernels would), ring
// slots and micro-batch buffers in pinned mapped memory (the merge kernel
// reads and writes them in place), the compute stream waiting for the CPU
// partial with cuStreamWaitValue32. All-CPU steps must equal the sequential
// run bit for bit; with the device attending a share, the partials are merged
// by the GPU kernel (a different exp2 than the host's), so x is compared with
// the f32 output tolerance.

#include <catch2/catch.hpp>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "common/check.hpp"
#include "common/seed.hpp"
#include "hattn/cuda/buffer.hpp"
#include "hattn/runtime/cpu_attention.hpp"
#include "hattn/runtime/cuda_stream.hpp"
#include "hattn/runtime/orchestrator.hpp"
#include "runtime/timeline_check.hpp"
#include "runtime/toy_engine.hpp"

using hattn::Status;
using hattn::runtime::CudaStream;
using hattn::runtime::DecodeOrchestrator;
using hattn::runtime::DenseCpuAttention;
using hattn::runtime::MicroBatchIo;
using hattn::runtime::PartitionPolicy;
using hattn::runtime::StageContext;
using hattn_test::ToyConfig;
using hattn_test::ToyEngine;

namespace {

using Stages = hattn::runtime::EngineStages<cudaStream_t>;

// A toy stage as a host function in stream order (it must not call CUDA).
struct StageCall {
  ToyEngine* engine;
  StageContext ctx;
  Status (ToyEngine::*fn)(const StageContext&);
};

Stages stream_ordered(ToyEngine& e) {
  auto wrap = [&e](Status (ToyEngine::*fn)(const StageContext&)) {
    return [&e, fn](const StageContext& c, cudaStream_t s) -> Status {
      auto call = std::make_unique<StageCall>(StageCall{&e, c, fn});
      const cudaError_t err = cudaLaunchHostFunc(
          s,
          [](void* p) {
            std::unique_ptr<StageCall> k(static_cast<StageCall*>(p));
            (void)(k->engine->*(k->fn))(k->ctx);
          },
          call.get());
      if (err != cudaSuccess) return hattn::cuda::cuda_status(err);
      (void)call.release();
      return Status::ok();
    };
  };
  return {wrap(&ToyEngine::stage_a), wrap(&ToyEngine::device_attention), wrap(&ToyEngine::stage_b)};
}

// The engine's per-micro-batch buffers again, in pinned mapped memory.
struct PinnedIo {
  std::vector<hattn::cuda::PinnedBuffer> bufs;
  std::vector<MicroBatchIo> io;
  PinnedIo(const ToyConfig& c) {
    const auto B = static_cast<std::int32_t>(c.prefix_lens.size());
    const std::int32_t mbs = std::min(c.num_micro_batches, B);
    const std::size_t qd = static_cast<std::size_t>(c.q_heads) * c.head_dim;
    const std::size_t kd = static_cast<std::size_t>(c.kv_heads) * c.head_dim;
    auto get = [&](std::size_t bytes) {
      bufs.emplace_back();
      REQUIRE(bufs.back().allocate(bytes, cudaHostAllocMapped | cudaHostAllocPortable));
      REQUIRE(bufs.back().pinned());
      std::memset(bufs.back().data(), 0, bytes);
      return bufs.back().data();
    };
    bufs.reserve(static_cast<std::size_t>(mbs) * 9);
    for (std::int32_t m = 0; m < mbs; ++m) {
      const auto n = static_cast<std::size_t>(hattn::runtime::micro_batch_range(B, mbs, m).size);
      MicroBatchIo x;
      x.q = static_cast<float*>(get(n * qd * 4));
      x.k = get(n * kd * hattn::size_of(c.kv_dtype));
      x.v = get(n * kd * hattn::size_of(c.kv_dtype));
      x.attn_o = static_cast<float*>(get(n * qd * 4));
      x.attn_lse2 = static_cast<float*>(get(n * c.q_heads * 4));
      x.cpu_o = static_cast<float*>(get(n * qd * 4));
      x.cpu_lse2 = static_cast<float*>(get(n * c.q_heads * 4));
      x.device_o = static_cast<float*>(get(n * qd * 4));
      x.device_lse2 = static_cast<float*>(get(n * c.q_heads * 4));
      io.push_back(x);
    }
  }
};

}  // namespace

TEST_CASE("Orchestrated steps on CUDA streams equal the stages run in sequence",
          "[cuda][runtime]") {
  std::mt19937_64 rng = hattn_test::make_rng("cuda orchestrator");
  std::uniform_int_distribution<std::int64_t> len(1, 300);
  hattn::CpuExecutor executor(2);
  const std::pair<const char*, PartitionPolicy> policies[] = {
      {"all_cpu", PartitionPolicy::all_cpu()},
      {"device_tail", PartitionPolicy::device_tail(5, 1)},
      {"all_device", PartitionPolicy::all_device()}};
  int ci = 0;
  for (std::int32_t layers : {1, 4})
    for (std::int32_t mbs : {1, 2, 3})
      for (int b : {1, 5})
        for (const auto& [pname, policy] : policies) {
          ToyConfig cfg;
          cfg.num_layers = layers;
          cfg.num_micro_batches = mbs;
          for (int i = 0; i < b; ++i) cfg.prefix_lens.push_back(len(rng));
          cfg.kv_dtype = ci++ % 2 ? hattn::DType::kBF16 : hattn::DType::kF32;
          INFO("layers=" << layers << " mbs=" << mbs << " batch=" << b << " policy=" << pname << " "
                         << hattn_test::seed_note());
          const std::uint64_t seed = rng();
          ToyEngine orch_engine(cfg, seed), ref_engine(cfg, seed);
          auto orch_kv = orch_engine.make_host_cache();
          auto ref_kv = ref_engine.make_host_cache();
          const hattn::DecodeProblem maxp{.batch_size = b,
                                          .num_q_heads = cfg.q_heads,
                                          .num_kv_heads = cfg.kv_heads,
                                          .head_dim = cfg.head_dim,
                                          .kv_dtype = cfg.kv_dtype,
                                          .q_dtype = hattn::DType::kF32,
                                          .o_dtype = hattn::DType::kF32,
                                          .sm_scale = std::nullopt};
          DenseCpuAttention orch_backend(maxp), ref_backend(maxp);
          hattn::runtime::OrchestratorOptions opt;
          opt.num_layers = layers;
          opt.num_micro_batches = mbs;
          opt.slot = {.max_batch = (b + mbs - 1) / mbs,
                      .num_q_heads = cfg.q_heads,
                      .num_kv_heads = cfg.kv_heads,
                      .head_dim = cfg.head_dim,
                      .kv_dtype = cfg.kv_dtype,
                      .code_bytes_per_seq = 0};
          opt.step_timeout = std::chrono::seconds(60);
          PinnedIo pio(cfg);
          CudaStream compute, copy;
          DecodeOrchestrator<CudaStream, DenseCpuAttention> orch(
              opt, compute, copy, orch_kv, orch_backend, executor, policy,
              hattn::runtime::cuda_pinned_host_memory());
          const Stages st = stream_ordered(orch_engine);
          std::vector<std::int32_t> seqs(static_cast<std::size_t>(b));
          for (int i = 0; i < b; ++i) seqs[static_cast<std::size_t>(i)] = i;
          for (std::int32_t step = 0; step < 2; ++step) {
            const Status s = orch.step(seqs, pio.io, st);
            INFO("step " << step << ": " << s.message());
            REQUIRE(s);
            REQUIRE(hattn_test::run_sequential(ref_engine, ref_kv, ref_backend, executor, policy,
                                               layers, mbs, step));
            const auto& x = orch_engine.x();
            const auto& r = ref_engine.x();
            REQUIRE(x.size() == r.size());
            if (std::string(pname) == "all_cpu") {
              CHECK(std::memcmp(x.data(), r.data(), x.size() * sizeof(float)) == 0);
            } else {
              const hattn_test::Tolerance tol = hattn_test::output_tolerance(hattn::DType::kF32);
              std::size_t bad = 0;
              for (std::size_t i = 0; i < x.size(); ++i)
                bad += !(std::fabs(double(x[i]) - r[i]) <= tol.atol + tol.rtol * std::fabs(r[i]));
              CHECK(bad == 0);
            }
          }
          for (std::int32_t l = 0; l < layers; ++l)
            for (std::int32_t i = 0; i < b; ++i)
              CHECK(orch_kv.seq_len(l, i) == ref_kv.seq_len(l, i));
          // Stamps convert to the host clock per stream, within microseconds.
          hattn_test::check_timeline(orch.timeline().entries(), 2, layers, std::min(mbs, b),
                                     200'000);
        }
}
