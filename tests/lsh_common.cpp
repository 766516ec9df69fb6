#include "lsh_common.hpp"

#include <algorithm>
#include <limits>
#include <span>

namespace hattn_test {

using hattn::cpu::LshPartition;

std::vector<std::int64_t> brute_force_sampled(const LshLayer& layer, std::int64_t seq,
                                              std::int32_t q_head, const float* q) {
  const std::int32_t D = layer.shape.head_dim, L = layer.cfg.L;
  const std::int32_t h = q_head / layer.G();
  LshPartition part;
  std::span<const float> mu;
  if (!layer.attn->partition(seq, &part) || !layer.attn->mu(seq, h, &mu)) return {};
  const auto& proj = *layer.attn->projection(h);
  std::vector<std::uint16_t> qc(static_cast<std::size_t>(L)), kc(static_cast<std::size_t>(L));
  proj.hash(q, 1, D, qc.data());
  std::vector<float> x(static_cast<std::size_t>(D));
  std::vector<std::int64_t> out;
  for (std::int64_t t = part.sink_end; t < part.tail_begin; ++t) {
    const float* k = layer.key(seq, t, h);
    for (std::int32_t d = 0; d < D; ++d) x[d] = k[d] - mu[d];
    proj.hash(x.data(), 1, D, kc.data());
    std::int32_t hits = 0;
    for (std::int32_t l = 0; l < L; ++l) hits += kc[l] == qc[l];
    if (hits >= layer.cfg.min_collisions) out.push_back(t);
  }
  return out;
}

namespace {

double dot(const float* a, const float* b, std::int32_t D) {
  double s = 0.0;
  for (std::int32_t d = 0; d < D; ++d) s += double{a[d]} * b[d];
  return s;
}

double softmax_attend(const LshLayer& layer, std::int64_t seq, std::int32_t h,
                      const std::vector<std::int64_t>& pos, const std::vector<double>& s,
                      std::vector<double>* o) {
  const std::int32_t D = layer.shape.head_dim;
  o->assign(static_cast<std::size_t>(D), 0.0);
  if (pos.empty()) return -std::numeric_limits<double>::infinity();
  const double mx = *std::max_element(s.begin(), s.end());
  double sum = 0.0;
  for (std::size_t j = 0; j < pos.size(); ++j) {
    const double w = std::exp(s[j] - mx);
    sum += w;
    const float* v = layer.value(seq, pos[j], h);
    for (std::int32_t d = 0; d < D; ++d) (*o)[d] += w * v[d];
  }
  for (double& x : *o) x /= sum;
  return (mx + std::log(sum)) / std::log(2.0);
}

}  // namespace

double reference_head(const LshLayer& layer, std::int64_t seq, std::int32_t q_head, const float* q,
                      const std::vector<std::int64_t>& sampled, bool with_exact,
                      std::vector<double>* o) {
  const std::int32_t D = layer.shape.head_dim, h = q_head / layer.G();
  const double scale = layer.shape.sm_scale ? *layer.shape.sm_scale : 1.0 / std::sqrt(double(D));
  LshPartition part;
  std::span<const float> mu;
  (void)layer.attn->partition(seq, &part);
  (void)layer.attn->mu(seq, h, &mu);
  std::vector<std::int64_t> pos;
  std::vector<double> s;
  if (with_exact) {
    for (std::int64_t t = 0; t < part.sink_end; ++t) pos.push_back(t);
    for (std::int64_t t = part.tail_begin; t < part.length; ++t) pos.push_back(t);
    for (std::int64_t t : pos) s.push_back(scale * dot(q, layer.key(seq, t, h), D));
  }
  double qn = std::sqrt(dot(q, q, D));
  for (std::int64_t t : sampled) {
    const float* k = layer.key(seq, t, h);
    double qc = 0.0, kn = 0.0;
    for (std::int32_t d = 0; d < D; ++d) {
      const double c = double{k[d]} - mu[d];
      qc += q[d] * c;
      kn += c * c;
    }
    kn = std::sqrt(kn);
    double corr = 0.0;
    if (!layer.cfg.sample_all) {
      const double cosv = qn > 0 && kn > 0 ? qc / (qn * kn) : 0.0;
      const double u = hattn::cpu::lsh_sample_probability(cosv, layer.cfg.K, layer.cfg.L,
                                                          layer.cfg.min_collisions);
      corr = -std::log(u + double{layer.cfg.eps});
    }
    pos.push_back(t);
    s.push_back(scale * dot(q, k, D) + corr);
  }
  return softmax_attend(layer, seq, h, pos, s, o);
}

double attend_positions(const LshLayer& layer, std::int64_t seq, std::int32_t q_head,
                        const float* q, const std::vector<std::int64_t>& positions,
                        std::vector<double>* o) {
  const std::int32_t D = layer.shape.head_dim, h = q_head / layer.G();
  const double scale = layer.shape.sm_scale ? *layer.shape.sm_scale : 1.0 / std::sqrt(double(D));
  std::vector<double> s;
  for (std::int64_t t : positions) s.push_back(scale * dot(q, layer.key(seq, t, h), D));
  return softmax_attend(layer, seq, h, positions, s, o);
}

}  // namespace hattn_test
