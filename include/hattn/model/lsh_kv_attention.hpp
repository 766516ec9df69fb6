#pragma once
// LshKvAttention: KvAttention on MagicPIG LSH-sampled attention
// (cpu::LshAttention, one per layer), with some layers kept dense.
//
// A prompt's K/V are staged per (layer, sequence) as they are appended; the
// prompt's own causal attention is exact (cpu::DenseDecode over the staged
// rows). finish_prefill(seq) hands each layer's staged prompt to
// LshAttention::prefill, which computes mu and builds the hash index, and frees
// the staging; decode() does it itself for a sequence not yet finished. After
// that, append() goes to LshAttention::append and decode() to
// LshAttention::decode (exact sink + tail merged with the sampled middle).
//
// Dense layers (MagicPIG never samples some layers: every 16th from layer 0 in
// the reference) use DenseKvAttention.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "hattn/core/dtype.hpp"
#include "hattn/core/page_pool.hpp"
#include "hattn/core/status.hpp"
#include "hattn/cpu/dense_decode.hpp"
#include "hattn/cpu/executor.hpp"
#include "hattn/cpu/lsh_attention.hpp"
#include "hattn/cpu/lsh_config.hpp"
#include "hattn/model/attention.hpp"
#include "hattn/model/config.hpp"

namespace hattn::model {

struct LshKvAttentionOptions {
  cpu::LshConfig lsh;
  DType kv_dtype = DType::kBF16;
  std::int32_t page_size = 16;
  std::int32_t num_sequences = 1;
  std::int64_t max_seq_len = 0;           // capacity of each sequence, in tokens
  std::int32_t max_prefill_tokens = 256;  // largest n prefill() accepts per batch
  cpu::DenseDecode::Precision precision = cpu::DenseDecode::Precision::kF32;
  // Layers attended densely; nullopt: every 16th from 0 (MagicPIG's default).
  std::optional<std::vector<std::int32_t>> dense_layers;
};

// The LshAttention shape of one layer of a model whose caches hold
// `num_sequences` sequences of up to `max_seq_len` tokens.
inline cpu::LshShape lsh_shape(const LlamaConfig& c, DType kv_dtype, std::int64_t max_seq_len,
                               std::int32_t num_sequences, std::int32_t page_size,
                               std::int32_t layer) {
  return {.num_q_heads = c.num_q_heads,
          .num_kv_heads = c.num_kv_heads,
          .head_dim = c.head_dim,
          .kv_dtype = kv_dtype,
          .layer = layer,
          .max_tokens = max_seq_len * num_sequences,
          .max_sequences = num_sequences,
          .page_size = page_size,
          .sm_scale = std::nullopt};
}

// MagicPIG's default: layer % 16 == 0.
std::vector<std::int32_t> default_lsh_dense_layers(std::int32_t num_layers);

// Parses a layer list: "none", "0,5,9", or an arithmetic progression "0,16,..."
// (first two terms, then every step up to num_layers). Layers >= num_layers
// are dropped. False on malformed text.
bool parse_layer_list(std::string_view text, std::int32_t num_layers,
                      std::vector<std::int32_t>* out);

// Fraction of the indexed keys that decode queries sampled.
struct LshSamplingStats {
  double fraction_sum = 0.0;  // over (query, q head) pairs with indexed keys
  std::int64_t queries = 0;
  double mean_fraction() const noexcept {
    return queries > 0 ? fraction_sum / static_cast<double>(queries) : 0.0;
  }
};

class LshKvAttention final : public KvAttention {
 public:
  // Throws std::invalid_argument (bad options or config, the Status message
  // of LshAttention::create) or std::bad_alloc.
  LshKvAttention(const LlamaConfig& config, const LshKvAttentionOptions& options,
                 const CpuExecutor& executor, CpuIsa isa = cpu_isa_default());
  ~LshKvAttention() override;

  const char* name() const noexcept override { return "lsh"; }
  std::int32_t num_sequences() const noexcept override { return opt_.num_sequences; }
  std::int64_t seq_len(int layer, int seq) const noexcept override;
  Status append(int layer, int seq, const float* k, const float* v, std::int64_t n) override;
  Status decode(int layer, std::span<const std::int32_t> seqs, const float* q, float* o,
                float* lse2) override;
  Status prefill(int layer, int seq, const float* q, std::int64_t n, float* o) override;
  Status finish_prefill(int seq) override;
  std::size_t kv_bytes() const noexcept override;
  std::size_t index_bytes() const noexcept override;

  bool is_dense_layer(int layer) const noexcept;
  // The layer's LshAttention (null for a dense layer): tests and statistics.
  const cpu::LshAttention* lsh_layer(int layer) const noexcept;
  const LshKvAttentionOptions& options() const noexcept { return opt_; }
  // When on, decode() also asks every LSH layer which keys each query head
  // samples (LshAttention::sampled_positions: a second retrieval, so it costs
  // about as much as the sampled attention; for statistics, not timing).
  void set_sampling_stats(bool on) noexcept { stats_on_ = on; }
  const LshSamplingStats& sampling_stats() const noexcept { return stats_; }

 private:
  struct Layer;
  Status seal(int layer, int seq);
  Status to_kv_dtype(const float* k, const float* v, std::int64_t n);

  LlamaConfig config_;
  LshKvAttentionOptions opt_;
  const CpuExecutor* executor_;
  cpu::DenseDecode backend_;
  std::unique_ptr<DenseKvAttention> dense_;  // the dense layers, renumbered
  std::vector<std::int32_t> dense_index_;    // [layer] -> index in dense_, or -1
  std::vector<std::unique_ptr<Layer>> layers_;
  std::vector<std::byte> staging_;
  std::vector<std::byte> workspace_;
  std::vector<float> lse_scratch_;
  std::vector<std::int32_t> lens_;
  PageTable whole_, table_;
  std::vector<cpu::LshAttention::SeqId> batch_ids_;
  bool stats_on_ = false;
  LshSamplingStats stats_;
  std::vector<std::int64_t> positions_;
};

}  // namespace hattn::model
