#pragma once
// Shared pieces of the LSH tests: KV generation rounded to the storage dtype,
// a layer with the values it stores, the brute-force sampled set and the
// double-precision reference of sampled attention.

#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <vector>

#include "hattn/core/dtype.hpp"
#include "hattn/cpu/lsh_attention.hpp"

namespace hattn_test {

// Values rounded to what dtype t stores (so the reference reads them exactly).
inline void round_to(std::vector<float>& x, hattn::DType t) {
  for (float& f : x) {
    if (t == hattn::DType::kBF16) f = hattn::to_float(hattn::to_bf16(f));
    if (t == hattn::DType::kF16) f = hattn::to_float(hattn::to_f16(f));
  }
}

inline std::vector<std::byte> encode(const std::vector<float>& x, hattn::DType t) {
  std::vector<std::byte> out(x.size() * hattn::size_of(t));
  for (std::size_t i = 0; i < x.size(); ++i) hattn::store_from_float(out.data(), t, i, x[i]);
  return out;
}

inline std::vector<float> normals(std::mt19937_64& rng, std::size_t n, float sd = 1.0f) {
  std::normal_distribution<float> nd(0.0f, sd);
  std::vector<float> x(n);
  for (float& f : x) f = nd(rng);
  return x;
}

// One layer and, per sequence, the K and V values it stores ([n][Hk][D]).
struct LshLayer {
  hattn::cpu::LshConfig cfg;
  hattn::cpu::LshShape shape;
  std::unique_ptr<hattn::cpu::LshAttention> attn;
  std::map<std::int64_t, std::vector<float>> k, v;

  std::int32_t G() const { return shape.num_q_heads / shape.num_kv_heads; }
  const float* key(std::int64_t seq, std::int64_t t, std::int32_t h) const {
    return k.at(seq).data() + (t * shape.num_kv_heads + h) * shape.head_dim;
  }
  const float* value(std::int64_t seq, std::int64_t t, std::int32_t h) const {
    return v.at(seq).data() + (t * shape.num_kv_heads + h) * shape.head_dim;
  }
};

// Positions (absolute, ascending) that collide with q in >= m tables, from
// codes of the centered keys hashed one by one.
std::vector<std::int64_t> brute_force_sampled(const LshLayer& layer, std::int64_t seq,
                                              std::int32_t q_head, const float* q);

// Exact reference (double) of the layer's decode for one query head: exact
// part plus the given sampled positions with the -ln(u + eps) correction
// (none when sample_all). o gets head_dim values; returns lse2.
double reference_head(const LshLayer& layer, std::int64_t seq, std::int32_t q_head, const float* q,
                      const std::vector<std::int64_t>& sampled, bool with_exact,
                      std::vector<double>* o);

// Plain softmax attention (double) of q over the given positions.
double attend_positions(const LshLayer& layer, std::int64_t seq, std::int32_t q_head,
                        const float* q, const std::vector<std::int64_t>& positions,
                        std::vector<double>* o);

}  // namespace hattn_test
