#pragma once
// orchestrator/cuda/mb:<m>: the orchestrator on CUDA streams, compute stages
// as cuBLAS SGEMMs on the compute stream, CPU attention (cpu::DenseDecode,
// f32 KV: the stages write k, v with SGEMM, no conversion kernel) on the
// host's cores. Included by bench_orchestrator.cpp when HATTN_BENCH_CUDA.
// Without a device the cases skip with an error message.
//
// Stage A: q = x Wq, k = x Wk, v = x Wv (no norm or RoPE: they would need a
// kernel of their own and cost little next to the GEMMs). Stage B:
// x += attn_o Wo, then mlp_reps x (h = x W1; x += h W2), linear (no
// activation kernel). Weights shared across layers. mlp_reps is calibrated
// so that compute ~ attention at mb:2. Counters as for the host cases; the
// "alone" times synchronize the stream around the stages.
//
// Each stage is launched as a CUDA graph captured once per micro-batch (what
// serving engines do for decode: otherwise a stack of small GEMMs runs at the
// speed the host can launch them, ~15 us each on the H100 machine, and the
// issuing thread, not the GPU, is the compute). HATTN_BENCH_CUDA_GRAPHS=0
// launches the cuBLAS calls one by one instead. HATTN_BENCH_TRACE_DIR=<dir>
// records the timeline (stamps are CUDA events) and writes
// <dir>/orchestrator_cuda_mb<m>.json.

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "hattn/cpu/executor.hpp"
#include "hattn/cuda/buffer.hpp"
#include "hattn/runtime/cpu_attention.hpp"
#include "hattn/runtime/cuda_stream.hpp"
#include "hattn/runtime/host_kv_cache.hpp"
#include "hattn/runtime/orchestrator.hpp"

#include "bench_orchestrator_common.hpp"

namespace bench_cuda {

namespace rt = hattn::runtime;

constexpr std::int32_t kLayers = 8, kBatch = 16, kKvLen = 4096, kSpare = 1024;
constexpr std::int32_t kHq = 8, kHkv = 2, kD = 64, kHidden = 512, kFfn = 2048;
constexpr std::int32_t kQd = kHq * kD, kKd = kHkv * kD;

bool use_graphs() {
  const char* e = std::getenv("HATTN_BENCH_CUDA_GRAPHS");
  return e == nullptr || std::string(e) != "0";
}

// The attention shape and its host KV cache (f32: the stages write k and v
// with SGEMM, no conversion kernel): bench_orchestrator_common.hpp.
const bench_orch::Shape kShape{kLayers, kBatch, kKvLen, kSpare, kHq, kHkv, kD, hattn::DType::kF32};

// Device buffers and cuBLAS SGEMM stages. Row-major [rows][cols] matrices:
// C = A B is computed as C^T = B^T A^T in cuBLAS's column-major terms.
class CublasModel {
 public:
  CublasModel(std::int32_t mbs, std::int32_t mlp_reps) : mbs_(mbs), reps_(mlp_reps) {}

  hattn::Status init(cudaStream_t stream) {
    if (cublasCreate(&handle_) != CUBLAS_STATUS_SUCCESS)
      return {hattn::StatusCode::kCudaError, "cublasCreate failed"};
    std::mt19937_64 rng(7);
    std::normal_distribution<float> n01(0.0f, 1.0f);
    auto upload = [&](hattn::cuda::DeviceBuffer& d, std::size_t n, float scale) -> hattn::Status {
      std::vector<float> h(n);
      for (float& x : h) x = n01(rng) * scale;
      HATTN_RETURN_IF_ERROR(d.allocate(n * sizeof(float)));
      return hattn::cuda::cuda_status(
          cudaMemcpy(d.data(), h.data(), n * sizeof(float), cudaMemcpyHostToDevice));
    };
    const float si = 1.0f / std::sqrt(float(kHidden));
    HATTN_RETURN_IF_ERROR(upload(wq_, std::size_t{kHidden} * kQd, si));
    HATTN_RETURN_IF_ERROR(upload(wk_, std::size_t{kHidden} * kKd, si));
    HATTN_RETURN_IF_ERROR(upload(wv_, std::size_t{kHidden} * kKd, si));
    HATTN_RETURN_IF_ERROR(upload(wo_, std::size_t{kQd} * kHidden, 0.1f / std::sqrt(float(kQd))));
    HATTN_RETURN_IF_ERROR(upload(w1_, std::size_t{kHidden} * kFfn, 0.01f * si));
    HATTN_RETURN_IF_ERROR(upload(w2_, std::size_t{kFfn} * kHidden, 0.01f / std::sqrt(float(kFfn))));
    bufs_.resize(static_cast<std::size_t>(mbs_));
    io_.resize(static_cast<std::size_t>(mbs_));
    for (std::int32_t m = 0; m < mbs_; ++m) {
      const auto n = static_cast<std::size_t>(rt::micro_batch_range(kBatch, mbs_, m).size);
      Bufs& b = bufs_[static_cast<std::size_t>(m)];
      HATTN_RETURN_IF_ERROR(upload(b.x, n * kHidden, 1.0f));
      HATTN_RETURN_IF_ERROR(b.h.allocate(n * kFfn * sizeof(float)));
      HATTN_RETURN_IF_ERROR(b.q.allocate(n * kQd * sizeof(float)));
      HATTN_RETURN_IF_ERROR(b.k.allocate(n * kKd * sizeof(float)));
      HATTN_RETURN_IF_ERROR(b.v.allocate(n * kKd * sizeof(float)));
      HATTN_RETURN_IF_ERROR(b.o.allocate(n * kQd * sizeof(float)));
      HATTN_RETURN_IF_ERROR(b.lse.allocate(n * kHq * sizeof(float)));
      io_[static_cast<std::size_t>(m)] = {b.q.as<float>(), b.k.data(),      b.v.data(),
                                          nullptr,         b.o.as<float>(), b.lse.as<float>()};
    }
    (void)stream;
    return hattn::Status::ok();
  }
  ~CublasModel() {
    for (cudaGraphExec_t g : graphs_)
      if (g != nullptr) (void)cudaGraphExecDestroy(g);
    if (handle_ != nullptr) (void)cublasDestroy(handle_);
  }

  // Captures stage A and stage B of every micro-batch as graphs on `s` (a
  // non-default stream); run_a/run_b then launch those.
  hattn::Status capture(cudaStream_t s) {
    // cuBLAS must not allocate its workspace inside a capture.
    HATTN_RETURN_IF_ERROR(workspace_.allocate(std::size_t{32} << 20));
    if (cublasSetWorkspace(handle_, workspace_.data(), workspace_.size()) != CUBLAS_STATUS_SUCCESS)
      return {hattn::StatusCode::kCudaError, "cublasSetWorkspace failed"};
    graphs_.assign(static_cast<std::size_t>(2 * mbs_), nullptr);
    for (std::int32_t m = 0; m < mbs_; ++m)
      for (int b = 0; b < 2; ++b) {
        HATTN_RETURN_IF_ERROR(
            hattn::cuda::cuda_status(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal)));
        const hattn::Status st = b == 0 ? stage_a(m, s) : stage_b(m, s);
        cudaGraph_t g = nullptr;
        const cudaError_t e = cudaStreamEndCapture(s, &g);
        cudaError_t ie = cudaSuccess;
        if (st && e == cudaSuccess)
          ie = cudaGraphInstantiate(&graphs_[static_cast<std::size_t>(2 * m + b)], g, 0);
        if (g != nullptr) (void)cudaGraphDestroy(g);
        HATTN_RETURN_IF_ERROR(st);
        HATTN_RETURN_IF_ERROR(hattn::cuda::cuda_status(e));
        HATTN_RETURN_IF_ERROR(hattn::cuda::cuda_status(ie));
      }
    return hattn::Status::ok();
  }
  hattn::Status run_a(std::int32_t m, cudaStream_t s) {
    if (graphs_.empty()) return stage_a(m, s);
    return hattn::cuda::cuda_status(cudaGraphLaunch(graphs_[static_cast<std::size_t>(2 * m)], s));
  }
  hattn::Status run_b(std::int32_t m, cudaStream_t s) {
    if (graphs_.empty()) return stage_b(m, s);
    return hattn::cuda::cuda_status(
        cudaGraphLaunch(graphs_[static_cast<std::size_t>(2 * m + 1)], s));
  }
  CublasModel(const CublasModel&) = delete;
  CublasModel& operator=(const CublasModel&) = delete;

  const std::vector<rt::MicroBatchIo>& io() const { return io_; }

  hattn::Status stage_a(std::int32_t m, cudaStream_t s) {
    const Bufs& b = bufs_[static_cast<std::size_t>(m)];
    const auto n = rt::micro_batch_range(kBatch, mbs_, m).size;
    HATTN_RETURN_IF_ERROR(
        gemm(s, b.x.as<float>(), wq_.as<float>(), b.q.as<float>(), n, kHidden, kQd, 0.0f));
    HATTN_RETURN_IF_ERROR(
        gemm(s, b.x.as<float>(), wk_.as<float>(), b.k.as<float>(), n, kHidden, kKd, 0.0f));
    return gemm(s, b.x.as<float>(), wv_.as<float>(), b.v.as<float>(), n, kHidden, kKd, 0.0f);
  }
  hattn::Status stage_b(std::int32_t m, cudaStream_t s) {
    const Bufs& b = bufs_[static_cast<std::size_t>(m)];
    const auto n = rt::micro_batch_range(kBatch, mbs_, m).size;
    HATTN_RETURN_IF_ERROR(
        gemm(s, b.o.as<float>(), wo_.as<float>(), b.x.as<float>(), n, kQd, kHidden, 1.0f));
    for (std::int32_t r = 0; r < reps_; ++r) {
      HATTN_RETURN_IF_ERROR(
          gemm(s, b.x.as<float>(), w1_.as<float>(), b.h.as<float>(), n, kHidden, kFfn, 0.0f));
      HATTN_RETURN_IF_ERROR(
          gemm(s, b.h.as<float>(), w2_.as<float>(), b.x.as<float>(), n, kFfn, kHidden, 1.0f));
    }
    return hattn::Status::ok();
  }

  rt::EngineStages<cudaStream_t> stages() {
    return {[this](const rt::StageContext& c, cudaStream_t s) { return run_a(c.micro_batch, s); },
            nullptr,
            [this](const rt::StageContext& c, cudaStream_t s) { return run_b(c.micro_batch, s); }};
  }

 private:
  struct Bufs {
    hattn::cuda::DeviceBuffer x, h, q, k, v, o, lse;
  };
  // C[n][cols] = A[n][inner] B[inner][cols] + beta C, row-major.
  hattn::Status gemm(cudaStream_t s, const float* a, const float* b, float* c, std::int32_t n,
                     std::int32_t inner, std::int32_t cols, float beta) {
    const float alpha = 1.0f;
    if (cublasSetStream(handle_, s) != CUBLAS_STATUS_SUCCESS ||
        cublasSgemm(handle_, CUBLAS_OP_N, CUBLAS_OP_N, cols, n, inner, &alpha, b, cols, a, inner,
                    &beta, c, cols) != CUBLAS_STATUS_SUCCESS)
      return {hattn::StatusCode::kCudaError, "cublasSgemm failed"};
    return hattn::Status::ok();
  }

  std::int32_t mbs_, reps_;
  cublasHandle_t handle_ = nullptr;
  hattn::cuda::DeviceBuffer wq_, wk_, wv_, wo_, w1_, w2_, workspace_;
  std::vector<cudaGraphExec_t> graphs_;  // [m][A, B] when captured
  std::vector<Bufs> bufs_;
  std::vector<rt::MicroBatchIo> io_;
};

using bench_orch::time_ms;

double compute_alone_ms(CublasModel& model, std::int32_t mbs, cudaStream_t s) {
  return time_ms([&] {
    for (std::int32_t l = 0; l < kLayers; ++l)
      for (std::int32_t m = 0; m < mbs; ++m) {
        (void)model.run_a(m, s);
        (void)model.run_b(m, s);
      }
    (void)cudaStreamSynchronize(s);
  });
}

bool have_device() {
  int n = 0;
  const bool ok = cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
  (void)cudaGetLastError();
  return ok;
}

// Attention threads: all cores but the one the issuing thread and the CUDA
// callback thread share.
// HATTN_BENCH_ATTENTION_THREADS=<n> overrides.
int attention_threads() {
  if (const char* e = std::getenv("HATTN_BENCH_ATTENTION_THREADS");
      e != nullptr && std::atoi(e) > 0)
    return std::atoi(e);
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()) - 1);
}

std::int32_t calibrated_mlp_reps(rt::CudaStream& s) {
  static const std::int32_t reps = [&] {
    auto kv = bench_orch::make_cache(kShape);
    hattn::CpuExecutor ex(attention_threads());
    const double att = kv ? bench_orch::attention_alone_ms(kShape, *kv, 2, ex, 1) : 1.0;
    CublasModel m1(2, 1), m9(2, 9);
    if (!m1.init(s.handle()) || !m9.init(s.handle())) return 1;
    if (use_graphs() && (!m1.capture(s.handle()) || !m9.capture(s.handle()))) return 1;
    (void)compute_alone_ms(m1, 2, s.handle());  // warm-up (cuBLAS heuristics, clocks)
    (void)compute_alone_ms(m9, 2, s.handle());
    const double c1 = compute_alone_ms(m1, 2, s.handle()), c9 = compute_alone_ms(m9, 2, s.handle());
    const double per_rep = std::max((c9 - c1) / 8.0, 1e-4), base = c1 - per_rep;
    return static_cast<std::int32_t>(std::clamp(std::lround((att - base) / per_rep), 1L, 4096L));
  }();
  return reps;
}

inline void BM_orchestrator_cuda(benchmark::State& state, std::int32_t mbs) {
  if (!have_device()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  std::unique_ptr<rt::CudaStream> compute, copy;
  try {
    compute = std::make_unique<rt::CudaStream>();
    copy = std::make_unique<rt::CudaStream>();
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
    return;
  }
  const std::int32_t reps = calibrated_mlp_reps(*compute);
  auto kv = bench_orch::make_cache(kShape);
  CublasModel model(mbs, reps);
  if (!kv || !model.init(compute->handle()) ||
      (use_graphs() && !model.capture(compute->handle()))) {
    state.SkipWithError("cannot set up the KV cache or the model");
    return;
  }
  hattn::CpuExecutor executor(attention_threads());
  const auto max_mb = rt::micro_batch_range(kBatch, mbs, 0).size;
  rt::OrchestratorOptions oo;
  oo.num_layers = kLayers;
  oo.num_micro_batches = mbs;
  oo.slot = kShape.slot(max_mb);
  const char* trace_dir = std::getenv("HATTN_BENCH_TRACE_DIR");
  oo.record_timeline = trace_dir != nullptr;
  rt::DenseCpuAttention backend(kShape.problem(max_mb));
  rt::DecodeOrchestrator<rt::CudaStream, rt::DenseCpuAttention> orch(
      oo, *compute, *copy, *kv, backend, executor, rt::PartitionPolicy::all_cpu(),
      rt::cuda_pinned_host_memory());
  const std::vector<std::int32_t> seqs = kShape.seqs();
  const auto stages = model.stages();
  if (const hattn::Status s = orch.step(seqs, model.io(), stages); !s) {
    state.SkipWithError(s.message());
    return;
  }
  std::vector<double> step_ms, compute_ms, attention_ms;
  for (auto _ : state) {
    if (kv->seq_len(0, 0) >= kKvLen + kSpare - 1) {
      state.SkipWithError("out of spare KV pages");
      break;
    }
    hattn::Status s = hattn::Status::ok();
    step_ms.push_back(time_ms([&] { s = orch.step(seqs, model.io(), stages); }));
    if (!s) {
      state.SkipWithError(s.message());
      break;
    }
    compute_ms.push_back(compute_alone_ms(model, mbs, compute->handle()));
    attention_ms.push_back(bench_orch::attention_alone_ms(kShape, *kv, mbs, executor, 1));
  }
  if (step_ms.empty()) return;
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const double st = median(step_ms), c = median(compute_ms), a = median(attention_ms);
  state.counters["step_ms"] = st;
  state.counters["compute_ms"] = c;
  state.counters["attention_ms"] = a;
  state.counters["overlap_efficiency"] = std::max(c, a) / st;
  state.counters["mlp_reps"] = reps;
  state.counters["attention_threads"] = attention_threads();
  state.counters["graphs"] = use_graphs() ? 1 : 0;
  if (trace_dir != nullptr)
    std::ofstream(std::string(trace_dir) + "/orchestrator_cuda_mb" + std::to_string(mbs) + ".json")
        << orch.timeline().to_chrome_trace();
}

inline const bool registered = [] {
  for (std::int32_t m : {1, 2, 4})
    benchmark::RegisterBenchmark(("orchestrator/cuda/mb:" + std::to_string(m)).c_str(),
                                 BM_orchestrator_cuda, m)
        ->Unit(benchmark::kMillisecond);
  return true;
}();

}  // namespace bench_cuda
