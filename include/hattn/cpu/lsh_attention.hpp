#pragma once
// LSH-sampled decode attention on the CPU (MagicPIG), for one layer.
//
//   std::unique_ptr<LshAttention> layer;
//   LshAttention::create(config, shape, &layer);
//   layer->prefill(seq, keys, values, n, executor);   // builds the index
//   layer->append(seq, k, v, 1);                       // every step
//   layer->decode(seqs, q, out, executor);             // merged (o, lse2)
//
// Per (sequence, KV head) the tokens split into an exact part, the first
// `sink` tokens and the tail (the last `window` prefill tokens and the
// generated ones), attended exactly with the dense kernels, and the indexed
// part between them, reached only through SimHash tables: a key is sampled
// when it collides with the query in >= m of L tables, and its score is
// corrected by -ln(u + eps), u its probability of being sampled. The two
// partials are merged (o, lse2). decode_sampled() returns the sampled partial
// alone, for callers that attend the exact part elsewhere (a GPU).
//
// Centering: mu, the mean of the indexed keys of a (sequence, KV head) at the
// end of prefill, is subtracted from every key before hashing and in the
// cosine that gives u. Scores use the keys as stored: q.(k - mu) differs from
// q.k by the same constant for every key of a query, so softmax, and any
// merge of partials that all use the stored keys, is unchanged. That is why
// a caller's exact partial, computed on its own uncentered cache, merges
// with decode_sampled() exactly.
//
// Keys are expected after RoPE. The KV cache is held in a HostPagePool
// (HND pages); kv_view() exposes it to the dense backend.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

#include "hattn/core/dtype.hpp"
#include "hattn/core/kv_view.hpp"
#include "hattn/core/page_pool.hpp"
#include "hattn/core/problem.hpp"
#include "hattn/core/status.hpp"
#include "hattn/cpu/executor.hpp"
#include "hattn/cpu/isa.hpp"
#include "hattn/cpu/lsh_config.hpp"
#include "hattn/cpu/lsh_index.hpp"
#include "hattn/cpu/simhash.hpp"

namespace hattn::cpu {

// The shape of one layer and the memory it may use.
struct LshShape {
  std::int32_t num_q_heads = 0;
  std::int32_t num_kv_heads = 0;
  std::int32_t head_dim = 0;
  DType kv_dtype = DType::kBF16;
  std::int32_t layer = 0;          // mixes into per-head projections
  std::int64_t max_tokens = 0;     // KV capacity over all live sequences
  std::int32_t max_sequences = 1;  // live sequences at once (sizes page slack)
  std::int32_t page_size = 16;
  std::optional<float> sm_scale;  // default 1/sqrt(head_dim)
};

// Memory of one sequence, in bytes.
struct LshMemory {
  std::size_t kv = 0;     // K and V pages
  std::size_t index = 0;  // hash tables (offsets, positions, side tables)
  std::size_t means = 0;  // the key mean mu per KV head (|k - mu| is computed when sampled)
};

// Token ranges of a sequence that are attended exactly: [0, sink_end) and
// [tail_begin, length). Indexed: [sink_end, tail_begin).
struct LshPartition {
  std::int64_t sink_end = 0;
  std::int64_t tail_begin = 0;
  std::int64_t length = 0;
};

class LshAttention {
 public:
  using SeqId = std::int64_t;

  // kInvalidArgument for a bad config or shape, kNotSupported for a head dim
  // or dtype the kernels lack, kOutOfMemory when the pool cannot be had.
  static Status create(const LshConfig& config, const LshShape& shape,
                       std::unique_ptr<LshAttention>* out, CpuIsa isa = cpu_isa_default());

  ~LshAttention();
  LshAttention(const LshAttention&) = delete;
  LshAttention& operator=(const LshAttention&) = delete;

  const LshConfig& config() const noexcept { return config_; }
  const LshShape& shape() const noexcept { return shape_; }
  CpuIsa isa() const noexcept { return isa_; }

  // A new sequence from n prefill tokens: keys and values are
  // [n][num_kv_heads][head_dim] in the layer's KV dtype, `token_stride`
  // elements between tokens (0 = packed). Computes mu and builds the index.
  // All or nothing: on error nothing changes.
  Status prefill(SeqId seq, const void* keys, const void* values, std::int64_t n,
                 const CpuExecutor& executor, std::int64_t token_stride = 0);
  // Appends n generated tokens (same layout). When the exact tail grows past
  // max_exact_tail, its older tokens are indexed.
  Status append(SeqId seq, const void* keys, const void* values, std::int64_t n,
                std::int64_t token_stride = 0);
  Status release(SeqId seq);

  // Attention of one query per sequence: q is [B][num_q_heads][head_dim]
  // (q.batch_size == seqs.size()); out gets the merged (o, lse2). Never
  // throws: running out of memory anywhere in the step is kOutOfMemory, and
  // leaves the layer as it was (out is then undefined).
  Status decode(std::span<const SeqId> seqs, const QueryView& q, const PartialView& out,
                const CpuExecutor& executor) noexcept;
  // The sampled partial alone (lse2 = -inf where nothing is sampled).
  Status decode_sampled(std::span<const SeqId> seqs, const QueryView& q, const PartialView& out,
                        const CpuExecutor& executor) noexcept;

  // Introspection (tests, benchmarks, callers that split the work).
  bool contains(SeqId seq) const noexcept { return seqs_.count(seq) != 0; }
  Status partition(SeqId seq, LshPartition* out) const noexcept;
  Status memory(SeqId seq, LshMemory* out) const noexcept;
  // mu of (seq, kv_head): head_dim floats.
  Status mu(SeqId seq, std::int32_t kv_head, std::span<const float>* out) const noexcept;
  const LshTables* tables(SeqId seq, std::int32_t kv_head) const noexcept;
  // The projection that hashes KV head kv_head; nullptr for a head outside
  // [0, num_kv_heads).
  const SimHash* projection(std::int32_t kv_head) const noexcept;
  // Absolute positions query q (head_dim f32, query head q_head) samples,
  // ascending: what decode attends beyond the exact part.
  Status sampled_positions(SeqId seq, std::int32_t q_head, const float* q,
                           std::vector<std::int64_t>* out) const;
  // Rebuilds the index of a sequence from its stored keys (same mu): the
  // tables incremental insertion must equal.
  Status rebuild_index(SeqId seq, const CpuExecutor& executor);
  // The layer's KV cache as a paged view for a batch (dense layers, checks).
  Status kv_view(std::span<const SeqId> seqs, PageTable* table, PagedKvView* view) const;
  // The correction -ln(u + eps) the sampled scores get at this cosine (0 with
  // sample_all), as decode computes it (a table with linear interpolation).
  float score_correction(float cos) const noexcept;

  struct Impl;

 private:
  LshAttention(const LshConfig& config, const LshShape& shape, CpuIsa isa);
  Status decode_impl(std::span<const SeqId> seqs, const QueryView& q, const PartialView& out,
                     const CpuExecutor& executor, bool with_exact);

  struct Seq;
  LshConfig config_;
  LshShape shape_;
  CpuIsa isa_;
  std::unique_ptr<Impl> impl_;
  std::unordered_map<SeqId, std::unique_ptr<Seq>> seqs_;
};

}  // namespace hattn::cpu
