#pragma once
// OrchestratedRunner: decode steps of a LlamaModel driven by
// runtime::DecodeOrchestrator, the way an engine links hattn. The model's
// stages run on a compute stream (a HostStream here: its own thread, with the
// compute executor's threads for the GEMMs), q/k/v go through the
// orchestrator's slot ring to its CPU attention thread, which appends k, v to
// the host KV cache and attends with a CPU backend (cpu::DenseDecode, or the
// MagicPIG LSH backend with some layers dense), and the partial comes back
// for stage B. With M micro-batches the compute of one micro-batch overlaps
// the attention of another (Lamina's pipelining); with M = 1 they alternate.
//
// Prefill is not pipelined: run it with LlamaRunner over a DenseKvAttention
// (exact causal attention), then create the OrchestratedRunner on that
// attention's cache: decoding continues from it, and the LSH backend builds
// its indexes from the prompt there.
//
//   DenseKvAttention kv(config, kv_options, executor);
//   LlamaRunner(model, kv, executor).prefill(0, prompt, 256, logits);
//   std::unique_ptr<OrchestratedRunner> run;
//   OrchestratedRunner::create(model, kv, {.num_micro_batches = 2}, compute_ex, attn_ex, &run);
//   run->decode_step(tokens, logits);  // one token per sequence

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "hattn/core/status.hpp"
#include "hattn/cpu/executor.hpp"
#include "hattn/cpu/isa.hpp"
#include "hattn/cpu/lsh_config.hpp"
#include "hattn/model/attention.hpp"
#include "hattn/model/llama.hpp"
#include "hattn/model/stage_times.hpp"
#include "hattn/runtime/timeline.hpp"

namespace hattn::model {

enum class CpuAttentionKind : std::uint8_t { kDense, kLsh };

struct OrchestratedRunnerOptions {
  std::int32_t num_micro_batches = 1;
  CpuAttentionKind attention = CpuAttentionKind::kDense;
  cpu::LshConfig lsh{};                        // with kLsh
  std::vector<std::int32_t> lsh_dense_layers;  // with kLsh: layers attended densely
  CpuIsa isa = cpu_isa_default();              // CPU attention kernels
  bool record_timeline = false;                // runtime::Timeline of every stage
  // Pin the compute stream's thread to core 0 and the CPU attention thread to
  // core 1 (Linux; ignored with fewer than 2 cores). Only useful when each
  // executor has one thread, which then runs on the pinned thread.
  bool pin_threads = false;
};

class OrchestratedRunner {
 public:
  // Borrows the model, the prefilled cache (every sequence of `prefilled`
  // holds its prompt in every layer) and the executors, which must outlive
  // the runner. `compute` runs the stages' GEMMs, `attention` the CPU
  // backend; they may be the same executor (sensible with one micro-batch,
  // where the two alternate). With kLsh this builds every sequence's index
  // from the cache (the prompt). Errors: kInvalidArgument for bad options,
  // kOutOfMemory, or the backend's Status; `detail` says more when given.
  static Status create(const LlamaModel& model, DenseKvAttention& prefilled,
                       const OrchestratedRunnerOptions& options, const CpuExecutor& compute,
                       const CpuExecutor& attention, std::unique_ptr<OrchestratedRunner>* out,
                       std::string* detail = nullptr);
  ~OrchestratedRunner();
  OrchestratedRunner(const OrchestratedRunner&) = delete;
  OrchestratedRunner& operator=(const OrchestratedRunner&) = delete;

  // One decode step: tokens[b] is the next input of sequence b, for every
  // sequence of the cache; logits [B][vocab]. Token ids and max_seq_len are
  // checked before anything runs (kInvalidArgument, kOutOfMemory). When the
  // step fails in the pipeline its KV appends are undone (the orchestrator's
  // rollback) and the next step can retry; only a failure computing the
  // logits afterwards (out of memory) leaves the step's KV in place.
  // Failed steps do not count in times() and the busy times.
  Status decode_step(std::span<const std::int32_t> tokens, float* logits);

  // Accumulated over decode steps. gemm_s and other_s: the stages on the
  // compute stream; attention_s: the CPU attention thread (host KV append
  // included); copies_s: q/k/v into the ring and the partials back; merge_s:
  // device/CPU merges (none with host compute). With overlap their sum
  // exceeds the wall time.
  const StageTimes& times() const noexcept;
  void reset_times() noexcept;
  // Wall time of the decode steps, and the time the compute stream and the
  // CPU attention thread were busy in them: busy_s / wall_s > 1 is overlap.
  double wall_s() const noexcept;
  double compute_busy_s() const noexcept;
  double attention_busy_s() const noexcept;

  // Every stage of every step (with record_timeline), for a Chrome trace.
  const runtime::Timeline& timeline() const noexcept;

  const char* attention_name() const noexcept;
  std::int32_t num_micro_batches() const noexcept;
  // LSH: bytes of the indexes, and of the backend's own KV copies (the LSH
  // backend keeps one next to the host cache; 0 for dense).
  std::size_t index_bytes() const noexcept;
  std::size_t backend_kv_bytes() const noexcept;
  // LSH: also count which keys each query samples (a second retrieval per
  // query: statistics, not for timing), and the mean fraction so far (-1
  // while no query had indexed keys, and for dense).
  void set_sampling_stats(bool on) noexcept;
  double mean_sampled_fraction() const noexcept;

  // The implementation (src/model/orchestrated_pipeline.hpp): one per compute
  // device; model/cuda_orchestrated_runner.hpp makes the CUDA one.
  struct Impl;
  static std::unique_ptr<OrchestratedRunner> from_impl(std::unique_ptr<Impl> impl);

 private:
  explicit OrchestratedRunner(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace hattn::model
