#pragma once
// The CPU attention backend interface of the orchestrator. Each micro-batch of
// each layer becomes one CpuAttentionTask, run on the orchestrator's CPU
// attention thread (inside the executor's tbb::task_arena) after the new k and
// v were appended to the host KV. A backend is any type with
//
//   Status attend(const CpuAttentionTask& task, const CpuExecutor& executor) noexcept;
//
// writing (o, lse2) of every (sequence, query head) of the task into task.out.
// It may keep state across calls (workspace, an LSH index per layer and
// sequence: `layer`, `seqs` and `appended_tokens` say which index to update).
// Called from one thread at a time, in step/layer/micro-batch order. It must
// not allocate on the hot path when it can help it and must not throw.
//
// DenseCpuAttention adapts cpu::DenseDecode. The MagicPIG LSH backend plugs
// in the same way: it reads task.query_codes (the query hash codes stage A
// computed on the device, code_bytes_per_seq bytes per sequence, or null) and
// samples from task.kv.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <vector>

#include "hattn/core/kv_view.hpp"
#include "hattn/core/problem.hpp"
#include "hattn/core/status.hpp"
#include "hattn/cpu/dense_decode.hpp"
#include "hattn/cpu/executor.hpp"

namespace hattn::runtime {

struct CpuAttentionTask {
  std::int32_t step = 0;
  std::int32_t layer = 0;
  std::int32_t micro_batch = 0;
  DecodeProblem problem{};  // batch_size = this micro-batch's sequences
  QueryView q{};            // f32 [B][Hq][D], in the ring slot
  // This layer's host KV for the micro-batch, already holding this step's
  // token, cut to the CPU's share of each sequence (partition policy).
  PagedKvView kv{};
  std::span<const std::int32_t> seqs;      // host KV cache sequence indices
  std::span<const std::int64_t> seq_lens;  // full lengths (CPU + device share)
  std::int64_t appended_tokens = 1;        // tokens appended to each sequence just now
  // This step's k and v, [B][num_kv_heads][head_dim] in the KV dtype (in the
  // slot), for backends that keep their own KV or index (cpu::LshAttention:
  // append(seq, new_k + b * row, new_v + b * row, 1), then decode()).
  const void* new_k = nullptr;
  const void* new_v = nullptr;
  const std::byte* query_codes = nullptr;  // [B][code_bytes_per_seq], or null
  std::size_t code_bytes_per_seq = 0;
  PartialView out{};  // f32 o [B][Hq][D] and lse2 [B][Hq], in the ring slot
};

template <class B>
concept CpuAttentionBackend = requires(B& b, const CpuAttentionTask& t, const CpuExecutor& ex) {
  { b.attend(t, ex) }
  noexcept->std::same_as<Status>;
};

// cpu::DenseDecode over the CPU's share of the KV: plans and runs per task
// (planning is a pass over the page table) in a workspace sized once.
class DenseCpuAttention {
 public:
  // Workspace for micro-batches up to `max_problem.batch_size` sequences.
  // Throws std::invalid_argument when DenseDecode cannot implement it.
  explicit DenseCpuAttention(const DecodeProblem& max_problem,
                             cpu::DenseDecode backend = cpu::DenseDecode())
      : backend_(backend) {
    if (!cpu::DenseDecode::can_implement(max_problem))
      throw std::invalid_argument("DenseCpuAttention: problem not supported by cpu::DenseDecode");
    workspace_.resize(cpu::DenseDecode::workspace_size(max_problem));
  }

  Status attend(const CpuAttentionTask& t, const CpuExecutor& executor) noexcept {
    cpu::DecodePlan plan;
    HATTN_RETURN_IF_ERROR(
        backend_.plan(t.problem, t.kv, workspace_.data(), workspace_.size(), &plan));
    return backend_.run(plan, t.q, t.kv, t.out, executor);
  }

  const cpu::DenseDecode& backend() const noexcept { return backend_; }

 private:
  cpu::DenseDecode backend_;
  std::vector<std::byte> workspace_;
};

static_assert(CpuAttentionBackend<DenseCpuAttention>);

}  // namespace hattn::runtime
