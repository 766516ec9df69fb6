#pragma once
// LlamaRunner: drives a LlamaModel and a KvAttention through chunked prefill
// and batched decode steps on the CPU, timing each stage. This is the
// sequential schedule; an orchestrator pipelines the same stages
// (LlamaModel::stage_a, KvAttention, LlamaModel::stage_b) across devices.

#include <chrono>
#include <cstdint>
#include <functional>
#include <span>
#include <utility>
#include <vector>

#include "hattn/core/status.hpp"
#include "hattn/cpu/executor.hpp"
#include "hattn/model/attention.hpp"
#include "hattn/model/llama.hpp"
#include "hattn/model/stage_times.hpp"

namespace hattn::model {

class LlamaRunner {
 public:
  // The model, attention and executor must outlive the runner. The batch is
  // attention.num_sequences() sequences.
  LlamaRunner(const LlamaModel& model, KvAttention& attention, const CpuExecutor& executor);

  // Runs prompt `tokens` through sequence `seq` in chunks of `chunk` tokens;
  // `last_logits` (vocab floats, may be null) gets the logits of the last token.
  // `on_chunk(done, total)`, when set, reports progress.
  Status prefill(int seq, std::span<const std::int32_t> tokens, std::int64_t chunk,
                 float* last_logits,
                 const std::function<void(std::int64_t, std::int64_t)>& on_chunk = {});

  // Benchmark-only: fills every layer's cache of every sequence with `len`
  // generated keys and values (what a prefill of len tokens would leave,
  // statistically unlike a real model's) without running the model.
  Status synthetic_prefill(std::int64_t len, std::uint64_t seed,
                           const std::function<void(std::int64_t, std::int64_t)>& on_chunk = {});

  // One decode step: tokens[b] is the next input of sequence b, for every
  // sequence; logits [B][vocab].
  Status decode_step(std::span<const std::int32_t> tokens, float* logits);

  // Logits of every token of a prefill chunk (for tests): [n][vocab].
  Status prefill_all_logits(int seq, std::span<const std::int32_t> tokens, float* logits);

  // Called after each stage of each layer with its name ("stage_a", "append",
  // "attention", "stage_b", "embed", "logits", "finish_prefill"), the layer (-1 outside layers) and
  // its start and end in seconds since the runner was made: a Chrome-trace feed.
  using TraceSink = std::function<void(const char* stage, int layer, double begin_s, double end_s)>;
  void set_trace(TraceSink sink) { trace_ = std::move(sink); }

  const StageTimes& times() const noexcept { return times_; }
  // Time 0 of the trace sink's times.
  std::chrono::steady_clock::time_point epoch() const noexcept { return epoch_; }
  void reset_times() noexcept { times_ = {}; }

 private:
  Status forward_chunk(int seq, std::span<const std::int32_t> tokens, float* logits,
                       bool all_logits);

  // KvAttention::finish_prefill, timed as attention (an LSH index build).
  Status finish_prefill(int seq);
  void trace(const char* stage, int layer, std::chrono::steady_clock::time_point begin) const;

  const LlamaModel* model_;
  KvAttention* attention_;
  const CpuExecutor* executor_;
  StageScratch scratch_;
  StageTimes times_;
  TraceSink trace_;
  std::chrono::steady_clock::time_point epoch_ = std::chrono::steady_clock::now();
  std::vector<float> x_, q_, k_, v_, o_, lse2_;
  std::vector<std::int64_t> positions_;
  std::vector<std::int32_t> seqs_;
};

}  // namespace hattn::model
