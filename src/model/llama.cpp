#include "hattn/model/llama.hpp"

#include <tbb/enumerable_thread_specific.h>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <numbers>

#include "hattn/cpu/isa.hpp"
#include "model/gemv.hpp"

namespace hattn::model {
namespace {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Clock = std::chrono::steady_clock;

void set_detail(std::string* detail, std::string text) {
  if (detail) *detail = std::move(text);
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Widen n elements of a (possibly unaligned) buffer of `dtype` to f32.
void widen(const void* src, DType dtype, std::int64_t n, float* dst) {
  switch (dtype) {
    case DType::kF32: std::memcpy(dst, src, static_cast<std::size_t>(n) * 4); return;
    case DType::kBF16: {
      const auto* s = static_cast<const unsigned char*>(src);
      for (std::int64_t i = 0; i < n; ++i) {
        std::uint16_t b;
        std::memcpy(&b, s + 2 * i, 2);
        const std::uint32_t u = std::uint32_t{b} << 16;
        std::memcpy(dst + i, &u, 4);
      }
      return;
    }
    case DType::kF16: {
      const auto* s = static_cast<const unsigned char*>(src);
      for (std::int64_t i = 0; i < n; ++i) {
        f16 h;
        std::memcpy(&h.bits, s + 2 * i, 2);
        dst[i] = to_float(h);
      }
      return;
    }
  }
}

void rms_norm(const float* x, std::int64_t rows, std::int64_t n, const float* weight, float eps,
              float* y) {
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    float ss = 0.0f;
    for (std::int64_t i = 0; i < n; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
    for (std::int64_t i = 0; i < n; ++i) yr[i] = weight[i] * (xr[i] * inv);
  }
}

}  // namespace

struct StageScratch::Impl {
  std::vector<float> h, gate, up;
  tbb::enumerable_thread_specific<std::vector<float>> tiles;  // widened weight rows, per thread
};

StageScratch::StageScratch() : impl_(std::make_unique<Impl>()) {}
StageScratch::~StageScratch() = default;
StageScratch::StageScratch(StageScratch&&) noexcept = default;
StageScratch& StageScratch::operator=(StageScratch&&) noexcept = default;

void linear_forward(const Linear& w, const float* x, std::int64_t num_tokens, float* y,
                    StageScratch& scratch, const CpuExecutor& executor) {
  const std::int64_t in = w.in_features, out = w.out_features;
  if (num_tokens <= detail::kGemvMaxTokens) {
    // Few tokens: bound by reading W; the fused kernel reads it once, as
    // stored, and computes each token's row the same way whatever the batch.
    const CpuIsa isa = cpu_isa_default();
    const auto gemv = isa == CpuIsa::kAvx512 ? detail::gemv_rows_avx512
                      : isa == CpuIsa::kAvx2 ? detail::gemv_rows_avx2
                                             : detail::gemv_rows_scalar;
    constexpr std::int64_t kRows = 32;
    executor.parallel_for((out + kRows - 1) / kRows, [&](std::int64_t t) {
      gemv(w.weight, w.dtype, in, t * kRows, std::min(out, (t + 1) * kRows), x, num_tokens, y, out);
    });
    return;
  }
  // Prefill reuses each weight tile for many tokens: widen a tile of 128 rows
  // once and let Eigen's GEMM run over all tokens.
  const std::int64_t rows = 128;
  const std::int64_t tiles = (out + rows - 1) / rows;
  const std::size_t elem = size_of(w.dtype);
  const Eigen::Map<const RowMatrix> xm(x, num_tokens, in);
  executor.parallel_for(tiles, [&](std::int64_t t) {
    const std::int64_t r0 = t * rows, nr = std::min(rows, out - r0);
    std::vector<float>& buf = scratch.impl_->tiles.local();
    if (buf.size() < static_cast<std::size_t>(nr * in))
      buf.resize(static_cast<std::size_t>(rows * in));
    widen(static_cast<const unsigned char*>(w.weight) + static_cast<std::size_t>(r0 * in) * elem,
          w.dtype, nr * in, buf.data());
    const Eigen::Map<const RowMatrix> wt(buf.data(), nr, in);
    Eigen::Map<RowMatrix, 0, Eigen::OuterStride<>> ym(y + r0, num_tokens, nr,
                                                      Eigen::OuterStride<>(out));
    ym.noalias() = xm * wt.transpose();
  });
}

std::vector<double> rope_inv_freq(const LlamaConfig& c) {
  const std::int32_t half = c.head_dim / 2;
  std::vector<double> inv(static_cast<std::size_t>(half));
  for (std::int32_t i = 0; i < half; ++i)
    inv[static_cast<std::size_t>(i)] =
        1.0 / std::pow(c.rope_theta, 2.0 * i / static_cast<double>(c.head_dim));
  if (c.rope_scaling == RopeScaling::kLlama3) {
    // Llama 3.1: long wavelengths are divided by `factor`, short ones kept,
    // the band between interpolated smoothly.
    const double low_wavelen = c.rope_original_max_position / c.rope_low_freq_factor;
    const double high_wavelen = c.rope_original_max_position / c.rope_high_freq_factor;
    for (double& f : inv) {
      const double wavelen = 2.0 * std::numbers::pi / f;
      if (wavelen > low_wavelen) {
        f /= c.rope_factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth = (c.rope_original_max_position / wavelen - c.rope_low_freq_factor) /
                              (c.rope_high_freq_factor - c.rope_low_freq_factor);
        f = (1.0 - smooth) * f / c.rope_factor + smooth * f;
      }
    }
  }
  return inv;
}

Status LlamaModel::load(const std::filesystem::path& dir, LlamaModel* out, std::string* detail) {
  LlamaModel m;
  HATTN_RETURN_IF_ERROR(load_llama_config(dir, &m.config_, detail));
  m.store_ = std::make_unique<TensorStore>();
  std::string inner;
  // Resident: every weight is read each decode step, so read them in now (the
  // load time says what the disk costs) rather than during the first steps.
  if (Status s = TensorStore::open(dir, m.store_.get(), &inner, /*resident=*/true); !s) {
    set_detail(detail, inner);
    return s;
  }
  const LlamaConfig& c = m.config_;
  const std::int64_t h = c.hidden_size;
  const auto fail = [&](const Status& s) {
    set_detail(detail, dir.string() + ": " + inner);
    return s;
  };
  const auto linear = [&](const std::string& name, std::int64_t rows, std::int64_t cols,
                          Linear* l) -> Status {
    TensorRef t;
    const std::int64_t shape[] = {rows, cols};
    HATTN_RETURN_IF_ERROR(m.store_->get(name, shape, &t, &inner));
    *l = {t.data, t.dtype, rows, cols};
    m.weight_bytes_ += static_cast<std::size_t>(t.numel()) * size_of(t.dtype);
    return Status::ok();
  };
  const auto vector = [&](const std::string& name, std::vector<float>* v) -> Status {
    TensorRef t;
    const std::int64_t shape[] = {h};
    HATTN_RETURN_IF_ERROR(m.store_->get(name, shape, &t, &inner));
    v->resize(static_cast<std::size_t>(h));
    widen(t.data, t.dtype, h, v->data());
    m.weight_bytes_ += static_cast<std::size_t>(h) * size_of(t.dtype);
    return Status::ok();
  };

  {
    const std::int64_t shape[] = {c.vocab_size, h};
    if (Status s = m.store_->get("model.embed_tokens.weight", shape, &m.embedding_, &inner); !s)
      return fail(s);
  }
  m.layers_.resize(static_cast<std::size_t>(c.num_layers));
  for (std::int32_t i = 0; i < c.num_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    LayerWeights& L = m.layers_[static_cast<std::size_t>(i)];
    for (Status s : {vector(p + "input_layernorm.weight", &L.attn_norm),
                     linear(p + "self_attn.q_proj.weight", c.q_dim(), h, &L.q),
                     linear(p + "self_attn.k_proj.weight", c.kv_dim(), h, &L.k),
                     linear(p + "self_attn.v_proj.weight", c.kv_dim(), h, &L.v),
                     linear(p + "self_attn.o_proj.weight", h, c.q_dim(), &L.o),
                     vector(p + "post_attention_layernorm.weight", &L.mlp_norm),
                     linear(p + "mlp.gate_proj.weight", c.intermediate_size, h, &L.gate),
                     linear(p + "mlp.up_proj.weight", c.intermediate_size, h, &L.up),
                     linear(p + "mlp.down_proj.weight", h, c.intermediate_size, &L.down)}) {
      if (!s) return fail(s);
    }
  }
  if (Status s = vector("model.norm.weight", &m.final_norm_); !s) return fail(s);
  // Tied models reuse the embedding matrix as lm_head (HF omits lm_head.weight;
  // some exports keep a copy, which is then used).
  if (!c.tie_word_embeddings || m.store_->contains("lm_head.weight")) {
    if (Status s = linear("lm_head.weight", c.vocab_size, h, &m.lm_head_); !s) return fail(s);
  } else {
    m.lm_head_ = {m.embedding_.data, m.embedding_.dtype, c.vocab_size, h};
  }
  m.weight_bytes_ += static_cast<std::size_t>(m.embedding_.numel()) * size_of(m.embedding_.dtype);
  m.inv_freq_ = rope_inv_freq(c);
  *out = std::move(m);
  return Status::ok();
}

Status LlamaModel::embed(std::span<const std::int32_t> tokens, float* x) const {
  const std::int64_t h = config_.hidden_size;
  const std::size_t row_bytes = static_cast<std::size_t>(h) * size_of(embedding_.dtype);
  for (std::size_t t = 0; t < tokens.size(); ++t) {
    if (tokens[t] < 0 || tokens[t] >= config_.vocab_size)
      return {StatusCode::kInvalidArgument, "token id outside the vocabulary"};
    widen(static_cast<const unsigned char*>(embedding_.data) +
              static_cast<std::size_t>(tokens[t]) * row_bytes,
          embedding_.dtype, h, x + static_cast<std::int64_t>(t) * h);
  }
  return Status::ok();
}

void LlamaModel::apply_rope(float* x, std::int64_t num_tokens, std::int32_t heads,
                            const std::int64_t* positions) const {
  const std::int32_t d = config_.head_dim, half = d / 2;
  std::vector<float> cs(static_cast<std::size_t>(d));
  for (std::int64_t t = 0; t < num_tokens; ++t) {
    for (std::int32_t i = 0; i < half; ++i) {
      const double angle =
          static_cast<double>(positions[t]) * inv_freq_[static_cast<std::size_t>(i)];
      cs[static_cast<std::size_t>(i)] = static_cast<float>(std::cos(angle));
      cs[static_cast<std::size_t>(half + i)] = static_cast<float>(std::sin(angle));
    }
    for (std::int32_t hd = 0; hd < heads; ++hd) {
      float* v = x + (t * heads + hd) * d;
      for (std::int32_t i = 0; i < half; ++i) {
        const float c = cs[static_cast<std::size_t>(i)], s = cs[static_cast<std::size_t>(half + i)];
        const float a = v[i], b = v[i + half];
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
      }
    }
  }
}

void LlamaModel::stage_a(int layer, const float* x, std::int64_t num_tokens,
                         const std::int64_t* positions, float* q, float* k, float* v,
                         StageScratch& scratch, const CpuExecutor& executor,
                         StageTimes* times) const {
  const LayerWeights& L = layers_[static_cast<std::size_t>(layer)];
  auto& s = *scratch.impl_;
  const std::int64_t h = config_.hidden_size;
  auto t0 = Clock::now();
  s.h.resize(static_cast<std::size_t>(num_tokens * h));
  rms_norm(x, num_tokens, h, L.attn_norm.data(), config_.rms_norm_eps, s.h.data());
  double other = seconds_since(t0);
  t0 = Clock::now();
  linear_forward(L.q, s.h.data(), num_tokens, q, scratch, executor);
  linear_forward(L.k, s.h.data(), num_tokens, k, scratch, executor);
  linear_forward(L.v, s.h.data(), num_tokens, v, scratch, executor);
  const double gemm = seconds_since(t0);
  t0 = Clock::now();
  apply_rope(q, num_tokens, config_.num_q_heads, positions);
  apply_rope(k, num_tokens, config_.num_kv_heads, positions);
  other += seconds_since(t0);
  if (times) {
    times->gemm_s += gemm;
    times->other_s += other;
  }
}

void LlamaModel::stage_b(int layer, const float* attn, std::int64_t num_tokens, float* x,
                         StageScratch& scratch, const CpuExecutor& executor,
                         StageTimes* times) const {
  const LayerWeights& L = layers_[static_cast<std::size_t>(layer)];
  auto& s = *scratch.impl_;
  const std::int64_t h = config_.hidden_size, f = config_.intermediate_size;
  s.h.resize(static_cast<std::size_t>(num_tokens * h));
  s.gate.resize(static_cast<std::size_t>(num_tokens * f));
  s.up.resize(static_cast<std::size_t>(num_tokens * f));
  auto t0 = Clock::now();
  linear_forward(L.o, attn, num_tokens, s.h.data(), scratch, executor);
  double gemm = seconds_since(t0);
  t0 = Clock::now();
  for (std::int64_t i = 0; i < num_tokens * h; ++i) x[i] += s.h[static_cast<std::size_t>(i)];
  rms_norm(x, num_tokens, h, L.mlp_norm.data(), config_.rms_norm_eps, s.h.data());
  double other = seconds_since(t0);
  t0 = Clock::now();
  linear_forward(L.gate, s.h.data(), num_tokens, s.gate.data(), scratch, executor);
  linear_forward(L.up, s.h.data(), num_tokens, s.up.data(), scratch, executor);
  gemm += seconds_since(t0);
  t0 = Clock::now();
  for (std::size_t i = 0; i < s.gate.size(); ++i) {
    const float g = s.gate[i];
    s.gate[i] = g / (1.0f + std::exp(-g)) * s.up[i];
  }
  other += seconds_since(t0);
  t0 = Clock::now();
  linear_forward(L.down, s.gate.data(), num_tokens, s.h.data(), scratch, executor);
  gemm += seconds_since(t0);
  t0 = Clock::now();
  for (std::int64_t i = 0; i < num_tokens * h; ++i) x[i] += s.h[static_cast<std::size_t>(i)];
  other += seconds_since(t0);
  if (times) {
    times->gemm_s += gemm;
    times->other_s += other;
  }
}

void LlamaModel::logits(const float* x, std::int64_t num_tokens, float* logits,
                        StageScratch& scratch, const CpuExecutor& executor,
                        StageTimes* times) const {
  auto& s = *scratch.impl_;
  const std::int64_t h = config_.hidden_size;
  auto t0 = Clock::now();
  s.h.resize(static_cast<std::size_t>(num_tokens * h));
  rms_norm(x, num_tokens, h, final_norm_.data(), config_.rms_norm_eps, s.h.data());
  const double other = seconds_since(t0);
  t0 = Clock::now();
  linear_forward(lm_head_, s.h.data(), num_tokens, logits, scratch, executor);
  if (times) {
    times->gemm_s += seconds_since(t0);
    times->other_s += other;
  }
}

}  // namespace hattn::model
