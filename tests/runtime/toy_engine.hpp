#pragma once
// A small model-shaped engine for the orchestrator tests: per layer, stage A
// projects the hidden state x to q, k, v (k, v rounded to the KV dtype) and
// keeps a "device" copy of the KV; device_attention attends the device's share
// of the tokens in scalar f32; stage B adds attn_o * Wo to x. Deterministic, so
// the orchestrated step and the same stages run in sequence must agree bit for
// bit.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include "hattn/core/dtype.hpp"
#include "hattn/core/merge.hpp"
#include "hattn/core/status.hpp"
#include "hattn/runtime/host_kv_cache.hpp"
#include "hattn/runtime/orchestrator.hpp"

namespace hattn_test {

struct ToyConfig {
  std::int32_t num_layers = 2;
  std::int32_t num_micro_batches = 2;
  std::int32_t q_heads = 4;
  std::int32_t kv_heads = 2;
  std::int32_t head_dim = 64;
  std::int32_t hidden = 32;
  hattn::DType kv_dtype = hattn::DType::kBF16;
  std::vector<std::int64_t> prefix_lens;  // per sequence: the batch
};

class ToyEngine {
 public:
  using Ctx = hattn::runtime::StageContext;

  ToyEngine(const ToyConfig& c, std::uint64_t seed) : c_(c) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> n01(0.0f, 1.0f);
    const auto B = static_cast<std::int32_t>(c.prefix_lens.size());
    const std::int32_t qd = c.q_heads * c.head_dim, kd = c.kv_heads * c.head_dim;
    auto fill = [&](std::vector<float>& w, std::size_t n, float scale) {
      w.resize(n);
      for (float& x : w) x = n01(rng) * scale;
    };
    layers_.resize(static_cast<std::size_t>(c.num_layers));
    const float s_in = 1.0f / std::sqrt(static_cast<float>(c.hidden));
    const float s_out = 0.5f / std::sqrt(static_cast<float>(qd));
    for (auto& L : layers_) {
      fill(L.wq, static_cast<std::size_t>(c.hidden) * qd, s_in);
      fill(L.wk, static_cast<std::size_t>(c.hidden) * kd, s_in);
      fill(L.wv, static_cast<std::size_t>(c.hidden) * kd, s_in);
      fill(L.wo, static_cast<std::size_t>(qd) * c.hidden, s_out);
    }
    fill(x_, static_cast<std::size_t>(B) * c.hidden, 1.0f);
    // The prefix KV, stored once per layer and sequence in the KV dtype.
    const std::size_t es = hattn::size_of(c.kv_dtype);
    prefix_k_.resize(layers_.size() * B);
    prefix_v_.resize(layers_.size() * B);
    for (std::size_t i = 0; i < prefix_k_.size(); ++i) {
      const std::int64_t len = c.prefix_lens[i % B];
      std::vector<float> k, v;
      fill(k, static_cast<std::size_t>(len) * kd, 1.0f);
      fill(v, static_cast<std::size_t>(len) * kd, 1.0f);
      prefix_k_[i].resize(k.size() * es);
      prefix_v_[i].resize(v.size() * es);
      for (std::size_t j = 0; j < k.size(); ++j) {
        hattn::store_from_float(prefix_k_[i].data(), c.kv_dtype, static_cast<std::int64_t>(j),
                                k[j]);
        hattn::store_from_float(prefix_v_[i].data(), c.kv_dtype, static_cast<std::int64_t>(j),
                                v[j]);
      }
    }
    dev_k_ = prefix_k_;
    dev_v_ = prefix_v_;
    // Buffers per micro-batch, sized for the largest.
    const std::int32_t mbs = std::min<std::int32_t>(c.num_micro_batches, B);
    bufs_.resize(static_cast<std::size_t>(mbs));
    io_.resize(static_cast<std::size_t>(mbs));
    for (std::int32_t m = 0; m < mbs; ++m) {
      const auto r = hattn::runtime::micro_batch_range(B, mbs, m);
      Bufs& b = bufs_[static_cast<std::size_t>(m)];
      const auto n = static_cast<std::size_t>(r.size);
      b.q.assign(n * qd, 0.0f);
      b.k.assign(n * kd * es, std::byte{0});
      b.v.assign(n * kd * es, std::byte{0});
      for (auto* o : {&b.attn_o, &b.cpu_o, &b.dev_o}) o->assign(n * qd, 0.0f);
      for (auto* l : {&b.attn_l, &b.cpu_l, &b.dev_l}) l->assign(n * c.q_heads, 0.0f);
      io_[static_cast<std::size_t>(m)] = {
          b.q.data(),      b.k.data(),     b.v.data(),     nullptr,        b.attn_o.data(),
          b.attn_l.data(), b.cpu_o.data(), b.cpu_l.data(), b.dev_o.data(), b.dev_l.data()};
    }
  }

  std::int32_t q_heads() const { return c_.q_heads; }
  std::int32_t batch() const { return static_cast<std::int32_t>(c_.prefix_lens.size()); }
  const std::vector<hattn::runtime::MicroBatchIo>& io() const { return io_; }
  const std::vector<float>& x() const { return x_; }

  // The host KV cache with the prefix of every sequence (indices 0..B-1).
  hattn::runtime::HostKvCache make_host_cache() const {
    std::int64_t pages = 0;
    for (std::int64_t len : c_.prefix_lens) pages += (len + 8) / 16 + 2;
    hattn::runtime::HostKvCache kv(c_.num_layers, {.dtype = c_.kv_dtype,
                                                   .num_kv_heads = c_.kv_heads,
                                                   .head_dim = c_.head_dim,
                                                   .page_size = 16,
                                                   .num_pages = pages + 64,
                                                   .layout = hattn::KvLayout::kHND});
    for (std::int32_t b = 0; b < batch(); ++b) {
      std::int32_t id = 0;
      if (!kv.add_sequence(&id)) throw std::runtime_error("add_sequence");
      for (std::int32_t l = 0; l < c_.num_layers; ++l) {
        const std::size_t i = static_cast<std::size_t>(l) * batch() + b;
        if (!kv.append(l, id, prefix_k_[i].data(), prefix_v_[i].data(), c_.prefix_lens[b]))
          throw std::runtime_error("append");
      }
    }
    return kv;
  }

  // Engine-side undo of a failed step: hidden state and device KV as before.
  void save() {
    saved_x_ = x_;
    saved_dev_k_ = dev_k_;
    saved_dev_v_ = dev_v_;
  }
  void restore() {
    x_ = saved_x_;
    dev_k_ = saved_dev_k_;
    dev_v_ = saved_dev_v_;
  }

  hattn::Status stage_a(const Ctx& ctx) {
    const Layer& L = layers_[static_cast<std::size_t>(ctx.layer)];
    const std::int32_t qd = c_.q_heads * c_.head_dim, kd = c_.kv_heads * c_.head_dim;
    auto* q = const_cast<float*>(ctx.io->q);
    auto* k = const_cast<void*>(ctx.io->k);
    auto* v = const_cast<void*>(ctx.io->v);
    const std::size_t es = hattn::size_of(c_.kv_dtype);
    for (std::size_t b = 0; b < ctx.seqs.size(); ++b) {
      const float* xb = &x_[(ctx.first_seq + b) * static_cast<std::size_t>(c_.hidden)];
      for (std::int32_t j = 0; j < qd; ++j)
        q[b * qd + j] = dot(xb, &L.wq[static_cast<std::size_t>(j)], qd);
      for (std::int32_t j = 0; j < kd; ++j) {
        hattn::store_from_float(k, c_.kv_dtype, static_cast<std::int64_t>(b * kd + j),
                                dot(xb, &L.wk[static_cast<std::size_t>(j)], kd));
        hattn::store_from_float(v, c_.kv_dtype, static_cast<std::int64_t>(b * kd + j),
                                dot(xb, &L.wv[static_cast<std::size_t>(j)], kd));
      }
      // The device's own copy of the KV gets the token too.
      const std::size_t i = static_cast<std::size_t>(ctx.layer) * batch() + ctx.first_seq + b;
      const auto* kb = static_cast<const std::byte*>(k) + b * kd * es;
      const auto* vb = static_cast<const std::byte*>(v) + b * kd * es;
      dev_k_[i].insert(dev_k_[i].end(), kb, kb + kd * es);
      dev_v_[i].insert(dev_v_[i].end(), vb, vb + kd * es);
    }
    return hattn::Status::ok();
  }

  // Scalar attention over tokens [cpu_tokens, seq_len) of the device KV.
  hattn::Status device_attention(const Ctx& ctx) {
    const std::int32_t H = c_.q_heads, D = c_.head_dim, G = c_.q_heads / c_.kv_heads;
    const std::int32_t kd = c_.kv_heads * D;
    const float scale = 1.0f / std::sqrt(static_cast<float>(D)) * 1.4426950408889634f;
    std::vector<float> s;
    for (std::size_t b = 0; b < ctx.seqs.size(); ++b) {
      const std::size_t i = static_cast<std::size_t>(ctx.layer) * batch() + ctx.first_seq + b;
      const std::int64_t t0 = ctx.cpu_tokens[b], t1 = ctx.seq_lens[b];
      for (std::int32_t h = 0; h < H; ++h) {
        const float* q = ctx.io->q + (b * H + h) * static_cast<std::size_t>(D);
        float* o = ctx.io->device_o + (b * H + h) * static_cast<std::size_t>(D);
        float& lse = ctx.io->device_lse2[b * H + h];
        const std::int32_t kh = h / G;
        s.assign(static_cast<std::size_t>(t1 - t0), 0.0f);
        float m = -INFINITY;
        for (std::int64_t t = t0; t < t1; ++t) {
          float acc = 0.0f;
          for (std::int32_t d = 0; d < D; ++d)
            acc += q[d] * hattn::load_as_float(dev_k_[i].data(), c_.kv_dtype, t * kd + kh * D + d);
          s[static_cast<std::size_t>(t - t0)] = acc * scale;
          m = std::max(m, acc * scale);
        }
        float l = 0.0f;
        for (float& x : s) l += (x = std::exp2(x - m));
        for (std::int32_t d = 0; d < D; ++d) {
          float acc = 0.0f;
          for (std::int64_t t = t0; t < t1; ++t)
            acc += s[static_cast<std::size_t>(t - t0)] *
                   hattn::load_as_float(dev_v_[i].data(), c_.kv_dtype, t * kd + kh * D + d);
          o[d] = t1 > t0 ? acc / l : 0.0f;
        }
        lse = t1 > t0 ? m + std::log2(l) : -INFINITY;
      }
    }
    return hattn::Status::ok();
  }

  hattn::Status stage_b(const Ctx& ctx) {
    const Layer& L = layers_[static_cast<std::size_t>(ctx.layer)];
    const std::int32_t qd = c_.q_heads * c_.head_dim;
    for (std::size_t b = 0; b < ctx.seqs.size(); ++b) {
      float* xb = &x_[(ctx.first_seq + b) * static_cast<std::size_t>(c_.hidden)];
      const float* o = ctx.io->attn_o + b * qd;
      for (std::int32_t j = 0; j < c_.hidden; ++j) {
        float acc = 0.0f;
        for (std::int32_t i = 0; i < qd; ++i)
          acc += o[i] * L.wo[static_cast<std::size_t>(i) * c_.hidden + j];
        xb[j] = std::tanh(xb[j] + acc);
      }
    }
    return hattn::Status::ok();
  }

  template <class Handle>
  hattn::runtime::EngineStages<Handle> stages() {
    return {[this](const Ctx& c, Handle) { return stage_a(c); },
            [this](const Ctx& c, Handle) { return device_attention(c); },
            [this](const Ctx& c, Handle) { return stage_b(c); }};
  }

 private:
  struct Layer {
    std::vector<float> wq, wk, wv, wo;  // [in][out]
  };
  struct Bufs {
    std::vector<float> q, attn_o, cpu_o, dev_o, attn_l, cpu_l, dev_l;
    std::vector<std::byte> k, v;
  };
  // x . column j of a row-major [hidden][stride] matrix starting at w.
  float dot(const float* x, const float* w, std::int32_t stride) const {
    float acc = 0.0f;
    for (std::int32_t i = 0; i < c_.hidden; ++i)
      acc += x[i] * w[static_cast<std::size_t>(i) * stride];
    return acc;
  }

  ToyConfig c_;
  std::vector<Layer> layers_;
  std::vector<float> x_, saved_x_;
  std::vector<std::vector<std::byte>> prefix_k_, prefix_v_, dev_k_, dev_v_, saved_dev_k_,
      saved_dev_v_;
  std::vector<Bufs> bufs_;
  std::vector<hattn::runtime::MicroBatchIo> io_;
};

// The same stages, run one after another on this thread, with the CPU
// attention backend called directly: what the orchestrator must reproduce.
template <class Backend>
hattn::Status run_sequential(ToyEngine& e, hattn::runtime::HostKvCache& kv, Backend& backend,
                             const hattn::CpuExecutor& ex,
                             const hattn::runtime::PartitionPolicy& policy, std::int32_t layers,
                             std::int32_t mbs_wanted, std::int32_t step) {
  using namespace hattn;
  using namespace hattn::runtime;
  const std::int32_t B = e.batch();
  const std::int32_t mbs = std::min(mbs_wanted, B);
  const PagePoolOptions& po = kv.options();
  std::vector<std::int32_t> seqs(static_cast<std::size_t>(B));
  for (std::int32_t b = 0; b < B; ++b) seqs[static_cast<std::size_t>(b)] = b;
  for (std::int32_t l = 0; l < layers; ++l)
    for (std::int32_t m = 0; m < mbs; ++m) {
      const MicroBatchRange r = micro_batch_range(B, mbs, m);
      const auto n = static_cast<std::size_t>(r.size);
      std::vector<std::int64_t> lens(n), cpu(n);
      for (std::size_t b = 0; b < n; ++b) {
        lens[b] = kv.seq_len(l, seqs[r.begin + b]) + 1;
        cpu[b] = policy.cpu_tokens(l, seqs[r.begin + b], lens[b]);
      }
      bool split = false;
      for (std::size_t b = 0; b < n; ++b) split = split || cpu[b] < lens[b];
      const MicroBatchIo& io = e.io()[static_cast<std::size_t>(m)];
      StageContext ctx{step, l, m, r.begin, {seqs.data() + r.begin, n}, lens, cpu, &io};
      HATTN_RETURN_IF_ERROR(e.stage_a(ctx));
      if (split) HATTN_RETURN_IF_ERROR(e.device_attention(ctx));
      const std::size_t row = size_of(po.dtype) * po.num_kv_heads * po.head_dim;
      for (std::size_t b = 0; b < n; ++b)
        HATTN_RETURN_IF_ERROR(kv.append(l, seqs[r.begin + b],
                                        static_cast<const std::byte*>(io.k) + b * row,
                                        static_cast<const std::byte*>(io.v) + b * row, 1));
      PageTable table;
      HATTN_RETURN_IF_ERROR(
          kv.build_page_table(l, seqs.data() + r.begin, cpu.data(), r.size, &table));
      CpuAttentionTask t;
      t.step = step;
      t.layer = l;
      t.micro_batch = m;
      const std::int32_t q_heads = e.q_heads();
      t.problem = {.batch_size = r.size,
                   .num_q_heads = q_heads,
                   .num_kv_heads = po.num_kv_heads,
                   .head_dim = po.head_dim,
                   .kv_dtype = po.dtype,
                   .q_dtype = DType::kF32,
                   .o_dtype = DType::kF32,
                   .sm_scale = std::nullopt};
      t.q = make_query_view(io.q, DType::kF32, r.size, q_heads, po.head_dim);
      t.kv = kv.pool(l).view(table);
      t.seqs = ctx.seqs;
      t.seq_lens = lens;
      t.appended_tokens = 1;
      t.new_k = io.k;
      t.new_v = io.v;
      float* o = split ? io.cpu_o : io.attn_o;
      float* lse = split ? io.cpu_lse2 : io.attn_lse2;
      t.out = make_partial_view(o, DType::kF32, lse, r.size, q_heads, po.head_dim);
      HATTN_RETURN_IF_ERROR(backend.attend(t, ex));
      if (split)
        HATTN_RETURN_IF_ERROR(merge_partials(
            make_partial_view(io.cpu_o, DType::kF32, io.cpu_lse2, r.size, q_heads, po.head_dim),
            make_partial_view(io.device_o, DType::kF32, io.device_lse2, r.size, q_heads,
                              po.head_dim),
            make_partial_view(io.attn_o, DType::kF32, io.attn_lse2, r.size, q_heads, po.head_dim)));
      HATTN_RETURN_IF_ERROR(e.stage_b(ctx));
    }
  return Status::ok();
}

}  // namespace hattn_test
