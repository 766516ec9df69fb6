#pragma once
// The implementation behind model::OrchestratedRunner (internal): one
// Pipeline<Engine, Backend> per (compute device, CPU backend). The engine
// owns the compute and copy streams, the step's buffers and the model stages
// on its device (HostEngine in orchestrated_runner.cpp: LlamaModel on host
// streams; CudaEngine in cuda/cuda_orchestrated_runner.cpp: CudaLlamaModel on
// CUDA streams); the backend is runtime::DenseCpuAttention or
// runtime::LshCpuAttention; the orchestrator joins them. Accounting (the
// stage split and busy times) comes from the orchestrator's timeline and is
// the same for every engine.
//
// An Engine provides:
//   using Stream;                                  a runtime::Stream
//   Stream compute, copy;
//   runtime::HostMemoryResource slot_memory();     memory of the ring slots
//   Status allocate(batch, micro_batches, kv_dtype, std::vector<MicroBatchIo>*)
//   Status begin_step(tokens, positions)           embed (and uploads) before the step
//   Status stage_a(const StageContext&), stage_b(const StageContext&)
//   Status finish_step(float* host_logits)         logits of every sequence, to the host
//   StageTimes engine_times()                      gemm/other/copies of its own

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "hattn/core/problem.hpp"
#include "hattn/core/status.hpp"
#include "hattn/cpu/dense_decode.hpp"
#include "hattn/cpu/executor.hpp"
#include "hattn/model/attention.hpp"
#include "hattn/model/config.hpp"
#include "hattn/model/lsh_kv_attention.hpp"
#include "hattn/model/orchestrated_runner.hpp"
#include "hattn/model/stage_times.hpp"
#include "hattn/runtime/affinity.hpp"
#include "hattn/runtime/cpu_attention.hpp"
#include "hattn/runtime/host_kv_cache.hpp"
#include "hattn/runtime/lsh_cpu_attention.hpp"
#include "hattn/runtime/orchestrator.hpp"

namespace hattn::model {

// What OrchestratedRunner forwards to, whatever the engine and backend.
struct OrchestratedRunner::Impl {
  virtual ~Impl() = default;
  virtual Status decode_step(std::span<const std::int32_t> tokens, float* logits) = 0;
  virtual const runtime::Timeline& timeline() const noexcept = 0;
  virtual const char* name() const noexcept = 0;
  virtual std::int32_t micro_batches() const noexcept = 0;
  virtual std::size_t index_bytes() const noexcept = 0;
  virtual std::size_t backend_kv_bytes() const noexcept = 0;
  virtual void set_sampling_stats(bool on) noexcept = 0;
  virtual double mean_sampled_fraction() const noexcept = 0;

  void reset_times() noexcept {
    times = {};
    engine_base = {};
    wall = compute_busy = attention_busy = ring_copies = 0.0;
    reset_engine_times = true;
  }

  StageTimes times;        // what OrchestratedRunner::times() reports
  StageTimes engine_base;  // the engine's own times at the last reset
  bool reset_engine_times = false;
  double wall = 0.0, compute_busy = 0.0, attention_busy = 0.0;
  double ring_copies = 0.0;  // q/k/v into the ring, partials back
};

namespace detail {

template <class Engine, class Backend>
struct Pipeline final : OrchestratedRunner::Impl {
  static constexpr bool kLsh = std::is_same_v<Backend, runtime::LshCpuAttention>;
  using Clock = std::chrono::steady_clock;

  // `make_engine()` and `make_backend(max_micro_batch)` build the parts in
  // place; the orchestrator comes last (it borrows both).
  template <class MakeEngine, class MakeBackend>
  Pipeline(const LlamaConfig& config, DenseKvAttention& kv, const OrchestratedRunnerOptions& o,
           const CpuExecutor& attention_executor, MakeEngine&& make_engine,
           MakeBackend&& make_backend)
      : config_(config),
        cache_(kv.cache()),
        opt_(o),
        max_seq_len_(kv.options().max_seq_len),
        mbs_(std::min(o.num_micro_batches, kv.cache().num_sequences())),
        max_mb_((kv.cache().num_sequences() + mbs_ - 1) / mbs_),
        engine_(make_engine()),
        backend_(make_backend(max_mb_)),
        orchestrator_(orchestrator_options(), engine_.compute, engine_.copy, cache_, backend_,
                      attention_executor, runtime::PartitionPolicy::all_cpu(),
                      engine_.slot_memory()) {
    const Status s = engine_.allocate(cache_.num_sequences(), mbs_, cache_.options().dtype, &io_);
    if (!s)
      throw std::runtime_error(std::string("cannot allocate the step buffers: ") + s.message());
    seqs_.resize(static_cast<std::size_t>(cache_.num_sequences()));
    positions_.resize(seqs_.size());
    for (std::size_t b = 0; b < seqs_.size(); ++b) seqs_[b] = static_cast<std::int32_t>(b);
    stages_.stage_a = [this](const runtime::StageContext& c, typename Engine::Stream::Handle) {
      return engine_.stage_a(c);
    };
    stages_.stage_b = [this](const runtime::StageContext& c, typename Engine::Stream::Handle) {
      return engine_.stage_b(c);
    };
  }

  runtime::OrchestratorOptions orchestrator_options() const {
    runtime::OrchestratorOptions oo;
    oo.num_layers = config_.num_layers;
    oo.num_micro_batches = mbs_;
    oo.slot = {.max_batch = max_mb_,
               .num_q_heads = config_.num_q_heads,
               .num_kv_heads = config_.num_kv_heads,
               .head_dim = config_.head_dim,
               .kv_dtype = cache_.options().dtype,
               .code_bytes_per_seq = 0};
    // A deadlock guard, not a time limit: long contexts on few cores take
    // seconds per step.
    oo.step_timeout = std::chrono::minutes(10);
    oo.record_timeline = true;  // the stage split comes from it
    if (opt_.pin_threads) oo.cpu_thread_init = [] { (void)runtime::pin_this_thread(1); };
    return oo;
  }

  Status decode_step(std::span<const std::int32_t> tokens, float* logits) override {
    if (tokens.size() != seqs_.size())
      return {StatusCode::kInvalidArgument, "decode_step needs one token per sequence"};
    if (logits == nullptr) return {StatusCode::kInvalidArgument, "decode_step: logits is null"};
    for (const std::int32_t t : tokens)  // before anything runs: a bad id appends nothing
      if (t < 0 || t >= config_.vocab_size)
        return {StatusCode::kInvalidArgument, "decode_step: token id outside the vocabulary"};
    // A failed step may have left its KV appends for the next step() to undo:
    // finish that first, so the positions below are this step's.
    if (last_failed_) {
      HATTN_RETURN_IF_ERROR(
          orchestrator_.wait_idle(runtime::deadline_after(std::chrono::minutes(10))));
      last_failed_ = false;
    }
    for (std::size_t b = 0; b < seqs_.size(); ++b) {
      positions_[b] = cache_.seq_len(0, seqs_[b]);  // this step's token goes there
      if (positions_[b] + 1 > max_seq_len_)
        return {StatusCode::kOutOfMemory, "decode_step: a sequence would pass max_seq_len"};
    }
    if (reset_engine_times) {
      engine_base = engine_.engine_times();
      reset_engine_times = false;
    }
    const auto t0 = Clock::now();
    HATTN_RETURN_IF_ERROR(engine_.begin_step(tokens, positions_));
    const auto t1 = Clock::now();
    runtime::Timeline& tl = orchestrator_.timeline();
    const std::size_t first = tl.size();
    const Status s = orchestrator_.step(seqs_, io_, stages_);
    last_failed_ = !s;
    const auto t2 = Clock::now();
    // Only steps that ran count (a failed one's work was undone).
    if (s) account(tl.entries_since(first));
    if (!opt_.record_timeline) tl.clear();
    HATTN_RETURN_IF_ERROR(s);
    HATTN_RETURN_IF_ERROR(engine_.finish_step(logits));
    const auto t3 = Clock::now();
    wall += std::chrono::duration<double>(t3 - t0).count();
    // Embedding and logits are compute work too (outside the orchestrator).
    compute_busy += std::chrono::duration<double>((t1 - t0) + (t3 - t2)).count();
    // The engine's split (read after the step: its streams are idle).
    const StageTimes e = engine_.engine_times();
    times.gemm_s = e.gemm_s - engine_base.gemm_s;
    times.other_s = e.other_s - engine_base.other_s;
    times.copies_s = ring_copies + e.copies_s - engine_base.copies_s;
    return Status::ok();
  }

  // The stage split of one step, from the orchestrator's timeline.
  void account(const std::vector<runtime::TimelineEntry>& entries) {
    for (const runtime::TimelineEntry& e : entries) {
      const double d = 1e-9 * static_cast<double>(e.end_ns - e.begin_ns);
      switch (e.phase) {
        case runtime::Phase::kStageA:
        case runtime::Phase::kStageB:
        case runtime::Phase::kDeviceAttention: compute_busy += d; break;
        case runtime::Phase::kCpuAttention:
          attention_busy += d;
          times.attention_s += d;
          break;
        case runtime::Phase::kCopyToHost: ring_copies += d; break;
        case runtime::Phase::kCopyToDevice:  // on the compute stream
          ring_copies += d;
          compute_busy += d;
          break;
        case runtime::Phase::kMerge:
          times.merge_s += d;
          compute_busy += d;
          break;
      }
    }
  }

  const runtime::Timeline& timeline() const noexcept override { return orchestrator_.timeline(); }
  const char* name() const noexcept override { return kLsh ? "lsh" : "cpu-dense"; }
  std::int32_t micro_batches() const noexcept override { return mbs_; }
  std::size_t index_bytes() const noexcept override {
    if constexpr (kLsh)
      return backend_.index_bytes();
    else
      return 0;
  }
  std::size_t backend_kv_bytes() const noexcept override {
    if constexpr (kLsh)
      return backend_.lsh_kv_bytes();
    else
      return 0;
  }
  void set_sampling_stats(bool on) noexcept override {
    if constexpr (kLsh) backend_.set_sampling_stats(on);
  }
  double mean_sampled_fraction() const noexcept override {
    if constexpr (kLsh)
      return backend_.sampling_stats().queries > 0 ? backend_.sampling_stats().mean_fraction()
                                                   : -1.0;
    else
      return -1.0;
  }

  Backend& backend() noexcept { return backend_; }

 private:
  LlamaConfig config_;
  runtime::HostKvCache& cache_;
  OrchestratedRunnerOptions opt_;
  std::int64_t max_seq_len_;
  bool last_failed_ = false;  // the orchestrator may still owe that step's rollback
  std::int32_t mbs_;
  std::int32_t max_mb_;
  Engine engine_;
  Backend backend_;
  runtime::DecodeOrchestrator<typename Engine::Stream, Backend> orchestrator_;  // borrows the above
  std::vector<runtime::MicroBatchIo> io_;
  std::vector<std::int32_t> seqs_;
  std::vector<std::int64_t> positions_;
  runtime::EngineStages<typename Engine::Stream::Handle> stages_;
};

// Validates the options and the cache, then builds the pipeline of `Engine`
// with the backend the options ask for. `make_engine()` returns the engine.
template <class Engine, class MakeEngine>
Status make_pipeline(const LlamaConfig& c, DenseKvAttention& prefilled,
                     const OrchestratedRunnerOptions& options, const CpuExecutor& attention,
                     MakeEngine&& make_engine, std::unique_ptr<OrchestratedRunner::Impl>* out,
                     std::string* detail) {
  const auto fail = [detail](StatusCode code, std::string text) {
    if (detail) *detail = std::move(text);
    return Status(code, "OrchestratedRunner: cannot create (see detail)");
  };
  if (options.num_micro_batches < 1)
    return fail(StatusCode::kInvalidArgument, "num_micro_batches must be at least 1");
  const runtime::HostKvCache& cache = prefilled.cache();
  if (cache.num_layers() != c.num_layers || cache.options().num_kv_heads != c.num_kv_heads ||
      cache.options().head_dim != c.head_dim)
    return fail(StatusCode::kInvalidArgument, "the KV cache was made for another model shape");
  for (std::int32_t l = 1; l < c.num_layers; ++l)
    for (std::int32_t s = 0; s < cache.num_sequences(); ++s)
      if (cache.seq_len(l, s) != cache.seq_len(0, s))
        return fail(StatusCode::kInvalidArgument,
                    "the layers of sequence " + std::to_string(s) + " have different lengths");
  const DenseKvAttentionOptions& ko = prefilled.options();
  try {
    if (options.attention == CpuAttentionKind::kDense) {
      *out = std::make_unique<Pipeline<Engine, runtime::DenseCpuAttention>>(
          c, prefilled, options, attention, make_engine, [&](std::int32_t max_batch) {
            return runtime::DenseCpuAttention(decode_problem(c, max_batch, ko.kv_dtype),
                                              cpu::DenseDecode(options.isa, ko.precision));
          });
      return Status::ok();
    }
    if (const Status s = cpu::validate(options.lsh); !s)
      return fail(s.code(), std::string("LSH config: ") + s.message());
    auto p = std::make_unique<Pipeline<Engine, runtime::LshCpuAttention>>(
        c, prefilled, options, attention, make_engine, [&](std::int32_t max_batch) {
          const cpu::LshShape shape =
              lsh_shape(c, ko.kv_dtype, ko.max_seq_len, ko.num_sequences, ko.page_size, 0);
          return runtime::LshCpuAttention(options.lsh, shape, prefilled.cache(), max_batch,
                                          options.lsh_dense_layers, options.isa, ko.precision);
        });
    if (const Status s = p->backend().prefill_from_cache(attention); !s)
      return fail(s.code(), std::string("building the LSH indexes: ") + s.message());
    *out = std::move(p);
  } catch (const std::bad_alloc&) {
    return fail(StatusCode::kOutOfMemory, "out of memory");
  } catch (const std::exception& e) {
    return fail(StatusCode::kInvalidArgument, e.what());
  }
  return Status::ok();
}

}  // namespace detail
}  // namespace hattn::model
