#pragma once
// LshCpuAttention: the MagicPIG backend (cpu::LshAttention, one per layer) as
// the orchestrator's CPU attention backend (runtime/cpu_attention.hpp).
//
// Each task appends the step's new k, v (task.new_k/new_v, from the ring slot)
// to the layer's LshAttention, which indexes its older tail tokens as they
// age, then either
//   - decode(): the whole sequence on the CPU (sink + tail exact, the middle
//     sampled), when the partition policy gives the CPU every token; or
//   - the CPU attends the sink exactly (dense kernels over the host KV) and
//     the indexed middle sampled (decode_sampled), merged, while the device
//     attends the exact tail [tail_begin, len): the split MagicPIG runs,
//     selected by policy(dense_layers). The CPU's share must then be exactly
//     [0, tail_begin) of every sequence; a mismatch is a kInternal error; or
//   - nothing (o = 0, lse2 = -inf), when the device attends every token (the
//     dense layers of policy()); the token is still appended so the index
//     stays in step with the cache.
//
// The host KV and the LSH KV: cpu::LshAttention keeps its own KV pages (it
// cannot read another pool), so the tokens are stored twice, once in the
// orchestrator's HostKvCache and once here. The HostKvCache stays the
// source of truth: prefill_from_cache() builds every sequence's index from
// it, the sink of the split mode is read from it, and after a failed step
// (the orchestrator truncates the HostKvCache; LshAttention has no truncate)
// a sequence whose LSH length no longer matches is rebuilt from it by replay:
// the same prefill, then the generated tokens appended one by one as the
// steps did, so the rebuilt index is bitwise the one a cache that never saw
// the failed step holds. Removing the double storage needs a LshAttention
// that attends over a caller's pool (or a truncate); see docs/orchestrator.md.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "hattn/core/dtype.hpp"
#include "hattn/core/kv_view.hpp"
#include "hattn/core/merge.hpp"
#include "hattn/core/page_pool.hpp"
#include "hattn/core/problem.hpp"
#include "hattn/core/status.hpp"
#include "hattn/cpu/dense_decode.hpp"
#include "hattn/cpu/executor.hpp"
#include "hattn/cpu/isa.hpp"
#include "hattn/cpu/lsh_attention.hpp"
#include "hattn/cpu/lsh_config.hpp"
#include "hattn/runtime/cpu_attention.hpp"
#include "hattn/runtime/host_kv_cache.hpp"
#include "hattn/runtime/partition.hpp"

namespace hattn::runtime {

class LshCpuAttention {
 public:
  // One LshAttention per layer of `kv` (shape.layer is set per layer; the
  // shape's heads, head dim and dtype must match the cache), except the
  // `dense_layers`, which the CPU attends densely over the host KV (MagicPIG
  // keeps some layers dense: model/lsh_kv_attention.hpp's default is every
  // 16th). `max_batch`: the largest micro-batch. Borrows `kv`, which must
  // outlive this. Throws std::invalid_argument / std::runtime_error when a
  // layer cannot be made.
  // `isa` and `precision`: the kernels of the LSH layers and of the dense
  // ones (and of the split mode's sink).
  LshCpuAttention(const cpu::LshConfig& config, const cpu::LshShape& shape, const HostKvCache& kv,
                  std::int32_t max_batch, std::span<const std::int32_t> dense_layers = {},
                  CpuIsa isa = cpu_isa_default(),
                  cpu::DenseDecode::Precision precision = cpu::DenseDecode::Precision::kF32)
      : config_(config),
        kv_(&kv),
        dense_(DecodeProblem{.batch_size = max_batch,
                             .num_q_heads = shape.num_q_heads,
                             .num_kv_heads = shape.num_kv_heads,
                             .head_dim = shape.head_dim,
                             .kv_dtype = shape.kv_dtype,
                             .sm_scale = shape.sm_scale},
               cpu::DenseDecode(isa, precision)) {
    const PagePoolOptions& po = kv.options();
    if (po.num_kv_heads != shape.num_kv_heads || po.head_dim != shape.head_dim ||
        po.dtype != shape.kv_dtype)
      throw std::invalid_argument("LshCpuAttention: shape differs from the host KV cache");
    if (max_batch < 1) throw std::invalid_argument("LshCpuAttention: max_batch must be positive");
    layers_.resize(static_cast<std::size_t>(kv.num_layers()));
    prefill_len_.resize(layers_.size());
    for (std::int32_t l : dense_layers)
      if (l < 0 || l >= kv.num_layers())
        throw std::invalid_argument("LshCpuAttention: dense layer out of range");
    for (std::int32_t l = 0; l < kv.num_layers(); ++l) {
      if (std::find(dense_layers.begin(), dense_layers.end(), l) != dense_layers.end()) continue;
      cpu::LshShape s = shape;
      s.layer = l;
      const Status st =
          cpu::LshAttention::create(config, s, &layers_[static_cast<std::size_t>(l)], isa);
      if (!st) throw std::runtime_error(std::string("LshCpuAttention: ") + st.message());
    }
    const std::size_t n = static_cast<std::size_t>(max_batch) * shape.num_q_heads;
    sink_o_.resize(n * shape.head_dim);
    sampled_o_.resize(n * shape.head_dim);
    sink_lse2_.resize(n);
    sampled_lse2_.resize(n);
    ids_.reserve(static_cast<std::size_t>(max_batch));
    sink_ends_.reserve(static_cast<std::size_t>(max_batch));
  }

  // Builds the index of every sequence of the host KV cache (all layers) from
  // its current tokens, which count as the prompt. Call once before the first
  // step, and for sequences added later, prefill_from_cache(seq).
  Status prefill_from_cache(const CpuExecutor& executor) {
    for (std::int32_t s = 0; s < kv_->num_sequences(); ++s)
      HATTN_RETURN_IF_ERROR(prefill_from_cache(s, executor));
    return Status::ok();
  }
  Status prefill_from_cache(std::int32_t seq, const CpuExecutor& executor) {
    for (std::int32_t l = 0; l < kv_->num_layers(); ++l) {
      const std::int64_t n = kv_->seq_len(l, seq);
      if (n < 0) return {StatusCode::kInvalidArgument, "LshCpuAttention: unknown sequence"};
      if (is_dense_layer(l)) continue;
      HATTN_RETURN_IF_ERROR(rebuild(l, seq, n, n, executor));
    }
    return Status::ok();
  }

  // Brings every layer's copy of every sequence to the host KV's tokens. The
  // attend path does this per sequence by itself; a host using policy() calls
  // it after a failed step (once wait_idle() returned OK), since the policy
  // reads the LSH state to split the next step.
  Status resync(const CpuExecutor& executor) {
    try {
      for (std::int32_t l = 0; l < kv_->num_layers(); ++l)
        for (std::int32_t s = 0; s < kv_->num_sequences() && !is_dense_layer(l); ++s)
          HATTN_RETURN_IF_ERROR(sync(l, s, kv_->seq_len(l, s), executor));
    } catch (...) {
      return {StatusCode::kOutOfMemory, "LshCpuAttention: cannot allocate"};
    }
    return Status::ok();
  }

  // Layer l's LshAttention; a dense layer has none.
  cpu::LshAttention& layer(std::int32_t l) noexcept {
    return *layers_[static_cast<std::size_t>(l)];
  }
  const cpu::LshAttention* lsh_layer(std::int32_t l) const noexcept {
    return l >= 0 && static_cast<std::size_t>(l) < layers_.size()
               ? layers_[static_cast<std::size_t>(l)].get()
               : nullptr;
  }
  bool is_dense_layer(std::int32_t l) const noexcept { return lsh_layer(l) == nullptr; }

  // Bytes of the LSH layers' indexes (hash tables, key means mu), and of
  // their KV copies.
  std::size_t index_bytes() const noexcept { return memory_of(&cpu::LshMemory::index, true); }
  std::size_t lsh_kv_bytes() const noexcept { return memory_of(&cpu::LshMemory::kv, false); }

  // When on, every decode task also asks each LSH layer which keys each
  // query head samples (a second retrieval: statistics, not timing) and
  // accumulates the fraction of the indexed keys it sampled.
  struct SamplingStats {
    double fraction_sum = 0.0;  // over (query, q head) pairs with indexed keys
    std::int64_t queries = 0;
    double mean_fraction() const noexcept {
      return queries > 0 ? fraction_sum / static_cast<double>(queries) : 0.0;
    }
  };
  void set_sampling_stats(bool on) noexcept { stats_on_ = on; }
  const SamplingStats& sampling_stats() const noexcept { return stats_; }

  // The split MagicPIG partition: layers < dense_layers all on the device;
  // the others give the device the LSH exact tail [tail_begin, len) (as it
  // will be once this step's token is appended) and the CPU the rest. Reads
  // the LSH state between steps (the orchestrator evaluates the policy before
  // it issues a step), so it must not be used while a step runs.
  PartitionPolicy policy(std::int32_t dense_layers = 0) const {
    return PartitionPolicy([this, dense_layers](std::int32_t layer, std::int32_t seq,
                                                std::int64_t len) -> std::int64_t {
      if (layer < dense_layers || is_dense_layer(layer)) return 0;
      cpu::LshPartition p;
      if (!layers_[static_cast<std::size_t>(layer)]->partition(seq, &p) || p.length + 1 != len)
        return len;  // unknown or out of step: all on the CPU (attend() resynchronizes)
      return tail_begin_after_append(p, len);
    });
  }

  Status attend(const CpuAttentionTask& t, const CpuExecutor& executor) noexcept {
    if (t.layer < 0 || static_cast<std::size_t>(t.layer) >= layers_.size())
      return {StatusCode::kInvalidArgument, "LshCpuAttention: bad layer"};
    if (is_dense_layer(t.layer)) return dense_.attend(t, executor);
    if (t.new_k == nullptr || t.new_v == nullptr)
      return {StatusCode::kInvalidArgument, "LshCpuAttention: the task carries no new k/v"};
    const auto B = static_cast<std::size_t>(t.problem.batch_size);
    if (t.seqs.size() != B || t.seq_lens.size() != B ||
        B > sink_lse2_.size() / static_cast<std::size_t>(t.problem.num_q_heads))
      return {StatusCode::kInvalidArgument, "LshCpuAttention: bad task batch"};
    cpu::LshAttention& lsh = *layers_[static_cast<std::size_t>(t.layer)];
    const std::size_t row =
        size_of(t.problem.kv_dtype) * t.problem.num_kv_heads * t.problem.head_dim;
    const std::int64_t n = t.appended_tokens;
    bool any_cpu = false, all_cpu = true;
    try {
      ids_.clear();
      for (std::size_t b = 0; b < B; ++b) {
        const std::int32_t seq = t.seqs[b];
        HATTN_RETURN_IF_ERROR(sync(t.layer, seq, t.seq_lens[b] - n, executor));
        HATTN_RETURN_IF_ERROR(lsh.append(seq, static_cast<const std::byte*>(t.new_k) + b * row * n,
                                         static_cast<const std::byte*>(t.new_v) + b * row * n, n));
        ids_.push_back(seq);
        const std::int64_t cpu = cpu_tokens(t.kv, static_cast<std::int32_t>(b));
        any_cpu = any_cpu || cpu > 0;
        all_cpu = all_cpu && cpu == t.seq_lens[b];
      }
    } catch (...) {
      return {StatusCode::kOutOfMemory, "LshCpuAttention: cannot allocate"};
    }
    if (all_cpu) {
      HATTN_RETURN_IF_ERROR(lsh.decode(ids_, t.q, t.out, executor));
      return stats_on_ ? record_stats(t, lsh) : Status::ok();
    }
    if (!any_cpu) return empty(t.out);
    return attend_split(t, lsh, executor);
  }

 private:
  std::size_t memory_of(std::size_t cpu::LshMemory::*field, bool with_means) const noexcept {
    std::size_t total = 0;
    for (const auto& l : layers_)
      for (std::int32_t s = 0; l && s < kv_->num_sequences(); ++s) {
        cpu::LshMemory m;
        if (l->contains(s) && l->memory(s, &m).is_ok())
          total += m.*field + (with_means ? m.means : 0);
      }
    return total;
  }

  Status record_stats(const CpuAttentionTask& t, const cpu::LshAttention& lsh) noexcept {
    const std::int32_t H = t.problem.num_q_heads;
    try {
      for (std::size_t b = 0; b < ids_.size(); ++b) {
        cpu::LshPartition part;
        HATTN_RETURN_IF_ERROR(lsh.partition(ids_[b], &part));
        const std::int64_t indexed = part.tail_begin - part.sink_end;
        if (indexed <= 0) continue;
        for (std::int32_t h = 0; h < H; ++h) {
          const float* q = static_cast<const float*>(t.q.data) +
                           static_cast<std::int64_t>(b) * t.q.stride_batch + h * t.q.stride_head;
          HATTN_RETURN_IF_ERROR(lsh.sampled_positions(ids_[b], h, q, &positions_));
          stats_.fraction_sum +=
              static_cast<double>(positions_.size()) / static_cast<double>(indexed);
          ++stats_.queries;
        }
      }
    } catch (...) {
      return {StatusCode::kOutOfMemory, "LshCpuAttention: sampling statistics: out of memory"};
    }
    return Status::ok();
  }

  // Where the exact tail begins once one token is appended to a sequence in
  // state p (cpu::LshAttention::append's rule; attend_split checks it).
  std::int64_t tail_begin_after_append(const cpu::LshPartition& p, std::int64_t len) const {
    if (len - p.tail_begin <= config_.max_exact_tail) return p.tail_begin;
    std::int64_t from = p.tail_begin;
    if (p.tail_begin == p.sink_end)
      from = std::max(from, std::min<std::int64_t>(config_.sink, len));
    const std::int64_t to = len - config_.window;
    return to > from ? to : from;
  }

  static std::int64_t cpu_tokens(const PagedKvView& kv, std::int32_t b) noexcept {
    const std::int64_t pages = kv.indptr[b + 1] - kv.indptr[b];
    return pages == 0 ? 0 : (pages - 1) * kv.page_size + kv.last_page_len[b];
  }

  static Status empty(const PartialView& out) noexcept {
    for (std::int32_t b = 0; b < out.batch_size; ++b)
      for (std::int32_t h = 0; h < out.num_heads; ++h) {
        float* o = static_cast<float*>(out.o) +
                   (static_cast<std::int64_t>(b) * out.num_heads + h) * out.head_dim;
        std::fill(o, o + out.head_dim, 0.0f);
        out.lse2[static_cast<std::int64_t>(b) * out.num_heads + h] = -INFINITY;
      }
    return Status::ok();
  }

  // The sink exactly over the host KV, the indexed middle sampled, merged.
  Status attend_split(const CpuAttentionTask& t, cpu::LshAttention& lsh,
                      const CpuExecutor& executor) noexcept {
    const std::int32_t B = t.problem.batch_size, H = t.problem.num_q_heads, D = t.problem.head_dim;
    try {
      sink_ends_.clear();
      for (std::int32_t b = 0; b < B; ++b) {
        cpu::LshPartition p;
        HATTN_RETURN_IF_ERROR(lsh.partition(t.seqs[static_cast<std::size_t>(b)], &p));
        if (cpu_tokens(t.kv, b) != p.tail_begin)
          return {StatusCode::kInternal,
                  "LshCpuAttention: the partition policy's CPU share is not the LSH sink + "
                  "indexed range (use LshCpuAttention::policy)"};
        sink_ends_.push_back(p.sink_end);
      }
      HATTN_RETURN_IF_ERROR(
          kv_->build_page_table(t.layer, t.seqs.data(), sink_ends_.data(), B, &sink_table_));
    } catch (...) {
      return {StatusCode::kOutOfMemory, "LshCpuAttention: cannot allocate"};
    }
    const PartialView sink =
        make_partial_view(sink_o_.data(), DType::kF32, sink_lse2_.data(), B, H, D);
    const PartialView sampled =
        make_partial_view(sampled_o_.data(), DType::kF32, sampled_lse2_.data(), B, H, D);
    CpuAttentionTask st = t;
    st.kv = kv_->pool(t.layer).view(sink_table_);
    st.out = sink;
    HATTN_RETURN_IF_ERROR(dense_.attend(st, executor));
    HATTN_RETURN_IF_ERROR(lsh.decode_sampled(ids_, t.q, sampled, executor));
    return merge_partials(sink, sampled, t.out);
  }

  // Bring the LSH copy of (layer, seq) to `len` tokens of the host KV. In
  // step it already is; behind (tokens added to the cache outside the
  // orchestrator), the missing ones are appended; ahead (a failed step was
  // rolled back), the sequence is rebuilt by replay.
  Status sync(std::int32_t layer, std::int32_t seq, std::int64_t len, const CpuExecutor& ex) {
    cpu::LshAttention& lsh = *layers_[static_cast<std::size_t>(layer)];
    cpu::LshPartition p;
    if (!lsh.partition(seq, &p)) return rebuild(layer, seq, len, len, ex);
    if (p.length == len) return Status::ok();
    if (p.length > len) return rebuild(layer, seq, len, prefill_of(layer, seq, len), ex);
    HATTN_RETURN_IF_ERROR(gather(layer, seq, p.length, len));
    return append_one_by_one(lsh, seq, len - p.length);
  }

  std::int64_t prefill_of(std::int32_t layer, std::int32_t seq, std::int64_t len) const {
    const auto& v = prefill_len_[static_cast<std::size_t>(layer)];
    const std::int64_t p =
        static_cast<std::size_t>(seq) < v.size() ? v[static_cast<std::size_t>(seq)] : len;
    return std::min(p, len);
  }

  // (Re)creates (layer, seq) from the first `len` host KV tokens: a prefill
  // of the first `prefill` tokens, then the rest one token at a time.
  Status rebuild(std::int32_t layer, std::int32_t seq, std::int64_t len, std::int64_t prefill,
                 const CpuExecutor& ex) {
    cpu::LshAttention& lsh = *layers_[static_cast<std::size_t>(layer)];
    if (lsh.contains(seq)) HATTN_RETURN_IF_ERROR(lsh.release(seq));
    HATTN_RETURN_IF_ERROR(gather(layer, seq, 0, len));
    HATTN_RETURN_IF_ERROR(lsh.prefill(seq, k_.data(), v_.data(), prefill, ex));
    auto& pl = prefill_len_[static_cast<std::size_t>(layer)];
    if (pl.size() <= static_cast<std::size_t>(seq)) pl.resize(static_cast<std::size_t>(seq) + 1, 0);
    pl[static_cast<std::size_t>(seq)] = prefill;
    const std::size_t row = row_bytes();
    return append_one_by_one(lsh, seq, len - prefill, prefill * row);
  }

  Status append_one_by_one(cpu::LshAttention& lsh, std::int32_t seq, std::int64_t n,
                           std::size_t offset = 0) {
    const std::size_t row = row_bytes();
    for (std::int64_t i = 0; i < n; ++i)
      HATTN_RETURN_IF_ERROR(
          lsh.append(seq, k_.data() + offset + i * row, v_.data() + offset + i * row, 1));
    return Status::ok();
  }

  std::size_t row_bytes() const noexcept {
    const PagePoolOptions& o = kv_->options();
    return size_of(o.dtype) * static_cast<std::size_t>(o.num_kv_heads) * o.head_dim;
  }

  // Tokens [begin, end) of (layer, seq) of the host KV into k_, v_ packed
  // [n][num_kv_heads][head_dim].
  Status gather(std::int32_t layer, std::int32_t seq, std::int64_t begin, std::int64_t end) {
    if (kv_->seq_len(layer, seq) < end)
      return {StatusCode::kInternal, "LshCpuAttention: host KV is shorter than the LSH copy"};
    const PagePoolOptions& o = kv_->options();
    const std::size_t es = size_of(o.dtype), row = row_bytes();
    k_.resize(static_cast<std::size_t>(end - begin) * row);
    v_.resize(k_.size());
    const HostPagePool::SeqId id = kv_->pool_seq(layer, seq);
    HATTN_RETURN_IF_ERROR(kv_->pool(layer).build_page_table({&id, 1}, &gather_table_));
    const PagedKvView view = kv_->pool(layer).view(gather_table_);
    for (std::int64_t t = begin; t < end; ++t) {
      const std::int64_t page = gather_table_.indices[static_cast<std::size_t>(t / o.page_size)];
      for (std::int32_t h = 0; h < o.num_kv_heads; ++h) {
        const std::int64_t kat = page * view.k_strides.outer +
                                 (t % o.page_size) * view.k_strides.token + h * view.k_strides.head;
        const std::int64_t vat = page * view.v_strides.outer +
                                 (t % o.page_size) * view.v_strides.token + h * view.v_strides.head;
        const std::size_t dst = (t - begin) * row + static_cast<std::size_t>(h) * o.head_dim * es;
        std::memcpy(k_.data() + dst, static_cast<const std::byte*>(view.k) + kat * es,
                    o.head_dim * es);
        std::memcpy(v_.data() + dst, static_cast<const std::byte*>(view.v) + vat * es,
                    o.head_dim * es);
      }
    }
    return Status::ok();
  }

  cpu::LshConfig config_;
  const HostKvCache* kv_;
  DenseCpuAttention dense_;  // the sink of the split mode
  std::vector<std::unique_ptr<cpu::LshAttention>> layers_;
  std::vector<std::vector<std::int64_t>> prefill_len_;  // [layer][seq]
  // Scratch (the CPU attention thread's).
  std::vector<cpu::LshAttention::SeqId> ids_;
  std::vector<std::int64_t> sink_ends_;
  PageTable sink_table_, gather_table_;
  std::vector<float> sink_o_, sampled_o_, sink_lse2_, sampled_lse2_;
  std::vector<std::byte> k_, v_;
  bool stats_on_ = false;
  SamplingStats stats_;
  std::vector<std::int64_t> positions_;
};

static_assert(CpuAttentionBackend<LshCpuAttention>);

}  // namespace hattn::runtime
