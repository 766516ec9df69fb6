#pragma once
// The host half of cuda::DenseDecode: how a decode step is split into CTAs
// (thread blocks) and where the partial results of split sequences live in the
// caller's device workspace. Pure host code with no CUDA dependency, so the
// split logic is unit-tested on machines without a GPU.
//
// A CTA attends one (sequence, KV head, pass over up to 8 of its query heads,
// KV chunk). Every sequence is cut into the same `num_chunks` chunks of
// `chunk_tokens` tokens (the last chunk takes whatever is left, so every
// token is covered whatever the device lengths are); a sequence shorter than
// the others leaves some of its CTAs an empty chunk, which costs a launch
// slot and writes an empty partial. With num_chunks > 1 the chunk partials are
// merged by a second kernel.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>

#include "hattn/core/dispatch.hpp"
#include "hattn/core/problem.hpp"
#include "hattn/core/status.hpp"
#include "hattn/core/supported.hpp"
#include "hattn/core/validate.hpp"
#include "hattn/cuda/detail/host_device.hpp"

namespace hattn::cuda {

// Query heads one CTA attends per K/V load, as compiled kernel widths: a pass
// of h heads runs the kernel of the smallest width >= h (the extra lanes of
// work are masked). Groups larger than the widest kernel take several passes.
using GroupWidths = ValueList<1, 2, 4, 8>;
inline constexpr std::int32_t kMaxGroupWidth = 8;
inline constexpr std::int32_t kThreadsPerCta = 128;

struct DecodePlan {
  DecodeProblem problem{};
  std::int32_t group_width = 0;     // compiled kernel width (GroupWidths)
  std::int32_t heads_per_pass = 0;  // query heads per CTA, <= group_width
  std::int32_t num_passes = 0;      // passes over each KV head: ceil(group / heads_per_pass)
  std::int32_t num_chunks = 0;      // chunks per sequence; 1: no split, no merge
  std::int64_t chunk_tokens = 0;    // tokens per chunk (the last one takes the rest)
  std::int64_t max_seq_len = 0;     // the longest planned sequence
  std::int64_t num_ctas = 0;        // batch * kv_heads * passes * chunks
  // In the device workspace.
  std::uint32_t* error_flags = nullptr;  // see DenseDecode::device_errors
  float* partial_lse = nullptr;          // [batch][chunk][q_head] when num_chunks > 1
  float* partial_o = nullptr;            // [batch][chunk][q_head][head_dim]

  bool planned() const noexcept { return num_chunks > 0; }
};

namespace detail {

// Chunks are multiples of this many tokens (a multiple of every kernel's
// tokens per CTA iteration).
inline constexpr std::int64_t kChunkAlign = 64;
// A sequence is not split into chunks shorter than this (each chunk adds a
// partial of head_dim + 1 floats per query head to write and merge).
inline constexpr std::int64_t kMinChunkTokens = 256;
// CTAs of a kernel of this group width resident per SM (the kernels'
// __launch_bounds__ and register counts: 4 up to width 4, 2 at width 8).
constexpr std::int64_t resident_ctas_per_sm(std::int32_t width) noexcept {
  return width <= 4 ? 4 : 2;
}
// Upper bound on the CTAs of a split step, whatever the SM count: bounds the
// partials, hence workspace_size, independently of the device.
inline constexpr std::int64_t kMaxSplitCtas = 4096;
inline constexpr std::int64_t kMaxChunks = 1024;
// Token indices are 32-bit on the device.
inline constexpr std::int64_t kMaxSeqLen = std::int64_t{1} << 30;

struct GroupSplit {
  std::int32_t width, heads_per_pass, num_passes;
};

inline GroupSplit split_group(std::int32_t group) noexcept {
  const std::int32_t passes = std::max(1, (group + kMaxGroupWidth - 1) / kMaxGroupWidth);
  const std::int32_t per_pass = (group + passes - 1) / passes;
  std::int32_t width = 1;
  while (width < per_pass) width *= 2;
  return {width, per_pass, passes};
}

// Units of work before chunking: batch * kv_heads * passes (at least 1).
inline std::int64_t work_units(const DecodeProblem& p) noexcept {
  const std::int64_t u =
      std::int64_t{p.batch_size} * p.num_kv_heads * split_group(p.group_size()).num_passes;
  return std::max<std::int64_t>(1, u);
}

// The most chunks per sequence any plan of this problem uses.
inline std::int64_t max_chunks(const DecodeProblem& p) noexcept {
  const std::int64_t units = work_units(p);
  return std::clamp<std::int64_t>((kMaxSplitCtas + units - 1) / units, 1, kMaxChunks);
}

struct ChunkSplit {
  std::int32_t num_chunks;
  std::int64_t chunk_tokens;
};

// CTAs that fill every SM once (one wave).
inline std::int64_t target_ctas(const DecodeProblem& p, std::int32_t sm_count) noexcept {
  return std::int64_t{std::max(1, sm_count)} *
         resident_ctas_per_sm(split_group(p.group_size()).width);
}

// As many chunks as fit the CTAs in one wave (equal lengths then finish
// together: a second, partial wave would nearly double the time), but no
// chunk shorter than kMinChunkTokens and no more than max_chunks(p).
inline ChunkSplit split_chunks(const DecodeProblem& p, std::int64_t max_len,
                               std::int32_t sm_count) noexcept {
  if (max_len <= 0) return {1, kChunkAlign};
  const std::int64_t units = work_units(p);
  const std::int64_t target = target_ctas(p, sm_count);
  std::int64_t chunks = std::max<std::int64_t>(1, target / units);
  chunks = std::min(chunks, std::max<std::int64_t>(1, max_len / kMinChunkTokens));
  chunks = std::min(chunks, max_chunks(p));
  std::int64_t tokens = (max_len + chunks - 1) / chunks;
  tokens = (tokens + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
  chunks = (max_len + tokens - 1) / tokens;  // rounding up may leave fewer
  return {static_cast<std::int32_t>(chunks), tokens};
}

// Tokens [begin, end) of chunk c of a sequence of `len` tokens. The last
// chunk runs to the end, so lengths beyond the planned ones are still covered.
struct TokenRange {
  std::int64_t begin, end;
};
HATTN_HOST_DEVICE TokenRange chunk_range(std::int64_t c, std::int64_t num_chunks,
                                         std::int64_t chunk_tokens, std::int64_t len) noexcept {
  const std::int64_t b = c * chunk_tokens < len ? c * chunk_tokens : len;
  const std::int64_t e =
      c + 1 == num_chunks ? len : ((c + 1) * chunk_tokens < len ? (c + 1) * chunk_tokens : len);
  return {b, e};
}

// Byte offsets of the workspace parts.
struct WorkspaceLayout {
  std::size_t error_flags = 0, partial_lse = 0, partial_o = 0, total = 0;
  explicit WorkspaceLayout(const DecodeProblem& p) noexcept {
    const auto align = [](std::size_t x) { return (x + 255) / 256 * 256; };
    const std::size_t mc = static_cast<std::size_t>(max_chunks(p));
    const std::size_t rows = mc > 1 ? static_cast<std::size_t>(p.batch_size) * mc *
                                          static_cast<std::size_t>(p.num_q_heads)
                                    : 0;
    error_flags = 0;
    partial_lse = align(sizeof(std::uint32_t));
    partial_o = partial_lse + align(rows * sizeof(float));
    total = partial_o + align(rows * static_cast<std::size_t>(p.head_dim) * sizeof(float));
  }
};

inline Status check_problem(const DecodeProblem& p) noexcept {
  HATTN_RETURN_IF_ERROR(validate(p));
  if (!contains<SupportedHeadDims>(p.head_dim))
    return {StatusCode::kNotSupported, "head_dim is not supported (64, 128, 256)"};
  if (!contains<SupportedKvDTypes>(p.kv_dtype))
    return {StatusCode::kNotSupported, "KV dtype is not supported"};
  if (!contains<SupportedQueryDTypes>(p.q_dtype))
    return {StatusCode::kNotSupported, "query dtype is not supported"};
  if (!contains<SupportedOutDTypes>(p.o_dtype))
    return {StatusCode::kNotSupported, "output dtype is not supported"};
  // Grid size: batch * kv_heads * passes * chunks CTAs in a 1-D grid.
  if (work_units(p) * max_chunks(p) > std::numeric_limits<std::int32_t>::max())
    return {StatusCode::kNotSupported, "too many (sequence, KV head) pairs for one launch"};
  return Status::ok();
}

inline std::size_t workspace_size(const DecodeProblem& p) noexcept {
  if (!check_problem(p)) return 0;
  return WorkspaceLayout(p).total;
}

// The plan of one step from the host copy of the sequence lengths.
inline Status make_plan(const DecodeProblem& p, std::span<const std::int64_t> host_seq_lens,
                        std::int32_t sm_count, void* workspace, std::size_t workspace_bytes,
                        DecodePlan* out) noexcept {
  HATTN_RETURN_IF_ERROR(check_problem(p));
  if (out == nullptr) return {StatusCode::kInvalidArgument, "plan: output plan is null"};
  if (sm_count < 1) return {StatusCode::kInvalidArgument, "plan: SM count must be positive"};
  if (host_seq_lens.size() != static_cast<std::size_t>(p.batch_size))
    return {StatusCode::kInvalidArgument, "plan: one sequence length per batch entry expected"};
  std::int64_t max_len = 0;
  for (const std::int64_t n : host_seq_lens) {
    if (n < 0) return {StatusCode::kInvalidArgument, "plan: negative sequence length"};
    if (n >= kMaxSeqLen) return {StatusCode::kNotSupported, "plan: sequence longer than 2^30"};
    max_len = std::max(max_len, n);
  }
  const WorkspaceLayout lay(p);
  if (workspace_bytes < lay.total)
    return {StatusCode::kWorkspaceTooSmall, "workspace is smaller than workspace_size()"};
  if (workspace == nullptr) return {StatusCode::kInvalidArgument, "workspace is null"};
  if (reinterpret_cast<std::uintptr_t>(workspace) % 16 != 0)
    return {StatusCode::kInvalidArgument, "workspace is not 16-byte aligned"};

  const GroupSplit gs = split_group(p.group_size());
  const ChunkSplit cs = split_chunks(p, max_len, sm_count);
  DecodePlan pl;
  pl.problem = p;
  pl.group_width = gs.width;
  pl.heads_per_pass = gs.heads_per_pass;
  pl.num_passes = gs.num_passes;
  pl.num_chunks = cs.num_chunks;
  pl.chunk_tokens = cs.chunk_tokens;
  pl.max_seq_len = max_len;
  pl.num_ctas = std::int64_t{p.batch_size} * p.num_kv_heads * gs.num_passes * cs.num_chunks;
  auto* base = static_cast<std::byte*>(workspace);
  pl.error_flags = reinterpret_cast<std::uint32_t*>(base + lay.error_flags);
  pl.partial_lse = reinterpret_cast<float*>(base + lay.partial_lse);
  pl.partial_o = reinterpret_cast<float*>(base + lay.partial_o);
  *out = pl;
  return Status::ok();
}

}  // namespace detail
}  // namespace hattn::cuda
