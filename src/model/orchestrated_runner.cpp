#include "hattn/model/orchestrated_runner.hpp"

#include <algorithm>
#include <chrono>
#include <functional>
#include <new>
#include <utility>

#include "hattn/core/dtype.hpp"
#include "hattn/runtime/host_stream.hpp"
#include "model/orchestrated_pipeline.hpp"

namespace hattn::model {
namespace {

namespace rt = runtime;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// LlamaModel on host streams: the compute stream's thread runs the stages
// (their GEMMs on the compute executor), the copy stream is a memcpy thread.
// Buffers are one [B][...] array each; micro-batch m uses rows
// [begin, begin + size).
struct HostEngine {
  using Stream = rt::HostStream;

  HostEngine(const LlamaModel& m, const CpuExecutor& executor, bool pin)
      : model(m),
        compute_ex(executor),
        compute(pin ? std::function<void()>([] { (void)rt::pin_this_thread(0); })
                    : std::function<void()>()) {}

  rt::HostMemoryResource slot_memory() const { return rt::page_aligned_host_memory(); }

  Status allocate(std::int32_t batch, std::int32_t mbs, DType kv_dtype,
                  std::vector<rt::MicroBatchIo>* io) {
    const LlamaConfig& c = model.config();
    const auto B = static_cast<std::size_t>(batch);
    dtype = kv_dtype;
    const std::size_t es = size_of(dtype);
    x.resize(B * static_cast<std::size_t>(c.hidden_size));
    q.resize(B * static_cast<std::size_t>(c.q_dim()));
    attn_o.resize(q.size());
    lse2.resize(B * static_cast<std::size_t>(c.num_q_heads));
    kf.resize(B * static_cast<std::size_t>(c.kv_dim()));
    vf.resize(kf.size());
    kbytes.resize(kf.size() * es);
    vbytes.resize(kf.size() * es);
    io->resize(static_cast<std::size_t>(mbs));
    for (std::int32_t m = 0; m < mbs; ++m) {
      const std::int64_t b0 = rt::micro_batch_range(batch, mbs, m).begin;
      rt::MicroBatchIo& mb = (*io)[static_cast<std::size_t>(m)];
      mb.q = q.data() + b0 * c.q_dim();
      mb.k = kbytes.data() + static_cast<std::size_t>(b0 * c.kv_dim()) * es;
      mb.v = vbytes.data() + static_cast<std::size_t>(b0 * c.kv_dim()) * es;
      mb.attn_o = attn_o.data() + b0 * c.q_dim();
      mb.attn_lse2 = lse2.data() + b0 * c.num_q_heads;
    }
    return Status::ok();
  }

  Status begin_step(std::span<const std::int32_t> tokens, std::span<const std::int64_t>) {
    const auto t0 = Clock::now();
    HATTN_RETURN_IF_ERROR(model.embed(tokens, x.data()));
    stage_times.other_s += seconds_since(t0);
    return Status::ok();
  }

  // On the compute stream's thread.
  Status stage_a(const rt::StageContext& ctx) {
    const LlamaConfig& c = model.config();
    const std::int64_t b0 = ctx.first_seq, n = static_cast<std::int64_t>(ctx.seqs.size());
    positions.resize(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i)
      positions[static_cast<std::size_t>(i)] = ctx.seq_lens[static_cast<std::size_t>(i)] - 1;
    float* k = kf.data() + b0 * c.kv_dim();
    float* v = vf.data() + b0 * c.kv_dim();
    model.stage_a(ctx.layer, x.data() + b0 * c.hidden_size, n, positions.data(),
                  q.data() + b0 * c.q_dim(), k, v, scratch, compute_ex, &stage_times);
    // The new k, v in the cache's dtype, where the slot copy reads them.
    const auto t0 = Clock::now();
    const std::size_t es = size_of(dtype);
    std::byte* kd = kbytes.data() + static_cast<std::size_t>(b0 * c.kv_dim()) * es;
    std::byte* vd = vbytes.data() + static_cast<std::size_t>(b0 * c.kv_dim()) * es;
    for (std::int64_t i = 0; i < n * c.kv_dim(); ++i) {
      store_from_float(kd, dtype, i, k[i]);
      store_from_float(vd, dtype, i, v[i]);
    }
    stage_times.copies_s += seconds_since(t0);
    return Status::ok();
  }
  Status stage_b(const rt::StageContext& ctx) {
    const LlamaConfig& c = model.config();
    const std::int64_t b0 = ctx.first_seq, n = static_cast<std::int64_t>(ctx.seqs.size());
    model.stage_b(ctx.layer, attn_o.data() + b0 * c.q_dim(), n, x.data() + b0 * c.hidden_size,
                  scratch, compute_ex, &stage_times);
    return Status::ok();
  }

  Status finish_step(float* logits) {
    const auto batch = static_cast<std::int64_t>(x.size() / model.config().hidden_size);
    model.logits(x.data(), batch, logits, scratch, compute_ex, &stage_times);
    return Status::ok();
  }
  StageTimes engine_times() const noexcept { return stage_times; }

  const LlamaModel& model;
  const CpuExecutor& compute_ex;
  DType dtype = DType::kBF16;
  std::vector<float> x, q, attn_o, lse2, kf, vf;
  std::vector<std::byte> kbytes, vbytes;
  std::vector<std::int64_t> positions;  // compute thread
  StageScratch scratch;                 // compute thread
  StageTimes stage_times;               // compute thread, and the caller between steps
  Stream compute;
  Stream copy;
};

}  // namespace

Status OrchestratedRunner::create(const LlamaModel& model, DenseKvAttention& prefilled,
                                  const OrchestratedRunnerOptions& options,
                                  const CpuExecutor& compute, const CpuExecutor& attention,
                                  std::unique_ptr<OrchestratedRunner>* out, std::string* detail) {
  if (out == nullptr) return {StatusCode::kInvalidArgument, "OrchestratedRunner: out is null"};
  std::unique_ptr<Impl> impl;
  HATTN_RETURN_IF_ERROR(detail::make_pipeline<HostEngine>(
      model.config(), prefilled, options, attention,
      [&] { return HostEngine(model, compute, options.pin_threads); }, &impl, detail));
  out->reset(new OrchestratedRunner(std::move(impl)));
  return Status::ok();
}

std::unique_ptr<OrchestratedRunner> OrchestratedRunner::from_impl(std::unique_ptr<Impl> impl) {
  return std::unique_ptr<OrchestratedRunner>(new OrchestratedRunner(std::move(impl)));
}
OrchestratedRunner::OrchestratedRunner(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
OrchestratedRunner::~OrchestratedRunner() = default;

Status OrchestratedRunner::decode_step(std::span<const std::int32_t> tokens, float* logits) {
  try {
    return impl_->decode_step(tokens, logits);
  } catch (const std::bad_alloc&) {
    return {StatusCode::kOutOfMemory, "OrchestratedRunner::decode_step: out of memory"};
  }
}
const StageTimes& OrchestratedRunner::times() const noexcept { return impl_->times; }
void OrchestratedRunner::reset_times() noexcept { impl_->reset_times(); }
double OrchestratedRunner::wall_s() const noexcept { return impl_->wall; }
double OrchestratedRunner::compute_busy_s() const noexcept { return impl_->compute_busy; }
double OrchestratedRunner::attention_busy_s() const noexcept { return impl_->attention_busy; }
const runtime::Timeline& OrchestratedRunner::timeline() const noexcept { return impl_->timeline(); }
const char* OrchestratedRunner::attention_name() const noexcept { return impl_->name(); }
std::int32_t OrchestratedRunner::num_micro_batches() const noexcept {
  return impl_->micro_batches();
}
std::size_t OrchestratedRunner::index_bytes() const noexcept { return impl_->index_bytes(); }
std::size_t OrchestratedRunner::backend_kv_bytes() const noexcept {
  return impl_->backend_kv_bytes();
}
void OrchestratedRunner::set_sampling_stats(bool on) noexcept { impl_->set_sampling_stats(on); }
double OrchestratedRunner::mean_sampled_fraction() const noexcept {
  return impl_->mean_sampled_fraction();
}

}  // namespace hattn::model
