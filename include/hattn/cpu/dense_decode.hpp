#pragma once
// CPU dense decode attention: every query attends to every key of its
// sequence, streaming the KV cache at memory speed.
//
//   DenseDecode backend;                                  // ISA picked at run time
//   std::vector<std::byte> ws(DenseDecode::workspace_size(problem));
//   DecodePlan plan;
//   backend.plan(problem, kv, ws.data(), ws.size(), &plan);   // once per step
//   backend.run(plan, q, kv, out, executor);                  // per layer, noexcept
//
// Work is split into (sequence, KV chunk) items, each attending every head so
// that pages are read front to back. Chunk boundaries depend only on the
// sequence lengths, never on the thread count, and chunk partials are merged
// in a fixed order: results are bitwise identical on any number of threads.

#include <cstddef>
#include <cstdint>

#include "hattn/core/kv_view.hpp"
#include "hattn/core/problem.hpp"
#include "hattn/core/status.hpp"
#include "hattn/core/supported.hpp"
#include "hattn/cpu/executor.hpp"
#include "hattn/cpu/isa.hpp"

namespace hattn::cpu {

namespace detail {
// A chunk of one sequence's tokens, attended for every head.
struct WorkItem {
  std::int32_t batch;
  std::int32_t num_chunks;  // chunks of this sequence
  std::int64_t begin;       // first token
  std::int64_t end;         // one past the last token
  std::int64_t slot;        // this item's state in the workspace
};
// A (sequence, KV head) whose chunk partials must be merged.
struct MergeItem {
  std::int32_t batch;
  std::int32_t kv_head;
  std::int32_t num_chunks;
  std::int64_t first_slot;
};
}  // namespace detail

// The work decomposition of one decode step. Lives in the caller's workspace;
// valid for every layer of the step as long as sequence lengths are unchanged.
struct DecodePlan {
  DecodeProblem problem{};
  std::int64_t chunk_tokens = 0;
  std::int64_t num_items = 0;
  std::int64_t num_merges = 0;
  std::int64_t total_tokens = 0;
  detail::WorkItem* items = nullptr;
  detail::MergeItem* merges = nullptr;
  std::int64_t* seq_lens = nullptr;  // [batch], to check run() sees the planned lengths
  // Written at the workspace's start by plan(): run() refuses a plan whose
  // workspace a later plan() has reused.
  std::uint64_t stamp = 0;
  std::uint64_t* stamp_at = nullptr;
  float* slot_o = nullptr;  // [slot][num_q_heads][head_dim]
  float* slot_m = nullptr;  // [slot][num_q_heads]
  float* slot_l = nullptr;  // [slot][num_q_heads]
};

class DenseDecode {
 public:
  // Smallest chunk a sequence is split into, in tokens.
  static constexpr std::int64_t kMinChunkTokens = 512;
  // Work items a step aims for (enough for many cores, few partials to merge).
  static constexpr std::int64_t kTargetItems = 256;

  // How the products q.k and p.v are formed. Accumulation is f32 either way.
  enum class Precision : std::uint8_t {
    kF32,  // f32 products: matches the double reference to f32 rounding
    // bf16 KV on CPUs with AVX512_BF16: q and the softmax weights are rounded
    // to bf16 and multiplied with bf16 dot-product instructions, as GPU
    // tensor-core kernels do (twice the arithmetic rate; relative error
    // about 2^-8). Other cases use kF32.
    kBf16Products,
  };

  // Uses `isa` if this CPU supports it, else the best it does.
  explicit DenseDecode(CpuIsa isa = cpu_isa_default(),
                       Precision precision = Precision::kF32) noexcept;

  CpuIsa isa() const noexcept { return isa_; }
  Precision precision() const noexcept { return precision_; }
  // Whether run() on KV of this dtype uses bf16 dot products.
  bool uses_bf16_products(DType kv_dtype) const noexcept;

  static Status can_implement(const DecodeProblem& problem) noexcept;
  // Bytes of workspace plan() needs for this problem, whatever the lengths.
  static std::size_t workspace_size(const DecodeProblem& problem) noexcept;

  // Split the step into work items. Reads the (host) page table or lengths.
  template <KvView Kv>
  Status plan(const DecodeProblem& problem, const Kv& kv, void* workspace,
              std::size_t workspace_bytes, DecodePlan* plan) const noexcept;

  // Attention for one layer: `out` gets (o, lse2). No allocation; the KV view
  // must have the lengths the plan was made with.
  template <KvView Kv>
  Status run(const DecodePlan& plan, const QueryView& q, const Kv& kv, const PartialView& out,
             const CpuExecutor& executor) const noexcept;

 private:
  CpuIsa isa_;
  Precision precision_;
};

}  // namespace hattn::cpu
