#pragma once
// CudaDenseDecoder: the whole decode on one GPU (--compute cuda
// --attention cuda-dense): a CudaLlamaModel, a paged KV cache per layer in
// device memory and cuda::DenseDecode over it, on one stream.
//
// The caches are HND pages of page_size tokens in kv_dtype; sequence b owns
// the contiguous pages [b * pages_per_seq, (b + 1) * pages_per_seq), so the
// page table of a step is a function of the lengths alone. It is built on
// the host once per step (or prefill chunk), uploaded with the step's tokens,
// positions and KV slots in one copy, and shared by every layer; the
// DenseDecode plan is made once per step too.
//
// Prefill runs causal attention as decode batches (as DenseKvAttention does):
// query i of a chunk of n is a "sequence" made of the first pages of the real
// one, cut at its own position, so no page is copied.
//
// The API mirrors LlamaRunner: tokens and logits are host memory; each call
// synchronizes the stream before returning. Not thread-safe.

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "hattn/core/dtype.hpp"
#include "hattn/core/status.hpp"
#include "hattn/cuda/buffer.hpp"
#include "hattn/cuda/dense_decode.hpp"
#include "hattn/cuda/stream.hpp"
#include "hattn/model/cuda_llama.hpp"
#include "hattn/model/stage_times.hpp"

namespace hattn::model {

struct CudaDenseDecoderOptions {
  std::int32_t num_sequences = 1;
  std::int64_t max_seq_len = 0;           // capacity of each sequence, in tokens
  std::int32_t max_prefill_tokens = 256;  // prefill chunks are cut to this many tokens
  DType kv_dtype = DType::kBF16;          // bf16, f16 or f32
  std::int32_t page_size = 16;
  bool timing = true;  // per-stage cudaEvent times (times())
};

class CudaDenseDecoder {
 public:
  // Allocates the caches, buffers and stream on the model's device. The model
  // must outlive the decoder. kInvalidArgument for bad options, kNotSupported
  // for a head dim or dtype DenseDecode lacks, kOutOfMemory, kCudaError.
  static Status create(const CudaLlamaModel& model, const CudaDenseDecoderOptions& options,
                       CudaDenseDecoder* out) noexcept;

  CudaDenseDecoder() noexcept = default;
  CudaDenseDecoder(CudaDenseDecoder&&) noexcept = default;
  CudaDenseDecoder& operator=(CudaDenseDecoder&&) noexcept = default;

  const char* name() const noexcept { return "cuda-dense"; }
  std::int32_t num_sequences() const noexcept { return opt_.num_sequences; }
  // Tokens in sequence `seq`'s cache (every layer holds the same); -1 when
  // out of range.
  std::int64_t seq_len(int seq) const noexcept;
  cudaStream_t stream() const noexcept { return stream_.get(); }

  // Runs prompt `tokens` through sequence `seq` in chunks of
  // min(chunk, max_prefill_tokens); `last_logits` (host, vocab floats, may be
  // null) gets the logits of the last token. kOutOfMemory past max_seq_len,
  // kInvalidArgument for an id outside the vocabulary (nothing is run then).
  // `on_chunk(done, total)`, when set, reports progress after each chunk; if
  // it throws, prefill stops there with kInternal.
  Status prefill(int seq, std::span<const std::int32_t> tokens, std::int64_t chunk,
                 float* last_logits,
                 const std::function<void(std::int64_t, std::int64_t)>& on_chunk = {}) noexcept;

  // Benchmark-only: appends `len` generated keys and values (uniform in
  // [-1, 1), made on the device; not the CPU runner's values) to every
  // sequence of every layer without running the model.
  Status synthetic_prefill(std::int64_t len, std::uint64_t seed) noexcept;

  // One decode step: tokens[b] (host) is the next input of sequence b, for
  // every sequence; logits (host) [B][vocab].
  Status decode_step(std::span<const std::int32_t> tokens, float* logits) noexcept;

  // Bytes of K and V in the pages the sequences use (as DenseKvAttention
  // counts), and the bytes allocated for the caches.
  std::size_t kv_bytes() const noexcept;
  std::size_t kv_capacity_bytes() const noexcept { return pages_.size() * layer_bytes_; }
  // Device bytes of everything else the decoder allocated (activations,
  // scratch, workspace, tables).
  std::size_t buffer_bytes() const noexcept;

  const StageTimes& times() const noexcept { return times_; }
  void reset_times() noexcept { times_ = {}; }

 private:
  // Host staging for one upload; offsets into staging_/d_staging_.
  struct Upload {
    std::size_t tokens = 0, positions = 0, slots = 0, indptr = 0, indices = 0, last_page_len = 0;
    std::size_t bytes = 0;
  };
  Upload layout(std::int64_t n, std::int64_t nnz) const noexcept;
  Status run_tokens(std::int64_t n, const Upload& up, const std::int64_t* host_lens,
                    std::int32_t attn_batch, std::int64_t logits_row, std::int64_t logits_rows,
                    float* logits_host) noexcept;
  Status finish(Status s) noexcept;

  const CudaLlamaModel* model_ = nullptr;
  CudaDenseDecoderOptions opt_{};
  std::int64_t pages_per_seq_ = 0;
  std::size_t layer_bytes_ = 0;  // bytes of one layer's K (or V) pages
  cuda::Stream stream_;
  cuda::DenseDecode backend_;
  std::vector<cuda::DeviceBuffer> pages_;  // [layer][K, V]: 2 per layer
  cuda::DeviceBuffer x_, q_, o_, k_new_, v_new_, lse2_, logits_, workspace_, d_staging_;
  cuda::PinnedBuffer staging_, logits_host_;
  CudaStageScratch scratch_;
  CudaStageTimer timer_;
  std::vector<std::int64_t> lens_;       // per sequence
  std::vector<std::int64_t> plan_lens_;  // per query of the current step
  StageTimes times_;
};

}  // namespace hattn::model
