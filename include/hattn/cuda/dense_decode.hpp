#pragma once
// GPU dense decode attention (split-KV flash-decoding) over a paged or dense
// KV cache in device memory, returning the same partial (o, lse2) as the CPU
// backends so partials from both merge exactly.
//
//   hattn::cuda::DenseDecode backend;                        // or DenseDecode(sm_count)
//   hattn::cuda::DenseDecode::for_device(0, &backend);       // SM count of device 0
//   DeviceBuffer ws;  ws.allocate(DenseDecode::workspace_size(problem));
//   DecodePlan plan;
//   backend.plan(problem, host_seq_lens, ws.data(), ws.size(), &plan);   // once per step
//   backend.run(plan, q, kv, out, stream);                              // per layer, noexcept
//
// Every pointer of q, kv (K, V and the page table or seq_lens) and out is
// device memory; plan() takes the lengths from the host. run() reads no
// device memory on the host, so it checks shapes and pointers only; the
// kernels check the page table as they read it (a page index outside the
// pool, a bad last_page_len or length is skipped, never read) and record what
// they found in the workspace: device_errors() reports it.
//
// Supported: head dims 64/128/256, KV bf16/f16/f32, query and output
// f32/bf16/f16 (core/supported.hpp), any GQA group (query heads of a KV head
// share each K/V load, up to 8 per CTA; larger groups take several passes),
// NHD and HND pages of any size, any strides (16-byte aligned rows take the
// vector-load kernels).

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <span>

#include "hattn/core/kv_view.hpp"
#include "hattn/core/problem.hpp"
#include "hattn/core/status.hpp"
#include "hattn/cuda/plan.hpp"
#include "hattn/cuda/stream.hpp"

namespace hattn::cuda {

class DenseDecode {
 public:
  // The SM count used to size the split when none is given (H100 SXM).
  static constexpr std::int32_t kDefaultSmCount = 132;

  explicit DenseDecode(std::int32_t sm_count = kDefaultSmCount) noexcept
      : sm_count_(sm_count > 0 ? sm_count : kDefaultSmCount) {}
  // A backend sized for `device` (queries its SM count once).
  static Status for_device(int device, DenseDecode* out) noexcept;

  std::int32_t sm_count() const noexcept { return sm_count_; }

  static Status can_implement(const DecodeProblem& problem) noexcept {
    return detail::check_problem(problem);
  }
  // Bytes of device workspace plan() needs for this problem, whatever the
  // lengths (0 when the problem is not supported).
  static std::size_t workspace_size(const DecodeProblem& problem) noexcept {
    return detail::workspace_size(problem);
  }

  // Splits the step into CTAs from the host copy of the sequence lengths
  // (one per batch entry). Pure host code: no CUDA call. `device_workspace`
  // must stay allocated while the plan is used.
  Status plan(const DecodeProblem& problem, std::span<const std::int64_t> host_seq_lens,
              void* device_workspace, std::size_t workspace_bytes,
              DecodePlan* plan) const noexcept {
    return detail::make_plan(problem, host_seq_lens, sm_count_, device_workspace, workspace_bytes,
                             plan);
  }

  // Attention for one layer, enqueued on `stream`: `out` gets (o, lse2). No
  // allocation, no synchronization. Device lengths different from the planned
  // ones are still attended correctly (the last chunk takes the rest), only
  // less evenly split.
  template <KvView Kv>
  Status run(const DecodePlan& plan, const QueryView& q, const Kv& kv, const PartialView& out,
             StreamRef stream) const noexcept;

  // What the kernels found wrong since the workspace was last cleared (page
  // index outside the pool, last_page_len outside 1..page_size, negative or
  // too long length), as kInvalidArgument; then clears it. Synchronizes
  // `stream`. Zero the workspace once after allocating it (or call this once)
  // before relying on it.
  static Status device_errors(const DecodePlan& plan, StreamRef stream) noexcept;

 private:
  std::int32_t sm_count_;
};

// Error bits the kernels record in the workspace. indptr itself must address
// entries inside indices: the view does not carry its length, so an entry
// past the end cannot be detected and is read.
enum DeviceErrorBits : std::uint32_t {
  kErrorPageIndex = 1u << 0,    // page index outside [0, num_pages)
  kErrorLastPageLen = 1u << 1,  // last_page_len outside 1..page_size
  kErrorIndptr = 1u << 2,       // indptr decreasing or negative
  kErrorSeqLen = 1u << 3,       // dense length negative or over max_seq_len, or >= 2^30
  kErrorNullIndices = 1u << 4,  // a page was needed but indices is null
};

}  // namespace hattn::cuda
