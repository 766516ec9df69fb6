#include "hattn/model/cuda_orchestrated_runner.hpp"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "hattn/cuda/buffer.hpp"
#include "hattn/runtime/cuda_stream.hpp"
#include "model/orchestrated_pipeline.hpp"

namespace hattn::model {
namespace {

namespace rt = runtime;
using Stage = CudaStageTimer::Stage;

// CudaLlamaModel on CUDA streams. Device buffers are one [B][...] array each;
// micro-batch m uses rows [begin, begin + size). Tokens and positions go up
// once per step, the logits come down once.
struct CudaEngine {
  using Stream = rt::CudaStream;

  explicit CudaEngine(const CudaLlamaModel& m) : model(m) {}

  rt::HostMemoryResource slot_memory() const { return rt::cuda_pinned_host_memory(); }

  Status allocate(std::int32_t b, std::int32_t mbs, DType kv_dtype,
                  std::vector<rt::MicroBatchIo>* io) {
    const LlamaConfig& c = model.config();
    batch = b;
    dtype = kv_dtype;
    const auto B = static_cast<std::size_t>(batch);
    const std::size_t es = size_of(dtype);
    HATTN_RETURN_IF_ERROR(x.allocate(sizeof(float) * B * c.hidden_size));
    HATTN_RETURN_IF_ERROR(q.allocate(sizeof(float) * B * c.q_dim()));
    HATTN_RETURN_IF_ERROR(k.allocate(es * B * c.kv_dim()));
    HATTN_RETURN_IF_ERROR(v.allocate(es * B * c.kv_dim()));
    HATTN_RETURN_IF_ERROR(attn_o.allocate(sizeof(float) * B * c.q_dim()));
    HATTN_RETURN_IF_ERROR(lse2.allocate(sizeof(float) * B * c.num_q_heads));
    HATTN_RETURN_IF_ERROR(tokens.allocate(sizeof(std::int32_t) * B));
    HATTN_RETURN_IF_ERROR(positions.allocate(sizeof(std::int64_t) * B));
    HATTN_RETURN_IF_ERROR(logits.allocate(sizeof(float) * B * c.vocab_size));
    HATTN_RETURN_IF_ERROR(host_inputs.allocate((sizeof(std::int32_t) + sizeof(std::int64_t)) * B));
    HATTN_RETURN_IF_ERROR(host_logits.allocate(sizeof(float) * B * c.vocab_size));
    HATTN_RETURN_IF_ERROR(scratch.reserve(model, batch));  // logits take all B rows
    // Marks per step: about a dozen per (layer, micro-batch), and a few more.
    HATTN_RETURN_IF_ERROR(timer.reserve(static_cast<std::size_t>(c.num_layers) * mbs * 16 + 16));
    io->resize(static_cast<std::size_t>(mbs));
    for (std::int32_t m = 0; m < mbs; ++m) {
      const std::int64_t b0 = rt::micro_batch_range(batch, mbs, m).begin;
      rt::MicroBatchIo& mb = (*io)[static_cast<std::size_t>(m)];
      mb.q = f32(q) + b0 * c.q_dim();
      mb.k = bytes(k) + static_cast<std::size_t>(b0 * c.kv_dim()) * es;
      mb.v = bytes(v) + static_cast<std::size_t>(b0 * c.kv_dim()) * es;
      mb.attn_o = f32(attn_o) + b0 * c.q_dim();
      mb.attn_lse2 = f32(lse2) + b0 * c.num_q_heads;
    }
    return Status::ok();
  }

  Status begin_step(std::span<const std::int32_t> ids, std::span<const std::int64_t> pos) {
    // The calling thread may have another device current.
    HATTN_RETURN_IF_ERROR(cuda::cuda_status(cudaSetDevice(model.device())));
    const cudaStream_t s = compute.handle();
    auto* h_tokens = static_cast<std::int32_t*>(host_inputs.data());
    auto* h_positions = reinterpret_cast<std::int64_t*>(h_tokens + batch);
    // The previous step's uploads are done: finish_step synchronized.
    std::copy(ids.begin(), ids.end(), h_tokens);
    std::copy(pos.begin(), pos.end(), h_positions);
    HATTN_RETURN_IF_ERROR(timer.start(s));
    HATTN_RETURN_IF_ERROR(cuda::cuda_status(cudaMemcpyAsync(
        tokens.data(), h_tokens, sizeof(std::int32_t) * ids.size(), cudaMemcpyHostToDevice, s)));
    HATTN_RETURN_IF_ERROR(cuda::cuda_status(cudaMemcpyAsync(positions.data(), h_positions,
                                                            sizeof(std::int64_t) * pos.size(),
                                                            cudaMemcpyHostToDevice, s)));
    timer.mark(s, Stage::kCopies);
    return model.embed(static_cast<const std::int32_t*>(tokens.data()), batch, f32(x), s, &timer);
  }

  // Called by the orchestrator on the issuing thread (a CUDA stream's
  // enqueue runs the callable at once): they only enqueue.
  Status stage_a(const rt::StageContext& ctx) {
    const LlamaConfig& c = model.config();
    const cudaStream_t s = compute.handle();
    const std::int64_t b0 = ctx.first_seq, n = static_cast<std::int64_t>(ctx.seqs.size());
    const std::size_t es = size_of(dtype);
    timer.mark(s, Stage::kAttention);  // the stream's wait for the previous answer
    return model.stage_a(
        ctx.layer, f32(x) + b0 * c.hidden_size, n,
        static_cast<const std::int64_t*>(positions.data()) + b0, f32(q) + b0 * c.q_dim(),
        bytes(k) + static_cast<std::size_t>(b0 * c.kv_dim()) * es,
        bytes(v) + static_cast<std::size_t>(b0 * c.kv_dim()) * es, dtype, scratch, s, &timer);
  }
  Status stage_b(const rt::StageContext& ctx) {
    const LlamaConfig& c = model.config();
    const cudaStream_t s = compute.handle();
    const std::int64_t b0 = ctx.first_seq, n = static_cast<std::int64_t>(ctx.seqs.size());
    timer.mark(s, Stage::kAttention);  // waiting for the CPU's partial, and its copy
    return model.stage_b(ctx.layer, f32(attn_o) + b0 * c.q_dim(), n, f32(x) + b0 * c.hidden_size,
                         scratch, s, &timer);
  }

  // The step's KV appends are kept by now: after the logits are computed,
  // only a failure to get them back is an error (the timer's is not).
  Status finish_step(float* host) {
    const LlamaConfig& c = model.config();
    const cudaStream_t s = compute.handle();
    timer.mark(s, Stage::kAttention);
    HATTN_RETURN_IF_ERROR(model.logits(f32(x), batch, f32(logits), scratch, s, &timer));
    const std::size_t n = sizeof(float) * static_cast<std::size_t>(batch) * c.vocab_size;
    HATTN_RETURN_IF_ERROR(cuda::cuda_status(
        cudaMemcpyAsync(host_logits.data(), logits.data(), n, cudaMemcpyDeviceToHost, s)));
    timer.mark(s, Stage::kCopies);
    HATTN_RETURN_IF_ERROR(cuda::cuda_status(cudaStreamSynchronize(s)));
    std::memcpy(host, host_logits.data(), n);
    StageTimes t;
    if (timer.collect(&t)) {
      // The attention marks are the stream's waits; the CPU thread's time is
      // counted from the orchestrator's timeline instead.
      times.gemm_s += t.gemm_s;
      times.other_s += t.other_s;
      times.copies_s += t.copies_s;
    }
    // Token ids were checked on the host before the step; this only catches
    // what that missed.
    return model.device_errors(s);
  }
  StageTimes engine_times() const noexcept { return times; }

  static float* f32(const cuda::DeviceBuffer& b) noexcept { return static_cast<float*>(b.data()); }
  static std::byte* bytes(const cuda::DeviceBuffer& b) noexcept {
    return static_cast<std::byte*>(b.data());
  }

  const CudaLlamaModel& model;
  std::int32_t batch = 0;
  DType dtype = DType::kBF16;
  cuda::DeviceBuffer x, q, k, v, attn_o, lse2, tokens, positions, logits;
  cuda::PinnedBuffer host_inputs, host_logits;
  CudaStageScratch scratch;
  CudaStageTimer timer;
  StageTimes times;
  Stream compute;
  Stream copy;
};

}  // namespace

Status create_cuda_orchestrated_runner(const CudaLlamaModel& model, DenseKvAttention& prefilled,
                                       const OrchestratedRunnerOptions& options,
                                       const CpuExecutor& attention,
                                       std::unique_ptr<OrchestratedRunner>* out,
                                       std::string* detail) {
  if (out == nullptr) return {StatusCode::kInvalidArgument, "OrchestratedRunner: out is null"};
  if (!model.created())
    return {StatusCode::kInvalidArgument, "create_cuda_orchestrated_runner: model not created"};
  HATTN_RETURN_IF_ERROR(cuda::cuda_status(cudaSetDevice(model.device())));
  std::unique_ptr<OrchestratedRunner::Impl> impl;
  HATTN_RETURN_IF_ERROR(detail::make_pipeline<CudaEngine>(
      model.config(), prefilled, options, attention, [&] { return CudaEngine(model); }, &impl,
      detail));
  *out = OrchestratedRunner::from_impl(std::move(impl));
  return Status::ok();
}

}  // namespace hattn::model
