#pragma once
// KvAttention: the KV caches of every layer of a model and the attention
// that reads them: the seam between a model's stages and hattn's backends.
//
// A decoder calls, per layer, append() with the new tokens' k and v, then
// decode() (one query per sequence) or prefill() (causal, the last n tokens
// of one sequence). Implementations own their caches: DenseKvAttention keeps
// one HostPagePool per layer and runs cpu::DenseDecode; an LSH backend keeps
// its hash indexes next to the pages and fills them in append(); an
// orchestrated GPU/CPU split wraps one or two of these.
//
// Tensors are f32 and packed: k, v [n][Hkv][D]; q, o [B or n][Hq][D];
// lse2 [B][Hq] (base-2 log-sum-exp, for merging with other partials).

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "hattn/core/dtype.hpp"
#include "hattn/core/page_pool.hpp"
#include "hattn/core/status.hpp"
#include "hattn/cpu/dense_decode.hpp"
#include "hattn/cpu/executor.hpp"
#include "hattn/model/config.hpp"
#include "hattn/runtime/host_kv_cache.hpp"

namespace hattn::model {

class KvAttention {
 public:
  virtual ~KvAttention() = default;

  virtual const char* name() const noexcept = 0;
  virtual std::int32_t num_sequences() const noexcept = 0;
  // Tokens of sequence `seq` in layer `layer`'s cache.
  virtual std::int64_t seq_len(int layer, int seq) const noexcept = 0;
  // Appends n tokens to sequence `seq` of layer `layer`.
  virtual Status append(int layer, int seq, const float* k, const float* v, std::int64_t n) = 0;
  // One query per sequence of `seqs` (q [B][Hq][D]), each over all its keys.
  virtual Status decode(int layer, std::span<const std::int32_t> seqs, const float* q, float* o,
                        float* lse2) = 0;
  // Causal attention of the last n tokens of `seq` (already appended):
  // query i sees keys [0, len - n + i].
  virtual Status prefill(int layer, int seq, const float* q, std::int64_t n, float* o) = 0;
  // The prompt of `seq` is complete (every layer): backends that index a
  // prompt as a whole (LSH) build their index here. Prefill after this
  // continues the sequence.
  virtual Status finish_prefill(int /*seq*/) { return Status::ok(); }
  // Bytes held by the KV caches, and by any index over them.
  virtual std::size_t kv_bytes() const noexcept = 0;
  virtual std::size_t index_bytes() const noexcept { return 0; }
};

// The decode problem of a model's attention for `batch` queries: f32 q and
// o, the model's heads and head dim, KV in `kv_dtype`, default scale.
inline DecodeProblem decode_problem(const LlamaConfig& c, std::int32_t batch, DType kv_dtype) {
  DecodeProblem p;  // q and o f32, default scale
  p.batch_size = batch;
  p.num_q_heads = c.num_q_heads;
  p.num_kv_heads = c.num_kv_heads;
  p.head_dim = c.head_dim;
  p.kv_dtype = kv_dtype;
  return p;
}

struct DenseKvAttentionOptions {
  DType kv_dtype = DType::kBF16;
  std::int32_t page_size = 16;
  std::int32_t num_sequences = 1;
  std::int64_t max_seq_len = 0;           // capacity of each sequence, in tokens
  std::int32_t max_prefill_tokens = 256;  // largest n prefill() accepts
  cpu::DenseDecode::Precision precision = cpu::DenseDecode::Precision::kF32;
};

// Every key, on the CPU: cpu::DenseDecode over paged host pools, held in a
// runtime::HostKvCache (sequence s of this attention is the cache's sequence
// s) so that an orchestrated decode (model/orchestrated_runner.hpp) continues
// from the caches a prefill through this class filled.
class DenseKvAttention final : public KvAttention {
 public:
  // Throws std::invalid_argument / std::bad_alloc like HostPagePool.
  DenseKvAttention(const LlamaConfig& config, const DenseKvAttentionOptions& options,
                   const CpuExecutor& executor, CpuIsa isa = cpu_isa_default());

  const char* name() const noexcept override { return "cpu-dense"; }
  std::int32_t num_sequences() const noexcept override { return opt_.num_sequences; }
  std::int64_t seq_len(int layer, int seq) const noexcept override;
  Status append(int layer, int seq, const float* k, const float* v, std::int64_t n) override;
  Status decode(int layer, std::span<const std::int32_t> seqs, const float* q, float* o,
                float* lse2) override;
  Status prefill(int layer, int seq, const float* q, std::int64_t n, float* o) override;
  std::size_t kv_bytes() const noexcept override;

  const cpu::DenseDecode& backend() const noexcept { return backend_; }
  const DenseKvAttentionOptions& options() const noexcept { return opt_; }
  // The caches. Appending through the cache (as an orchestrator does) is
  // allowed; this class reads the lengths from it.
  runtime::HostKvCache& cache() noexcept { return cache_; }
  const runtime::HostKvCache& cache() const noexcept { return cache_; }

 private:
  // cpu::DenseDecode of `batch` queries (f32 [batch][Hq][D]) over kv.
  Status attend(const PagedKvView& kv, std::int32_t batch, const float* q, float* o, float* lse2);
  HostPagePool& pool(int layer) noexcept { return cache_.pool(layer); }
  const HostPagePool& pool(int layer) const noexcept { return cache_.pool(layer); }
  HostPagePool::SeqId id(int layer, int seq) const noexcept { return cache_.pool_seq(layer, seq); }

  LlamaConfig config_;
  DenseKvAttentionOptions opt_;
  const CpuExecutor* executor_;
  cpu::DenseDecode backend_;
  runtime::HostKvCache cache_;
  std::vector<std::byte> staging_;  // k/v converted to the pool dtype
  std::vector<std::byte> workspace_;
  std::vector<float> lse_scratch_;
  PageTable table_;
  std::vector<HostPagePool::SeqId> batch_ids_;
};

}  // namespace hattn::model
