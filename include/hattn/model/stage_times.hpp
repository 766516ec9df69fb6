#pragma once
// Where decode time goes, accumulated by the model's stages and the driver.

namespace hattn::model {

struct StageTimes {
  double gemm_s = 0.0;       // QKV, O, MLP and lm_head projections
  double attention_s = 0.0;  // attention backends (planning included)
  double copies_s = 0.0;     // appending new K/V to the caches (dtype conversion included)
  double merge_s = 0.0;      // merging partials across devices/chunks outside a backend
  double other_s = 0.0;      // embeddings, norms, RoPE, SwiGLU, residuals

  double total_s() const noexcept { return gemm_s + attention_s + copies_s + merge_s + other_s; }
  StageTimes& operator+=(const StageTimes& o) noexcept {
    gemm_s += o.gemm_s;
    attention_s += o.attention_s;
    copies_s += o.copies_s;
    merge_s += o.merge_s;
    other_s += o.other_s;
    return *this;
  }
};

}  // namespace hattn::model
