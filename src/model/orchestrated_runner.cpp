#include "hattn/model/orchestrated_runner.hpp"

#include <algorithm>
#include <chrono>
#include <exception>
#include <functional>
#include <new>
#include <optional>
#include <stdexcept>
#include <utility>

#include "hattn/core/dtype.hpp"
#include "hattn/core/problem.hpp"
#include "hattn/cpu/dense_decode.hpp"
#include "hattn/runtime/affinity.hpp"
#include "hattn/runtime/cpu_attention.hpp"
#include "hattn/runtime/host_stream.hpp"
#include "hattn/runtime/lsh_cpu_attention.hpp"
#include "hattn/runtime/orchestrator.hpp"

namespace hattn::model {
namespace {

namespace rt = runtime;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

}  // namespace

// What does not depend on the backend type: the buffers of the step (one
// [B][...] buffer each; micro-batch m uses rows [begin, begin + size)), the
// stages, and the accounting.
struct OrchestratedRunner::Impl {
  Impl(const LlamaModel& m, DenseKvAttention& kv, const OrchestratedRunnerOptions& options,
       const CpuExecutor& c, const CpuExecutor& a)
      : model(m), cache(kv.cache()), opt(options), compute_ex(c), attention_ex(a) {}
  virtual ~Impl() = default;

  virtual Status step(std::span<const std::int32_t> seqs, std::span<const rt::MicroBatchIo> io,
                      const rt::EngineStages<rt::HostStream*>& stages) = 0;
  virtual const rt::Timeline& timeline() const noexcept = 0;
  virtual rt::Timeline& timeline() noexcept = 0;
  virtual const char* name() const noexcept = 0;
  virtual std::size_t index_bytes() const noexcept { return 0; }
  virtual std::size_t backend_kv_bytes() const noexcept { return 0; }
  virtual void set_sampling_stats(bool) noexcept {}
  virtual double mean_sampled_fraction() const noexcept { return 0.0; }

  std::int32_t batch() const noexcept { return cache.num_sequences(); }
  std::int32_t micro_batches() const noexcept { return std::min(opt.num_micro_batches, batch()); }
  std::int32_t max_micro_batch() const noexcept {
    return (batch() + micro_batches() - 1) / micro_batches();
  }
  rt::SlotShape slot_shape() const noexcept {
    const LlamaConfig& c = model.config();
    return {.max_batch = max_micro_batch(),
            .num_q_heads = c.num_q_heads,
            .num_kv_heads = c.num_kv_heads,
            .head_dim = c.head_dim,
            .kv_dtype = cache.options().dtype,
            .code_bytes_per_seq = 0};
  }
  rt::OrchestratorOptions orchestrator_options() const {
    rt::OrchestratorOptions oo;
    oo.num_layers = model.config().num_layers;
    oo.num_micro_batches = micro_batches();
    oo.slot = slot_shape();
    // A deadlock guard, not a time limit: long contexts on few cores take
    // seconds per step.
    oo.step_timeout = std::chrono::minutes(10);
    oo.record_timeline = true;  // the stage split comes from it
    if (opt.pin_threads) oo.cpu_thread_init = [] { (void)rt::pin_this_thread(1); };
    return oo;
  }
  std::function<void()> compute_thread_init() const {
    if (!opt.pin_threads) return {};
    return [] { (void)rt::pin_this_thread(0); };
  }

  void allocate() {
    const LlamaConfig& c = model.config();
    const auto B = static_cast<std::size_t>(batch());
    const std::size_t es = size_of(cache.options().dtype);
    x.resize(B * static_cast<std::size_t>(c.hidden_size));
    q.resize(B * static_cast<std::size_t>(c.q_dim()));
    attn_o.resize(q.size());
    lse2.resize(B * static_cast<std::size_t>(c.num_q_heads));
    kf.resize(B * static_cast<std::size_t>(c.kv_dim()));
    vf.resize(kf.size());
    kbytes.resize(kf.size() * es);
    vbytes.resize(kf.size() * es);
    positions.resize(B);
    seqs.resize(B);
    for (std::size_t b = 0; b < B; ++b) seqs[b] = static_cast<std::int32_t>(b);
    io.resize(static_cast<std::size_t>(micro_batches()));
    for (std::int32_t m = 0; m < micro_batches(); ++m) {
      const std::int64_t b0 = rt::micro_batch_range(batch(), micro_batches(), m).begin;
      rt::MicroBatchIo& mb = io[static_cast<std::size_t>(m)];
      mb.q = q.data() + b0 * c.q_dim();
      mb.k = kbytes.data() + static_cast<std::size_t>(b0 * c.kv_dim()) * es;
      mb.v = vbytes.data() + static_cast<std::size_t>(b0 * c.kv_dim()) * es;
      mb.attn_o = attn_o.data() + b0 * c.q_dim();
      mb.attn_lse2 = lse2.data() + b0 * c.num_q_heads;
    }
    stages.stage_a = [this](const rt::StageContext& ctx, rt::HostStream*) { return stage_a(ctx); };
    stages.stage_b = [this](const rt::StageContext& ctx, rt::HostStream*) { return stage_b(ctx); };
  }

  // On the compute stream's thread.
  Status stage_a(const rt::StageContext& ctx) {
    const LlamaConfig& c = model.config();
    const std::int64_t b0 = ctx.first_seq, n = static_cast<std::int64_t>(ctx.seqs.size());
    for (std::int64_t i = 0; i < n; ++i)
      positions[static_cast<std::size_t>(b0 + i)] = ctx.seq_lens[static_cast<std::size_t>(i)] - 1;
    float* k = kf.data() + b0 * c.kv_dim();
    float* v = vf.data() + b0 * c.kv_dim();
    model.stage_a(ctx.layer, x.data() + b0 * c.hidden_size, n, positions.data() + b0,
                  q.data() + b0 * c.q_dim(), k, v, scratch, compute_ex, &stage_times);
    // The new k, v in the cache's dtype, where the slot copy reads them.
    const auto t0 = Clock::now();
    const DType dt = cache.options().dtype;
    const std::size_t es = size_of(dt);
    std::byte* kd = kbytes.data() + static_cast<std::size_t>(b0 * c.kv_dim()) * es;
    std::byte* vd = vbytes.data() + static_cast<std::size_t>(b0 * c.kv_dim()) * es;
    for (std::int64_t i = 0; i < n * c.kv_dim(); ++i) {
      store_from_float(kd, dt, i, k[i]);
      store_from_float(vd, dt, i, v[i]);
    }
    convert_s += seconds_since(t0);
    return Status::ok();
  }
  Status stage_b(const rt::StageContext& ctx) {
    const LlamaConfig& c = model.config();
    const std::int64_t b0 = ctx.first_seq, n = static_cast<std::int64_t>(ctx.seqs.size());
    model.stage_b(ctx.layer, attn_o.data() + b0 * c.q_dim(), n, x.data() + b0 * c.hidden_size,
                  scratch, compute_ex, &stage_times);
    return Status::ok();
  }

  Status decode_step(std::span<const std::int32_t> tokens, float* logits) {
    if (tokens.size() != seqs.size())
      return {StatusCode::kInvalidArgument, "decode_step needs one token per sequence"};
    if (logits == nullptr) return {StatusCode::kInvalidArgument, "decode_step: logits is null"};
    const auto t0 = Clock::now();
    HATTN_RETURN_IF_ERROR(model.embed(tokens, x.data()));
    stage_times.other_s += seconds_since(t0);
    rt::Timeline& tl = timeline();
    const std::size_t first_entry = tl.size();
    const Status s = step(seqs, io, stages);
    // The stage split of this step, from the orchestrator's timeline.
    const std::vector<rt::TimelineEntry> entries = tl.entries();
    for (std::size_t i = first_entry; i < entries.size(); ++i) {
      const rt::TimelineEntry& e = entries[i];
      const double d = 1e-9 * static_cast<double>(e.end_ns - e.begin_ns);
      switch (e.phase) {
        case rt::Phase::kStageA:
        case rt::Phase::kStageB:
        case rt::Phase::kDeviceAttention: compute_busy += d; break;
        case rt::Phase::kCpuAttention:
          attention_busy += d;
          times.attention_s += d;
          break;
        case rt::Phase::kCopyToHost:
        case rt::Phase::kCopyToDevice: times.copies_s += d; break;
        case rt::Phase::kMerge:
          times.merge_s += d;
          compute_busy += d;
          break;
      }
    }
    if (!opt.record_timeline) tl.clear();
    HATTN_RETURN_IF_ERROR(s);
    model.logits(x.data(), batch(), logits, scratch, compute_ex, &stage_times);
    wall += seconds_since(t0);
    // Stage times of the compute thread (read after the step: the streams are
    // idle, and step() synchronized with them).
    times.gemm_s = stage_times.gemm_s;
    times.other_s = stage_times.other_s;
    times.copies_s += convert_s;
    convert_s = 0.0;
    return Status::ok();
  }

  void reset_times() noexcept {
    times = {};
    stage_times = {};
    convert_s = 0.0;
    wall = compute_busy = attention_busy = 0.0;
  }

  const LlamaModel& model;
  rt::HostKvCache& cache;
  OrchestratedRunnerOptions opt;
  const CpuExecutor& compute_ex;
  const CpuExecutor& attention_ex;

  std::vector<float> x, q, attn_o, lse2, kf, vf;
  std::vector<std::byte> kbytes, vbytes;
  std::vector<std::int64_t> positions;
  std::vector<std::int32_t> seqs;
  std::vector<rt::MicroBatchIo> io;
  rt::EngineStages<rt::HostStream*> stages;
  StageScratch scratch;    // compute thread
  StageTimes stage_times;  // compute thread (and embed/logits on the caller)
  double convert_s = 0.0;  // compute thread
  StageTimes times;        // what times() reports
  double wall = 0.0, compute_busy = 0.0, attention_busy = 0.0;
};

namespace {

template <class Backend>
struct Pipeline final : OrchestratedRunner::Impl {
  template <class MakeBackend>
  Pipeline(const LlamaModel& m, DenseKvAttention& kv, const OrchestratedRunnerOptions& options,
           const CpuExecutor& c, const CpuExecutor& a, MakeBackend&& make)
      : Impl(m, kv, options, c, a),
        compute(compute_thread_init()),
        backend(make(*this)),
        orchestrator(orchestrator_options(), compute, copy, cache, backend, attention_ex) {
    allocate();
  }

  Status step(std::span<const std::int32_t> s, std::span<const rt::MicroBatchIo> mb,
              const rt::EngineStages<rt::HostStream*>& st) override {
    return orchestrator.step(s, mb, st);
  }
  const rt::Timeline& timeline() const noexcept override { return orchestrator.timeline(); }
  rt::Timeline& timeline() noexcept override { return orchestrator.timeline(); }

  const char* name() const noexcept override {
    if constexpr (std::is_same_v<Backend, rt::LshCpuAttention>)
      return "lsh";
    else
      return "cpu-dense";
  }
  std::size_t index_bytes() const noexcept override {
    if constexpr (std::is_same_v<Backend, rt::LshCpuAttention>)
      return backend.index_bytes();
    else
      return 0;
  }
  std::size_t backend_kv_bytes() const noexcept override {
    if constexpr (std::is_same_v<Backend, rt::LshCpuAttention>)
      return backend.lsh_kv_bytes();
    else
      return 0;
  }
  void set_sampling_stats(bool on) noexcept override {
    if constexpr (std::is_same_v<Backend, rt::LshCpuAttention>) backend.set_sampling_stats(on);
  }
  double mean_sampled_fraction() const noexcept override {
    if constexpr (std::is_same_v<Backend, rt::LshCpuAttention>)
      return backend.sampling_stats().mean_fraction();
    else
      return 0.0;
  }

  rt::HostStream compute;
  rt::HostStream copy;
  Backend backend;
  rt::DecodeOrchestrator<rt::HostStream, Backend> orchestrator;  // last: uses the above
};

DecodeProblem max_problem(const OrchestratedRunner::Impl& impl) {
  const LlamaConfig& c = impl.model.config();
  return {.batch_size = impl.max_micro_batch(),
          .num_q_heads = c.num_q_heads,
          .num_kv_heads = c.num_kv_heads,
          .head_dim = c.head_dim,
          .kv_dtype = impl.cache.options().dtype,
          .q_dtype = DType::kF32,
          .o_dtype = DType::kF32,
          .sm_scale = std::nullopt};
}

}  // namespace

Status OrchestratedRunner::create(const LlamaModel& model, DenseKvAttention& prefilled,
                                  const OrchestratedRunnerOptions& options,
                                  const CpuExecutor& compute, const CpuExecutor& attention,
                                  std::unique_ptr<OrchestratedRunner>* out, std::string* detail) {
  const auto fail = [detail](StatusCode code, std::string text) {
    if (detail) *detail = text;
    return Status(code, "OrchestratedRunner: cannot create (see detail)");
  };
  if (out == nullptr) return {StatusCode::kInvalidArgument, "OrchestratedRunner: out is null"};
  if (options.num_micro_batches < 1)
    return fail(StatusCode::kInvalidArgument, "num_micro_batches must be at least 1");
  const LlamaConfig& c = model.config();
  const rt::HostKvCache& cache = prefilled.cache();
  if (cache.num_layers() != c.num_layers || cache.options().num_kv_heads != c.num_kv_heads ||
      cache.options().head_dim != c.head_dim)
    return fail(StatusCode::kInvalidArgument, "the KV cache was made for another model shape");
  for (std::int32_t l = 1; l < c.num_layers; ++l)
    for (std::int32_t s = 0; s < cache.num_sequences(); ++s)
      if (cache.seq_len(l, s) != cache.seq_len(0, s))
        return fail(StatusCode::kInvalidArgument,
                    "the layers of sequence " + std::to_string(s) + " have different lengths");
  std::unique_ptr<Impl> impl;
  try {
    if (options.attention == CpuAttentionKind::kDense) {
      impl = std::make_unique<Pipeline<rt::DenseCpuAttention>>(
          model, prefilled, options, compute, attention, [&](const Impl& i) {
            return rt::DenseCpuAttention(
                max_problem(i), cpu::DenseDecode(options.isa, prefilled.options().precision));
          });
    } else {
      if (const Status s = cpu::validate(options.lsh); !s)
        return fail(s.code(), std::string("LSH config: ") + s.message());
      auto p = std::make_unique<Pipeline<rt::LshCpuAttention>>(
          model, prefilled, options, compute, attention, [&](const Impl& i) {
            const DenseKvAttentionOptions& ko = prefilled.options();
            const cpu::LshShape shape{.num_q_heads = c.num_q_heads,
                                      .num_kv_heads = c.num_kv_heads,
                                      .head_dim = c.head_dim,
                                      .kv_dtype = ko.kv_dtype,
                                      .layer = 0,
                                      .max_tokens = ko.max_seq_len * ko.num_sequences,
                                      .max_sequences = ko.num_sequences,
                                      .page_size = ko.page_size,
                                      .sm_scale = std::nullopt};
            return rt::LshCpuAttention(options.lsh, shape, i.cache, i.max_micro_batch(),
                                       options.lsh_dense_layers);
          });
      if (const Status s = p->backend.prefill_from_cache(attention); !s)
        return fail(s.code(), std::string("building the LSH indexes: ") + s.message());
      impl = std::move(p);
    }
  } catch (const std::bad_alloc&) {
    return fail(StatusCode::kOutOfMemory, "out of memory");
  } catch (const std::exception& e) {
    return fail(StatusCode::kInvalidArgument, e.what());
  }
  out->reset(new OrchestratedRunner(std::move(impl)));
  return Status::ok();
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
const runtime::Timeline& OrchestratedRunner::timeline() const noexcept {
  return static_cast<const Impl&>(*impl_).timeline();
}
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
