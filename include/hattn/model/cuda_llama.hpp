#pragma once
// CudaLlamaModel: the stages of LlamaModel (model/llama.hpp) on a CUDA
// device, with the same activations (f32, row-major [tokens][features]) so
// that a driver or an orchestrator can swap one for the other.
//
//   x = embed(tokens)
//   for each layer:  stage_a(x) -> q (f32), k, v (kv dtype), RoPE applied
//                    attention(q, k, v) -> o                 (elsewhere)
//                    stage_b(o, x): x += O o; x += MLP(norm(x))
//   logits = lm_head(norm(x))
//
// Weights live on the device in bf16 (converted on the host from the file's
// f32/f16/bf16) or, for testing the structure without bf16 rounding, f32.
// GEMMs are cuBLAS (cublasGemmEx): bf16 (or f32) inputs, f32 accumulation
// and output. Activations are rounded to the weight dtype right before each
// GEMM; norms, RoPE, SwiGLU and residuals stay in f32. q|k|v and gate|up are
// each one fused GEMM over concatenated weight rows.
//
// Every stage only ENQUEUES work on the given stream: pointers are device
// pointers, no call synchronizes, allocates or throws. Errors of the calls
// themselves come back as Status (kCudaError naming the call that failed);
// an out-of-vocabulary token id met by embed() on the device is recorded and
// reported by device_errors(). The stages share one cuBLAS handle (its
// stream is set per GEMM): call them from one host thread at a time.
//
// This header includes only <cuda_runtime_api.h> (cuBLAS is an
// implementation detail), like every hattn/cuda header.

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "hattn/core/dtype.hpp"
#include "hattn/core/status.hpp"
#include "hattn/cuda/buffer.hpp"
#include "hattn/cuda/stream.hpp"
#include "hattn/model/config.hpp"
#include "hattn/model/llama.hpp"
#include "hattn/model/stage_times.hpp"

struct cublasContext;  // cublasHandle_t is cublasContext*

namespace hattn::model {

struct CudaModelOptions {
  // kBF16 (the point: half the bytes, tensor cores) or kF32 (the CPU model's
  // arithmetic up to summation order: lets tests check the structure tightly).
  DType weight_dtype = DType::kBF16;
};

// Per-stage device time from CUDA events. Each mark() closes the interval
// that began at the previous mark (or start()) and files it under a stage;
// collect() waits for the last mark and adds the intervals to a StageTimes.
// Time the device spent waiting for the host to enqueue lands in the stage
// whose mark follows it.
class CudaStageTimer {
 public:
  enum class Stage : std::uint8_t { kGemm, kAttention, kCopies, kMerge, kOther };

  // Creates the events for up to `marks` marks per start()..collect() round.
  // Marks beyond that are not recorded (their time goes to the next recorded
  // one) and counted in dropped().
  Status reserve(std::size_t marks) noexcept;
  // Begins a round on `stream` (forgets any uncollected marks).
  Status start(cudaStream_t stream) noexcept;
  void mark(cudaStream_t stream, Stage stage) noexcept;
  // Waits for the round's last mark, adds its intervals to `times` and ends
  // the round. Reports the first failed record, if any.
  Status collect(StageTimes* times) noexcept;
  std::size_t dropped() const noexcept { return dropped_; }
  bool active() const noexcept { return active_; }

 private:
  std::vector<cuda::Event> events_;
  std::vector<Stage> stages_;
  std::size_t used_ = 0;
  std::size_t dropped_ = 0;
  bool active_ = false;
  Status first_error_{};
};

class CudaLlamaModel;

// Device buffers the stages need for up to capacity() tokens per call, owned
// by the caller (one per concurrent stream of work). Sized explicitly by
// reserve(); a stage called with more tokens returns kInvalidArgument.
class CudaStageScratch {
 public:
  Status reserve(const CudaLlamaModel& model, std::int64_t max_tokens) noexcept;
  std::int64_t capacity() const noexcept { return capacity_; }
  std::size_t bytes() const noexcept { return act_.size() + qkv_.size() + gu_.size(); }

 private:
  friend class CudaLlamaModel;
  cuda::DeviceBuffer act_;  // GEMM inputs in the weight dtype, [T][max(hidden, q_dim, inter)]
  cuda::DeviceBuffer qkv_;  // f32 [T][q_dim + 2 kv_dim]
  cuda::DeviceBuffer gu_;   // f32 [T][2 inter]
  std::int64_t capacity_ = 0;
  const CudaLlamaModel* model_ = nullptr;
  std::uint64_t generation_ = 0;  // the model's, at reserve(): a re-created model differs
};

class CudaLlamaModel {
 public:
  // Uploads every weight of `host` to `device` (made current). The host model
  // may be destroyed afterwards. kInvalidArgument for a bad weight dtype or
  // sizes past cuBLAS's 32-bit dimensions, kOutOfMemory, kCudaError.
  static Status create(const LlamaModel& host, int device, CudaLlamaModel* out,
                       const CudaModelOptions& options = {}) noexcept;

  CudaLlamaModel() noexcept = default;
  ~CudaLlamaModel();
  CudaLlamaModel(CudaLlamaModel&& other) noexcept;
  CudaLlamaModel& operator=(CudaLlamaModel&& other) noexcept;
  CudaLlamaModel(const CudaLlamaModel&) = delete;
  CudaLlamaModel& operator=(const CudaLlamaModel&) = delete;

  bool created() const noexcept { return handle_ != nullptr; }
  const LlamaConfig& config() const noexcept { return config_; }
  int device() const noexcept { return device_; }
  DType weight_dtype() const noexcept { return weight_dtype_; }
  // Device bytes of the weights (tied embeddings counted once).
  std::size_t device_bytes() const noexcept { return device_bytes_; }

  // d_x[T][hidden] = embedding rows of d_tokens[T]. An id outside the
  // vocabulary gives a zero row and is recorded for device_errors().
  Status embed(const std::int32_t* d_tokens, std::int64_t num_tokens, float* d_x,
               cudaStream_t stream, CudaStageTimer* timer = nullptr) const noexcept;

  // h = RMSNorm(x); [q | k | v] = h [Wq | Wk | Wv]^T; RoPE on q and k at
  // d_positions[T]. q f32 [T][Hq][D]; k, v [T][Hkv][D] in kv_dtype.
  Status stage_a(int layer, const float* d_x, std::int64_t num_tokens,
                 const std::int64_t* d_positions, float* d_q, void* d_k, void* d_v, DType kv_dtype,
                 CudaStageScratch& scratch, cudaStream_t stream,
                 CudaStageTimer* timer = nullptr) const noexcept;

  // x += attn Wo^T; x += down(silu(gate(h)) * up(h)), h = RMSNorm(x).
  // attn is f32 [T][Hq * D].
  Status stage_b(int layer, const float* d_attn, std::int64_t num_tokens, float* d_x,
                 CudaStageScratch& scratch, cudaStream_t stream,
                 CudaStageTimer* timer = nullptr) const noexcept;

  // d_logits[T][vocab] = lm_head(RMSNorm(x)).
  Status logits(const float* d_x, std::int64_t num_tokens, float* d_logits,
                CudaStageScratch& scratch, cudaStream_t stream,
                CudaStageTimer* timer = nullptr) const noexcept;

  // Whether embed() met a token id outside the vocabulary since the last call
  // (kInvalidArgument), then clears the record. Synchronizes `stream`.
  Status device_errors(cudaStream_t stream) const noexcept;

 private:
  friend class CudaStageScratch;
  struct Layer {
    cuda::DeviceBuffer attn_norm, mlp_norm;  // f32 [hidden]
    cuda::DeviceBuffer qkv;                  // [q_dim + 2 kv_dim][hidden]
    cuda::DeviceBuffer o;                    // [hidden][q_dim]
    cuda::DeviceBuffer gate_up;              // [2 inter][hidden]: gate rows, then up rows
    cuda::DeviceBuffer down;                 // [hidden][inter]
  };
  Status gemm(const void* w, std::int64_t out_features, std::int64_t in_features, const void* x,
              std::int64_t num_tokens, float* y, float beta, cudaStream_t stream,
              const char* what) const noexcept;
  Status check_scratch(const CudaStageScratch& scratch, std::int64_t num_tokens) const noexcept;
  void reset() noexcept;

  LlamaConfig config_{};
  int device_ = 0;
  DType weight_dtype_ = DType::kBF16;
  std::uint64_t generation_ = 0;  // unique per create(): scratch checks it
  cublasContext* handle_ = nullptr;
  cuda::DeviceBuffer embedding_;  // [vocab][hidden], weight dtype
  cuda::DeviceBuffer lm_head_;    // [vocab][hidden], empty when tied to embedding_
  cuda::DeviceBuffer final_norm_;
  cuda::DeviceBuffer inv_freq_;  // f64 [head_dim / 2]
  cuda::DeviceBuffer error_word_;
  std::vector<Layer> layers_;
  std::size_t device_bytes_ = 0;
};

}  // namespace hattn::model
