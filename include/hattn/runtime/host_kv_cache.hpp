#pragma once
// HostKvCache: the host copy of every layer's KV cache, one HostPagePool per
// layer, with sequences that exist in all layers under one index.
// Move-only; not thread-safe (the orchestrator's CPU thread appends during a
// step, the host between steps).

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "hattn/core/dtype.hpp"
#include "hattn/core/kv_view.hpp"
#include "hattn/core/page_pool.hpp"
#include "hattn/core/status.hpp"

namespace hattn::runtime {

class HostKvCache {
 public:
  // Throws like HostPagePool's constructor, and std::invalid_argument for
  // num_layers < 1.
  HostKvCache(std::int32_t num_layers, const PagePoolOptions& per_layer) {
    if (num_layers < 1) throw std::invalid_argument("HostKvCache: num_layers must be positive");
    pools_.reserve(num_layers);
    for (std::int32_t l = 0; l < num_layers; ++l) pools_.emplace_back(per_layer);
  }

  std::int32_t num_layers() const noexcept { return static_cast<std::int32_t>(pools_.size()); }
  std::int32_t num_sequences() const noexcept { return static_cast<std::int32_t>(ids_.size()); }
  const PagePoolOptions& options() const noexcept { return pools_.front().options(); }
  HostPagePool& pool(std::int32_t layer) noexcept { return pools_[layer]; }
  const HostPagePool& pool(std::int32_t layer) const noexcept { return pools_[layer]; }

  // A new empty sequence in every layer.
  Status add_sequence(std::int32_t* seq) {
    if (seq == nullptr) return {StatusCode::kInvalidArgument, "HostKvCache: seq is null"};
    std::vector<HostPagePool::SeqId> ids(pools_.size());
    for (std::size_t l = 0; l < pools_.size(); ++l)
      HATTN_RETURN_IF_ERROR(pools_[l].create_sequence(&ids[l]));
    ids_.push_back(std::move(ids));
    *seq = static_cast<std::int32_t>(ids_.size() - 1);
    return Status::ok();
  }
  // n tokens [n][num_kv_heads][head_dim] of k and v to one layer of a sequence.
  Status append(std::int32_t layer, std::int32_t seq, const void* k, const void* v,
                std::int64_t n) {
    if (!valid(layer, seq)) return {StatusCode::kInvalidArgument, "HostKvCache: bad layer or seq"};
    return pools_[layer].append(ids_[seq][layer], k, v, n);
  }
  // Length of a sequence in a layer, or -1 for a bad index.
  std::int64_t seq_len(std::int32_t layer, std::int32_t seq) const noexcept {
    return valid(layer, seq) ? pools_[layer].seq_len(ids_[seq][layer]) : -1;
  }
  // Keep the first `len` tokens of a sequence in one layer (undoing appends of
  // a failed step); the pages past them go back to the pool. Never allocates.
  Status truncate(std::int32_t layer, std::int32_t seq, std::int64_t len) noexcept {
    const std::int64_t have = seq_len(layer, seq);
    if (have < 0 || len < 0 || len > have)
      return {StatusCode::kInvalidArgument, "HostKvCache::truncate: bad layer, seq or length"};
    return pools_[layer].truncate(ids_[seq][layer], len);
  }

  HostPagePool::SeqId pool_seq(std::int32_t layer, std::int32_t seq) const noexcept {
    return ids_[seq][layer];
  }

  // Page table of `seqs` in `layer`, keeping only the first cpu_tokens[b]
  // tokens of sequence b (the CPU's share; see runtime/partition.hpp).
  // Reuses table's vectors.
  Status build_page_table(std::int32_t layer, const std::int32_t* seqs,
                          const std::int64_t* cpu_tokens, std::int32_t batch,
                          PageTable* table) const {
    if (layer < 0 || layer >= num_layers() || table == nullptr)
      return {StatusCode::kInvalidArgument, "HostKvCache: bad layer or null table"};
    table->indptr.assign(1, 0);
    table->indices.clear();
    table->last_page_len.clear();
    const std::int32_t page = options().page_size;
    PageTable one;
    for (std::int32_t b = 0; b < batch; ++b) {
      if (!valid(layer, seqs[b]))
        return {StatusCode::kInvalidArgument, "HostKvCache: unknown sequence"};
      const HostPagePool::SeqId id = ids_[seqs[b]][layer];
      const std::int64_t len = pools_[layer].seq_len(id);
      if (cpu_tokens[b] < 0 || cpu_tokens[b] > len)
        return {StatusCode::kInvalidArgument, "HostKvCache: cpu_tokens past the sequence"};
      HATTN_RETURN_IF_ERROR(pools_[layer].build_page_table({&id, 1}, &one));
      const std::int64_t pages = (cpu_tokens[b] + page - 1) / page;
      table->indices.insert(table->indices.end(), one.indices.begin(), one.indices.begin() + pages);
      table->indptr.push_back(static_cast<std::int32_t>(table->indices.size()));
      table->last_page_len.push_back(
          pages == 0 ? 0 : static_cast<std::int32_t>(cpu_tokens[b] - (pages - 1) * page));
    }
    return Status::ok();
  }

 private:
  bool valid(std::int32_t layer, std::int32_t seq) const noexcept {
    return layer >= 0 && layer < num_layers() && seq >= 0 && seq < num_sequences();
  }
  std::vector<HostPagePool> pools_;
  std::vector<std::vector<HostPagePool::SeqId>> ids_;
};

}  // namespace hattn::runtime
