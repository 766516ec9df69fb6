#pragma once
// LlamaModel: the weights of a Llama-family decoder and its stages on the
// CPU (Eigen GEMMs on a CpuExecutor's threads). Attention itself is not
// here: the stages stop at q, k, v (stage A) and resume from the attention
// output (stage B), so that a driver can send attention to any backend, or an
// orchestrator can pipeline stage A / attention / stage B across devices.
//
//   x = embed(tokens)
//   for each layer:  stage_a(x) -> q, k, v (RoPE applied)
//                    attention(q, k, v) -> o        (KV cache + backend, elsewhere)
//                    stage_b(o, x): x += O o; x += MLP(norm(x))
//   logits = lm_head(norm(x))
//
// Activations are f32, row-major [tokens][features]. Weights stay in the
// file's dtype, read in place from the mapped safetensors and widened to f32
// a tile at a time inside the GEMMs.

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "hattn/core/dtype.hpp"
#include "hattn/core/status.hpp"
#include "hattn/cpu/executor.hpp"
#include "hattn/model/config.hpp"
#include "hattn/model/safetensors.hpp"
#include "hattn/model/stage_times.hpp"

namespace hattn::model {

// y[T][out] = x[T][in] W^T for W [out][in] stored in `dtype`.
struct Linear {
  const void* weight = nullptr;
  DType dtype = DType::kF32;
  std::int64_t out_features = 0;
  std::int64_t in_features = 0;
};

class StageScratch;
void linear_forward(const Linear& w, const float* x, std::int64_t num_tokens, float* y,
                    StageScratch& scratch, const CpuExecutor& executor);

struct LayerWeights {
  std::vector<float> attn_norm;  // [hidden]
  Linear q, k, v, o;
  std::vector<float> mlp_norm;  // [hidden]
  Linear gate, up, down;
};

// Buffers the stages need, owned by the caller (one per concurrent stream of
// work, e.g. per micro-batch). Grows on demand; reuse it across calls.
class StageScratch {
 public:
  StageScratch();
  ~StageScratch();
  StageScratch(StageScratch&&) noexcept;
  StageScratch& operator=(StageScratch&&) noexcept;

 private:
  friend class LlamaModel;
  friend void linear_forward(const Linear&, const float*, std::int64_t, float*, StageScratch&,
                             const CpuExecutor&);
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class LlamaModel {
 public:
  // Reads config.json and the safetensors of `dir` (single or sharded, mapped
  // and read in at once: TensorStore::open's `resident`) and checks every
  // tensor's presence and shape. Errors say which file/tensor.
  static Status load(const std::filesystem::path& dir, LlamaModel* out,
                     std::string* detail = nullptr);

  LlamaModel() = default;
  LlamaModel(LlamaModel&&) noexcept = default;
  LlamaModel& operator=(LlamaModel&&) noexcept = default;

  const LlamaConfig& config() const noexcept { return config_; }
  // Bytes of weights as stored (what one decode step streams through).
  std::size_t weight_bytes() const noexcept { return weight_bytes_; }

  // x[T][hidden] = embedding rows of `tokens`; kInvalidArgument for an id
  // outside the vocabulary.
  Status embed(std::span<const std::int32_t> tokens, float* x) const;

  // Stage A of `layer` for T tokens at `positions`: h = RMSNorm(x);
  // q = h Wq^T [T][Hq][D], k = h Wk^T, v = h Wv^T [T][Hkv][D]; RoPE on q, k.
  void stage_a(int layer, const float* x, std::int64_t num_tokens, const std::int64_t* positions,
               float* q, float* k, float* v, StageScratch& scratch, const CpuExecutor& executor,
               StageTimes* times = nullptr) const;

  // Stage B of `layer`: x += attn Wo^T; x += down(silu(gate(h)) * up(h)) with
  // h = RMSNorm(x). attn is [T][Hq * D].
  void stage_b(int layer, const float* attn, std::int64_t num_tokens, float* x,
               StageScratch& scratch, const CpuExecutor& executor,
               StageTimes* times = nullptr) const;

  // logits[T][vocab] = lm_head(RMSNorm(x)).
  void logits(const float* x, std::int64_t num_tokens, float* logits, StageScratch& scratch,
              const CpuExecutor& executor, StageTimes* times = nullptr) const;

  // RoPE in place on [T][heads][head_dim] (HF's rotate-half convention).
  void apply_rope(float* x, std::int64_t num_tokens, std::int32_t heads,
                  const std::int64_t* positions) const;
  const std::vector<double>& inv_freq() const noexcept { return inv_freq_; }

  // The weights, as loaded (for uploading them to another device). Valid
  // while the model lives. lm_head().weight == embedding().data when tied.
  const TensorRef& embedding() const noexcept { return embedding_; }
  const LayerWeights& layer(int i) const { return layers_[static_cast<std::size_t>(i)]; }
  const std::vector<float>& final_norm() const noexcept { return final_norm_; }
  const Linear& lm_head() const noexcept { return lm_head_; }

 private:
  LlamaConfig config_;
  std::unique_ptr<TensorStore> store_;  // owns the mappings the Linears point into
  TensorRef embedding_;
  std::vector<LayerWeights> layers_;
  std::vector<float> final_norm_;
  Linear lm_head_;
  std::vector<double> inv_freq_;  // [head_dim / 2], llama3 scaling applied
  std::size_t weight_bytes_ = 0;
};

// Multiplies y = x W^T on the executor, widening W a tile of rows at a time.
void linear_forward(const Linear& w, const float* x, std::int64_t num_tokens, float* y,
                    StageScratch& scratch, const CpuExecutor& executor);

// RoPE inverse frequencies of a config (Llama 3.1 scaling when configured).
std::vector<double> rope_inv_freq(const LlamaConfig& config);

}  // namespace hattn::model
