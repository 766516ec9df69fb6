#pragma once
// A model-shaped engine for the orchestrator on host streams: real Eigen GEMMs
// standing in for the accelerator's work. Used by example 04 and by
// benchmarks/bench_orchestrator.
//
//   stage A:  xn = rmsnorm(x);  [q | k | v] = xn * Wqkv  (k, v rounded to bf16)
//   stage B:  x += attn_o * Wo;  then mlp_reps times:  x += silu(rmsnorm(x) * W1) * W2
//
// One engine owns the hidden states of every sequence [batch][hidden] and the
// "device" buffers of each micro-batch. Single-threaded Eigen (no OpenMP), so a
// stage occupies exactly one core, like a stream on a device.

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "hattn/core/dtype.hpp"
#include "hattn/core/status.hpp"
#include "hattn/runtime/orchestrator.hpp"

namespace hattn_examples {

struct GemmModelConfig {
  std::int32_t num_layers = 4;
  std::int32_t batch = 16;
  std::int32_t num_micro_batches = 2;
  std::int32_t q_heads = 8;
  std::int32_t kv_heads = 2;
  std::int32_t head_dim = 64;
  std::int32_t hidden = 512;
  std::int32_t ffn = 1024;
  std::int32_t mlp_reps = 1;
  // One set of weights for all layers: they stay in cache, so the GEMMs are
  // bound by arithmetic, as on an accelerator, not by memory shared with the
  // CPU attention.
  bool shared_weights = false;
};

class GemmModel {
 public:
  using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Ctx = hattn::runtime::StageContext;

  GemmModel(const GemmModelConfig& c, std::uint64_t seed) : c_(c) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> n01(0.0f, 1.0f);
    auto random = [&](std::int32_t rows, std::int32_t cols, float scale) {
      Mat m(rows, cols);
      for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = n01(rng) * scale;
      return m;
    };
    const std::int32_t qd = c.q_heads * c.head_dim, kd = c.kv_heads * c.head_dim;
    const float si = 1.0f / std::sqrt(static_cast<float>(c.hidden));
    const std::int32_t distinct = c.shared_weights ? 1 : c.num_layers;
    for (std::int32_t l = 0; l < distinct; ++l)
      layers_.push_back({random(c.hidden, qd + 2 * kd, si),
                         random(qd, c.hidden, 0.5f / std::sqrt(static_cast<float>(qd))),
                         random(c.hidden, c.ffn, si),
                         random(c.ffn, c.hidden, 0.5f / std::sqrt(static_cast<float>(c.ffn)))});
    x_ = random(c.batch, c.hidden, 1.0f);
    const std::int32_t mbs = std::min(c.num_micro_batches, c.batch);
    bufs_.resize(static_cast<std::size_t>(mbs));
    io_.resize(static_cast<std::size_t>(mbs));
    for (std::int32_t m = 0; m < mbs; ++m) {
      const auto r = hattn::runtime::micro_batch_range(c.batch, mbs, m);
      Bufs& b = bufs_[static_cast<std::size_t>(m)];
      const auto n = static_cast<std::size_t>(r.size);
      b.q.assign(n * qd, 0.0f);
      b.k.assign(n * kd, hattn::bf16{});
      b.v.assign(n * kd, hattn::bf16{});
      b.o.assign(n * qd, 0.0f);
      b.lse.assign(n * c.q_heads, 0.0f);
      auto& io = io_[static_cast<std::size_t>(m)];
      io.q = b.q.data();
      io.k = b.k.data();
      io.v = b.v.data();
      io.attn_o = b.o.data();
      io.attn_lse2 = b.lse.data();
    }
  }

  const std::vector<hattn::runtime::MicroBatchIo>& io() const { return io_; }
  const Mat& x() const { return x_; }
  const GemmModelConfig& config() const { return c_; }

  hattn::Status stage_a(const Ctx& ctx) {
    const Layer& L = layer(ctx.layer);
    const auto n = static_cast<Eigen::Index>(ctx.seqs.size());
    const std::int32_t qd = c_.q_heads * c_.head_dim, kd = c_.kv_heads * c_.head_dim;
    const Mat qkv = rmsnorm(x_.middleRows(ctx.first_seq, n)) * L.wqkv;
    Bufs& b = bufs_[static_cast<std::size_t>(ctx.micro_batch)];
    for (Eigen::Index r = 0; r < n; ++r) {
      const float* row = qkv.row(r).data();
      std::copy(row, row + qd, b.q.data() + r * qd);
      for (std::int32_t j = 0; j < kd; ++j) {
        b.k[static_cast<std::size_t>(r * kd + j)] = hattn::to_bf16(row[qd + j]);
        b.v[static_cast<std::size_t>(r * kd + j)] = hattn::to_bf16(row[qd + kd + j]);
      }
    }
    return hattn::Status::ok();
  }

  hattn::Status stage_b(const Ctx& ctx) {
    const Layer& L = layer(ctx.layer);
    const auto n = static_cast<Eigen::Index>(ctx.seqs.size());
    const std::int32_t qd = c_.q_heads * c_.head_dim;
    const Eigen::Map<const Mat> o(ctx.io->attn_o, n, qd);
    auto x = x_.middleRows(ctx.first_seq, n);
    x.noalias() += o * L.wo;
    for (std::int32_t rep = 0; rep < c_.mlp_reps; ++rep) {
      Mat h = rmsnorm(x) * L.w1;
      h = h.unaryExpr([](float v) { return v / (1.0f + std::exp(-v)); });  // SiLU
      x.noalias() += h * L.w2;
    }
    return hattn::Status::ok();
  }

  template <class Handle>
  hattn::runtime::EngineStages<Handle> stages() {
    return {[this](const Ctx& c, Handle) { return stage_a(c); }, nullptr,
            [this](const Ctx& c, Handle) { return stage_b(c); }};
  }

 private:
  struct Layer {
    Mat wqkv, wo, w1, w2;
  };
  struct Bufs {
    std::vector<float> q, o, lse;
    std::vector<hattn::bf16> k, v;
  };
  const Layer& layer(std::int32_t l) const {
    return layers_[c_.shared_weights ? 0 : static_cast<std::size_t>(l)];
  }
  template <class X>
  static Mat rmsnorm(const X& x) {
    Mat y = x;
    for (Eigen::Index r = 0; r < y.rows(); ++r)
      y.row(r) *= 1.0f / std::sqrt(y.row(r).squaredNorm() / static_cast<float>(y.cols()) + 1e-6f);
    return y;
  }

  GemmModelConfig c_;
  std::vector<Layer> layers_;
  Mat x_;
  std::vector<Bufs> bufs_;
  std::vector<hattn::runtime::MicroBatchIo> io_;
};

}  // namespace hattn_examples
