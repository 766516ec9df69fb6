#pragma once
// Configuration of LSH-sampled attention (MagicPIG) and the probabilities it
// rests on. See docs/lsh.md and ../shared/MAGICPIG.md.

#include <cstdint>

#include "hattn/core/status.hpp"

namespace hattn::cpu {

struct LshConfig {
  // SimHash bits per table (the code is K bits wide: 1..16, stored in uint16).
  std::int32_t K = 10;
  // Hash tables.
  std::int32_t L = 150;
  // A key is sampled when it collides with the query in at least this many
  // tables (MagicPIG's rule is 2; 1 samples ~10x more keys).
  std::int32_t min_collisions = 2;
  // Sampled scores are corrected by -ln(u + eps): eps caps the weight of
  // unlikely keys (the variance of the estimator).
  float eps = 1e-4f;
  // Seed of the random projection. The projection never depends on the data.
  std::uint64_t seed = 0x6d61676963706967ull;  // "magicpig"
  // First tokens of a sequence that are always attended exactly.
  std::int32_t sink = 4;
  // Last prefill tokens that are always attended exactly.
  std::int32_t window = 64;
  // Longest exact tail (window + generated tokens). When appends make the
  // tail longer, its older tokens (all but the last `window`) move into the
  // indexed set, inserted incrementally. Must be >= window.
  std::int32_t max_exact_tail = 256;
  // One projection for every layer and KV head, or one per (layer, KV head).
  enum class Projection : std::uint8_t { kShared, kPerHead };
  Projection projection = Projection::kShared;
  // How the sampled rows of a KV group's query heads are attended. kPerHead:
  // each query head is its own work item over its own rows (no arithmetic on
  // rows it did not sample; a row sampled by several heads is loaded again,
  // usually from cache; small batches still split into many items). kUnion:
  // the union of the group's sets in one pass, each K/V row loaded once and
  // scored for every head of the group, masked where a head did not sample
  // it: better when a group's heads sample mostly the same keys. Measured
  // on the synthetic benchmark (heads of a group share little): kPerHead
  // 1.8-2.0 ms per step against 2.0-2.1 at 64K tokens, batch 1.
  enum class Gather : std::uint8_t { kPerHead, kUnion };
  Gather gather = Gather::kPerHead;
  // Testing aid: every indexed key is sampled with u = 1 and no correction,
  // so the result must equal dense attention.
  bool sample_all = false;
};

// kSuccess, or kInvalidArgument saying which field is wrong.
Status validate(const LshConfig& config) noexcept;

// Probability that one SimHash bit agrees for two vectors with this cosine:
// 1 - acos(cos) / pi (cos clamped to [-1, 1]).
double lsh_bit_probability(double cos) noexcept;

// Probability that a key with this cosine to the query is sampled: that it
// collides (all K bits equal) in at least m of the L tables,
// Pr[Binomial(L, p^K) >= m]. Accurate to double rounding for small u too.
double lsh_sample_probability(double cos, std::int32_t K, std::int32_t L, std::int32_t m) noexcept;

}  // namespace hattn::cpu
