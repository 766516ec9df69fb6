// LSH-sampled attention (MagicPIG): the checks of ../shared/MAGICPIG.md §8
// (numbered in the test names), incremental insertion, determinism, errors.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numbers>
#include <numeric>
#include <span>
#include <stdexcept>

#include <catch2/catch.hpp>

#include "common/alloc_fail.hpp"
#include "common/check.hpp"
#include "common/decode_fixture.hpp"
#include "common/seed.hpp"
#include "hattn/core/merge.hpp"
#include "hattn/cpu/lsh_attention.hpp"
#include "hattn/ref/decode.hpp"
#include "lsh_common.hpp"

using namespace hattn;
using namespace hattn::cpu;
using namespace hattn_test;

namespace {

// Keys: unit normal plus a per-head offset (a shared direction, as real keys
// have, so centering matters); values unit normal.
LshLayer make_layer(const LshConfig& cfg, std::int32_t Hq, std::int32_t Hk, std::int32_t D,
                    DType kv, const std::vector<std::int64_t>& lens, std::mt19937_64& rng,
                    CpuIsa isa = cpu_isa_default(), float offset = 0.5f,
                    std::int32_t page_size = 16) {
  LshLayer layer;
  layer.cfg = cfg;
  layer.shape.page_size = page_size;
  layer.shape.num_q_heads = Hq;
  layer.shape.num_kv_heads = Hk;
  layer.shape.head_dim = D;
  layer.shape.kv_dtype = kv;
  layer.shape.max_tokens = std::accumulate(lens.begin(), lens.end(), std::int64_t{0}) + 4096;
  layer.shape.max_sequences = static_cast<std::int32_t>(lens.size()) + 1;
  REQUIRE(LshAttention::create(cfg, layer.shape, &layer.attn, isa).is_ok());
  const std::vector<float> off = normals(rng, static_cast<std::size_t>(Hk) * D, offset);
  for (std::size_t s = 0; s < lens.size(); ++s) {
    const std::int64_t n = lens[s];
    std::vector<float> k = normals(rng, static_cast<std::size_t>(n) * Hk * D);
    for (std::int64_t i = 0; i < n * Hk * D; ++i) k[i] += off[i % (Hk * D)];
    std::vector<float> v = normals(rng, static_cast<std::size_t>(n) * Hk * D);
    round_to(k, kv);
    round_to(v, kv);
    const auto kb = encode(k, kv), vb = encode(v, kv);
    REQUIRE(layer.attn
                ->prefill(static_cast<std::int64_t>(s) + 100, kb.data(), vb.data(), n,
                          shared_executor())
                .is_ok());
    layer.k[static_cast<std::int64_t>(s) + 100] = std::move(k);
    layer.v[static_cast<std::int64_t>(s) + 100] = std::move(v);
  }
  return layer;
}

// Appends `steps` generated tokens to sequence `id`, one per call, keeping
// the layer's f32 copy in step.
void append_tokens(LshLayer& layer, std::int64_t id, int steps, std::mt19937_64& rng) {
  const auto row = static_cast<std::size_t>(layer.shape.num_kv_heads) * layer.shape.head_dim;
  const DType kv = layer.shape.kv_dtype;
  for (int step = 0; step < steps; ++step) {
    std::vector<float> k = normals(rng, row), v = normals(rng, row);
    round_to(k, kv);
    round_to(v, kv);
    const auto kb = encode(k, kv), vb = encode(v, kv);
    REQUIRE(layer.attn->append(id, kb.data(), vb.data(), 1).is_ok());
    auto& ks = layer.k[id];
    ks.insert(ks.end(), k.begin(), k.end());
    auto& vs = layer.v[id];
    vs.insert(vs.end(), v.begin(), v.end());
  }
}

std::vector<std::int64_t> seq_ids(std::size_t n) {
  std::vector<std::int64_t> ids(n);
  std::iota(ids.begin(), ids.end(), 100);
  return ids;
}

LshConfig config(std::int32_t K, std::int32_t L) {
  LshConfig c;
  c.K = K;
  c.L = L;
  return c;
}

}  // namespace

TEST_CASE("lsh: config validation names the bad field", "[lsh][errors]") {
  CHECK(validate(LshConfig{}).is_ok());
  auto bad = [](auto edit) {
    LshConfig c;
    edit(c);
    return validate(c).code();
  };
  CHECK(bad([](LshConfig& c) { c.K = 0; }) == StatusCode::kInvalidArgument);
  CHECK(bad([](LshConfig& c) { c.K = 17; }) == StatusCode::kInvalidArgument);  // > uint16 codes
  CHECK(bad([](LshConfig& c) { c.L = 1; }) == StatusCode::kInvalidArgument);   // L < m
  CHECK(bad([](LshConfig& c) { c.min_collisions = 0; }) == StatusCode::kInvalidArgument);
  CHECK(bad([](LshConfig& c) { c.gather = static_cast<LshConfig::Gather>(7); }) ==
        StatusCode::kInvalidArgument);
  CHECK(bad([](LshConfig& c) { c.projection = static_cast<LshConfig::Projection>(7); }) ==
        StatusCode::kInvalidArgument);
  CHECK(bad([](LshConfig& c) { c.eps = 0.0f; }) == StatusCode::kInvalidArgument);
  CHECK(bad([](LshConfig& c) { c.eps = NAN; }) == StatusCode::kInvalidArgument);
  CHECK(bad([](LshConfig& c) { c.sink = -1; }) == StatusCode::kInvalidArgument);
  CHECK(bad([](LshConfig& c) { c.max_exact_tail = 10; }) == StatusCode::kInvalidArgument);
  CHECK(bad([](LshConfig& c) {
          c.K = 16;
          c.L = 5000;
        }) == StatusCode::kInvalidArgument);
}

TEST_CASE("lsh: sampling probability u matches MAGICPIG.md and the decode table", "[lsh]") {
  // The u(cos) row of MAGICPIG.md §6 for K10L150 (4 significant digits).
  const std::pair<double, double> table[] = {
      {0.0, 0.0097}, {0.2, 0.0867}, {0.4, 0.4433}, {0.6, 0.9434}};
  for (auto [c, u] : table) CHECK(lsh_sample_probability(c, 10, 150, 2) == Approx(u).margin(6e-5));
  CHECK(lsh_sample_probability(0.8, 10, 150, 2) > 0.9999);
  CHECK(lsh_sample_probability(-1.0, 10, 150, 2) == 0.0);
  CHECK(lsh_sample_probability(1.0, 10, 150, 2) == 1.0);
  // m = 1: 1 - (1 - P)^L.
  const double P = std::pow(lsh_bit_probability(0.3), 8);
  CHECK(lsh_sample_probability(0.3, 8, 75, 1) ==
        Approx(1.0 - std::pow(1.0 - P, 75)).epsilon(1e-12));

  // decode's interpolated -ln(u + eps) against the exact value.
  std::unique_ptr<LshAttention> a;
  LshShape s{8, 2, 64, DType::kBF16, 0, 1024, 1, 16, {}};
  REQUIRE(LshAttention::create(LshConfig{}, s, &a).is_ok());
  double worst = 0.0;
  for (int i = 0; i <= 20000; ++i) {
    const double c = -1.0 + 2.0 * i / 20000.0 + 1e-5 * std::sin(i);
    const double exact = -std::log(lsh_sample_probability(c, 10, 150, 2) + 1e-4);
    worst = std::max(worst, std::abs(a->score_correction(static_cast<float>(c)) - exact));
  }
  INFO("worst |correction - exact| = " << worst);
  CHECK(worst < 1e-5);  // in score units (measured 1.1e-6): see kLshLse2Tolerance
  CHECK(std::isfinite(a->score_correction(NAN)));
  CHECK(a->score_correction(2.0f) == a->score_correction(1.0f));
}

TEST_CASE("lsh check 1: hash codes equal the SimHash definition (keys and queries, K <= 15)",
          "[lsh]") {
  auto rng = make_rng("lsh-check1");
  for (CpuIsa isa : available_isas()) {
    for (auto [K, L, D] :
         {std::tuple{1, 7, 64}, {5, 20, 128}, {10, 150, 128}, {15, 9, 256}, {16, 3, 64}}) {
      const std::uint64_t seed = rng();
      SimHash sh(D, K, L, seed, isa);
      const std::int64_t rows = 37;
      std::vector<float> x = normals(rng, static_cast<std::size_t>(rows) * D);
      std::vector<std::uint16_t> codes(static_cast<std::size_t>(rows) * L);
      sh.hash(x.data(), rows, D, codes.data());
      for (std::int64_t j = 0; j < std::int64_t{K} * L; ++j)
        for (std::int32_t d = 0; d < D; ++d)
          if (static_cast<float>(simhash_normal(seed, static_cast<std::uint64_t>(j) * D + d)) !=
              sh.plane(static_cast<std::int32_t>(j), d))
            FAIL("plane " << j << " entry " << d << " differs from simhash_normal");
      std::int64_t ambiguous = 0, checked = 0;
      for (std::int64_t r = 0; r < rows; ++r) {
        for (std::int32_t l = 0; l < L; ++l) {
          for (std::int32_t b = 0; b < K; ++b) {
            const std::int64_t j = std::int64_t{l} * K + b;
            double dot = 0.0, mag = 0.0;
            for (std::int32_t d = 0; d < D; ++d) {
              const double w = sh.plane(static_cast<std::int32_t>(j), d);
              dot += x[r * D + d] * w;
              mag += std::abs(x[r * D + d] * w);
            }
            const bool want = dot > 0.0;
            const bool got = (codes[r * L + l] >> b) & 1u;
            // f32 accumulation can only flip a sign within ~D u sum|x w|.
            if (std::abs(dot) <= 1e-5 * mag) {
              ++ambiguous;
              continue;
            }
            ++checked;
            if (got != want)
              FAIL("isa " << to_string(isa) << " K" << K << " L" << L << " D" << D << " row " << r
                          << " table " << l << " bit " << b << " " << seed_note());
          }
          if (codes[r * L + l] >= (1u << K)) FAIL("code wider than K bits");
        }
      }
      CHECK(checked + ambiguous == rows * K * L);
      CHECK(ambiguous <= 1 + rows * K * L / 1000);
    }
  }
}

TEST_CASE("simhash: sign bits computed in parts of the planes equal hash()", "[lsh]") {
  auto rng = make_rng("simhash-parts");
  for (CpuIsa isa : available_isas()) {
    for (auto [K, L, D] : {std::tuple{10, 150, 128}, {3, 7, 64}, {16, 9, 256}}) {
      SimHash sh(D, K, L, rng(), isa);
      const std::int64_t rows = 11;  // register blocks of 4 and a remainder
      const std::vector<float> x = normals(rng, static_cast<std::size_t>(rows) * D);
      std::vector<std::uint16_t> want(static_cast<std::size_t>(rows) * L);
      sh.hash(x.data(), rows, D, want.data());
      const std::int32_t words = sh.words();
      CHECK(words == (K * L + 63) / 64);
      std::vector<std::uint64_t> bits(static_cast<std::size_t>(rows) * words,
                                      0x5a5a5a5a5a5a5a5aull);
      for (std::int32_t w0 = 0; w0 < words; w0 += 2)  // parts of 2 words, last one shorter
        sh.sign_bits(x.data(), rows, D, w0, std::min(words, w0 + 2), bits.data());
      std::vector<std::uint16_t> got(want.size());
      sh.codes(bits.data(), rows, got.data());
      INFO("isa " << to_string(isa) << " K" << K << " L" << L << " D" << D << " " << seed_note());
      CHECK(got == want);
    }
  }
}

TEST_CASE("lsh check 2: collision rate at fixed cosine matches u (Monte Carlo, 4 sigma)", "[lsh]") {
  auto rng = make_rng("lsh-check2");
  constexpr std::int32_t D = 64;
  for (auto [K, L] : {std::pair{10, 150}, {8, 75}}) {
    const double cosines[] = {0.0, 0.2, 0.4, 0.6};
    constexpr int kProjections = 120, kPairs = 40;
    // Per cosine, the hit rate of each independent projection (batch means:
    // pairs under one projection are not independent of each other).
    std::vector<std::vector<double>> rate(4);
    for (int p = 0; p < kProjections; ++p) {
      SimHash sh(D, K, L, rng());
      for (int ci = 0; ci < 4; ++ci) {
        int hits = 0;
        for (int t = 0; t < kPairs; ++t) {
          // q random unit; k at exactly the cosine, in a random direction orthogonal to q.
          std::vector<float> q = normals(rng, D), r = normals(rng, D);
          double qq = 0, qr = 0;
          for (int d = 0; d < D; ++d) qq += double{q[d]} * q[d];
          for (int d = 0; d < D; ++d) qr += double{q[d]} * r[d];
          std::vector<double> o(D);
          double oo = 0;
          for (int d = 0; d < D; ++d) {
            o[d] = r[d] - qr / qq * q[d];
            oo += o[d] * o[d];
          }
          std::vector<float> k(D);
          const double c = cosines[ci], sn = std::sqrt(1 - c * c);
          for (int d = 0; d < D; ++d)
            k[d] = static_cast<float>(c * q[d] / std::sqrt(qq) + sn * o[d] / std::sqrt(oo));
          std::vector<std::uint16_t> qc(L), kc(L);
          sh.hash(q.data(), 1, D, qc.data());
          sh.hash(k.data(), 1, D, kc.data());
          int same = 0;
          for (int l = 0; l < L; ++l) same += qc[l] == kc[l];
          hits += same >= 2;
        }
        rate[ci].push_back(double(hits) / kPairs);
      }
    }
    for (int ci = 0; ci < 4; ++ci) {
      const double u = lsh_sample_probability(cosines[ci], K, L, 2);
      double mean = 0, var = 0;
      for (double x : rate[ci]) mean += x;
      mean /= kProjections;
      for (double x : rate[ci]) var += (x - mean) * (x - mean);
      var /= kProjections - 1;
      // Standard error from the batches, and never below the binomial one.
      const double se =
          std::max(std::sqrt(var / kProjections), std::sqrt(u * (1 - u) / (kProjections * kPairs)));
      INFO("K" << K << "L" << L << " cos " << cosines[ci] << ": rate " << mean << " u " << u
               << " se " << se << " " << seed_note());
      CHECK(std::abs(mean - u) <= 4 * se);
    }
  }
}

TEST_CASE("lsh check 4: each table is a permutation bucketed by the key codes", "[lsh]") {
  auto rng = make_rng("lsh-check4");
  for (auto cfg : {config(10, 150), config(8, 75), config(4, 9)}) {
    LshLayer layer = make_layer(cfg, 4, 2, 64, DType::kBF16, {1500}, rng);
    const std::int64_t seq = 100;
    LshPartition part;
    REQUIRE(layer.attn->partition(seq, &part).is_ok());
    CHECK(part.sink_end == cfg.sink);
    CHECK(part.tail_begin == 1500 - cfg.window);
    const std::int64_t n = part.tail_begin - part.sink_end;
    for (std::int32_t h = 0; h < 2; ++h) {
      const LshTables* t = layer.attn->tables(seq, h);
      REQUIRE(t != nullptr);
      REQUIRE(t->size() == n);
      REQUIRE_FALSE(t->wide());
      std::span<const float> mu;
      REQUIRE(layer.attn->mu(seq, h, &mu).is_ok());
      // mu is the mean of the indexed keys.
      for (std::int32_t d = 0; d < 64; ++d) {
        double m = 0;
        for (std::int64_t i = part.sink_end; i < part.tail_begin; ++i) m += layer.key(seq, i, h)[d];
        CHECK(mu[d] == Approx(m / double(n)).margin(1e-5));
      }
      // Codes of the centered keys, hashed one at a time.
      std::vector<std::uint16_t> codes(static_cast<std::size_t>(n) * cfg.L);
      std::vector<float> x(64);
      for (std::int64_t i = 0; i < n; ++i) {
        const float* k = layer.key(seq, part.sink_end + i, h);
        for (int d = 0; d < 64; ++d) x[d] = k[d] - mu[d];
        layer.attn->projection(h)->hash(x.data(), 1, 64, codes.data() + i * cfg.L);
      }
      for (std::int32_t l = 0; l < cfg.L; ++l) {
        const auto off = t->offsets(l);
        REQUIRE(off.front() == 0);
        REQUIRE(off.back() == n);
        std::vector<std::uint32_t> hist(off.size() - 1, 0);
        for (std::int64_t i = 0; i < n; ++i) ++hist[codes[i * cfg.L + l]];
        std::vector<char> seen(static_cast<std::size_t>(n), 0);
        for (std::size_t c = 0; c + 1 < off.size(); ++c) {
          REQUIRE(off[c + 1] - off[c] == hist[c]);
          for (std::uint32_t j = off[c]; j < off[c + 1]; ++j) {
            const std::uint32_t p = t->position(l, j);
            REQUIRE(p < n);
            REQUIRE(codes[p * cfg.L + l] == c);  // the key's own code
            REQUIRE_FALSE(seen[p]);
            seen[p] = 1;
            if (j > off[c]) REQUIRE(t->position(l, j - 1) < p);  // ascending
          }
        }
      }
    }
  }
}

TEST_CASE("lsh check 3: retrieval returns exactly the brute-force set", "[lsh]") {
  auto rng = make_rng("lsh-check3");
  // Other m too: m <= 8 counts in thermometer bytes (m = 8 their last bit),
  // m >= 9 in epoch-stamped counters.
  auto with_m = [](LshConfig c, std::int32_t m) {
    c.min_collisions = m;
    return c;
  };
  for (auto cfg : {config(10, 150), config(6, 20), config(8, 75), with_m(config(6, 20), 1),
                   with_m(config(6, 20), 3), with_m(config(8, 75), 4), with_m(config(4, 20), 8),
                   with_m(config(4, 20), 9)}) {
    // GQA 4, three sequences of uneven length, one shorter than sink + window.
    const std::vector<std::int64_t> lens{1777, 40, 3001};
    LshLayer layer = make_layer(cfg, 8, 2, 64, DType::kF16, lens, rng);
    for (std::size_t s = 0; s < lens.size(); ++s) {
      const std::int64_t seq = 100 + static_cast<std::int64_t>(s);
      for (std::int32_t qh = 0; qh < 8; ++qh) {
        // Queries near a key (so something collides) and random ones.
        std::vector<float> q = normals(rng, 64);
        if (qh % 2 == 0 && lens[s] > 100) {
          const float* k =
              layer.key(seq, static_cast<std::int64_t>(rng() % (lens[s] - 70)) + 4, qh / 4);
          for (int d = 0; d < 64; ++d) q[d] = q[d] * 0.3f + k[d];
        }
        std::vector<std::int64_t> got;
        REQUIRE(layer.attn->sampled_positions(seq, qh, q.data(), &got).is_ok());
        const auto want = brute_force_sampled(layer, seq, qh, q.data());
        INFO("K" << cfg.K << "L" << cfg.L << " m " << cfg.min_collisions << " seq " << s << " head "
                 << qh << " " << seed_note());
        REQUIRE(got == want);  // sorted, so also free of duplicates
      }
    }
  }
}

namespace {

// Runs decode (merged or sampled-only) and compares every head with the
// double reference over the brute-force sets.
void check_decode_against_reference(LshLayer& layer, std::mt19937_64& rng, bool merged,
                                    DType q_dtype, DType o_dtype, const Tolerance& tol,
                                    const std::string& what) {
  const std::int32_t Hq = layer.shape.num_q_heads, D = layer.shape.head_dim;
  const auto ids = seq_ids(layer.k.size());
  const auto B = static_cast<std::int32_t>(ids.size());
  std::vector<float> q = normals(rng, static_cast<std::size_t>(B) * Hq * D);
  round_to(q, q_dtype);
  const auto qb = encode(q, q_dtype);
  std::vector<std::byte> ob(static_cast<std::size_t>(B) * Hq * D * size_of(o_dtype));
  fill_nan(ob.data(), o_dtype, static_cast<std::size_t>(B) * Hq * D);
  std::vector<float> lse(static_cast<std::size_t>(B) * Hq, NAN);
  const QueryView qv = make_query_view(qb.data(), q_dtype, B, Hq, D);
  const PartialView ov = make_partial_view(ob.data(), o_dtype, lse.data(), B, Hq, D);
  const Status st = merged ? layer.attn->decode(ids, qv, ov, shared_executor())
                           : layer.attn->decode_sampled(ids, qv, ov, shared_executor());
  REQUIRE(st.is_ok());
  std::vector<double> got, want, got_lse, want_lse;
  for (std::int32_t b = 0; b < B; ++b) {
    for (std::int32_t h = 0; h < Hq; ++h) {
      const float* qh = q.data() + (std::int64_t{b} * Hq + h) * D;
      const auto sampled = layer.cfg.sample_all ? [&] {
        LshPartition p;
        (void)layer.attn->partition(ids[b], &p);
        std::vector<std::int64_t> all;
        for (std::int64_t t = p.sink_end; t < p.tail_begin; ++t) all.push_back(t);
        return all;
      }()
                                                : brute_force_sampled(layer, ids[b], h, qh);
      std::vector<double> o;
      want_lse.push_back(reference_head(layer, ids[b], h, qh, sampled, merged, &o));
      want.insert(want.end(), o.begin(), o.end());
      got_lse.push_back(lse[std::size_t(b) * Hq + h]);
      for (std::int32_t d = 0; d < D; ++d)
        got.push_back(load_as_float(ob.data(), o_dtype, (std::int64_t{b} * Hq + h) * D + d));
    }
  }
  INFO(what);
  const std::string e1 = compare("o", got, want, tol, what);
  INFO(e1);
  CHECK(e1.empty());
  const std::string e2 = compare("lse2", got_lse, want_lse, kLshLse2Tolerance, what);
  INFO(e2);
  CHECK(e2.empty());
}

}  // namespace

TEST_CASE("lsh: decode equals the double reference on every ISA, dtype and head dim", "[lsh]") {
  auto rng = make_rng("lsh-decode-ref");
  for (CpuIsa isa : available_isas()) {
    for (auto [kv, D, G] : {std::tuple{DType::kBF16, 128, 4},
                            {DType::kF16, 64, 1},
                            {DType::kF32, 64, 8},
                            {DType::kBF16, 256, 2},
                            {DType::kBF16, 64, 20}}) {
      // For grouped heads, both ways of attending the sampled rows.
      std::vector<LshConfig::Gather> gathers = {LshConfig::Gather::kPerHead};
      if (G > 1) gathers.push_back(LshConfig::Gather::kUnion);
      for (LshConfig::Gather gather : gathers) {
        LshConfig cfg = config(6, 24);  // samples a good share of the keys
        cfg.max_exact_tail = 100;
        cfg.gather = gather;
        LshLayer layer = make_layer(cfg, 2 * G, 2, D, kv, {900, 50, 1300}, rng, isa);
        for (bool merged : {true, false}) {
          for (DType o : {DType::kF32, DType::kBF16}) {
            const std::string what = std::string("isa ") + std::string(to_string(isa)) + " kv " +
                                     std::string(to_string(kv)) + " D " + std::to_string(D) +
                                     " G " + std::to_string(G) + " gather " +
                                     std::to_string(static_cast<int>(gather)) +
                                     (merged ? " merged" : " sampled") + " " + seed_note();
            check_decode_against_reference(layer, rng, merged, DType::kF32, o,
                                           lsh_output_tolerance(o), what);
          }
        }
      }
    }
  }
  // Pages that are not a power of two (row addresses by division), m = 3
  // (thermometer bytes) and m = 9 (epoch-stamped counters), both gathers.
  for (auto [m, gather] : {std::pair{3, LshConfig::Gather::kPerHead},
                           {3, LshConfig::Gather::kUnion},
                           {9, LshConfig::Gather::kPerHead},
                           {9, LshConfig::Gather::kUnion}}) {
    LshConfig cfg = config(m == 3 ? 5 : 3, 24);
    cfg.min_collisions = m;
    cfg.max_exact_tail = 100;
    cfg.gather = gather;
    LshLayer layer =
        make_layer(cfg, 8, 2, 128, DType::kBF16, {900, 50, 1300}, rng, cpu_isa_default(), 0.5f, 12);
    for (bool merged : {true, false}) {
      const std::string what = std::string("page 12, m ") + std::to_string(m) + ", gather " +
                               std::to_string(static_cast<int>(gather)) +
                               (merged ? " merged " : " sampled ") + seed_note();
      check_decode_against_reference(layer, rng, merged, DType::kF32, DType::kF32,
                                     lsh_output_tolerance(DType::kF32), what);
    }
  }
}

TEST_CASE("lsh check 5: sampling everything (u = 1) reproduces dense attention", "[lsh]") {
  auto rng = make_rng("lsh-check5");
  for (CpuIsa isa : available_isas()) {
    for (LshConfig::Gather gather : {LshConfig::Gather::kPerHead, LshConfig::Gather::kUnion}) {
      LshConfig cfg = config(10, 150);
      cfg.sample_all = true;
      cfg.gather = gather;
      const std::vector<std::int64_t> lens{3000, 77, 1234};
      LshLayer layer = make_layer(cfg, 8, 2, 128, DType::kF32, lens, rng, isa);
      const auto ids = seq_ids(lens.size());
      const std::int32_t B = 3, Hq = 8, D = 128;
      std::vector<float> q = normals(rng, std::size_t(B) * Hq * D);
      std::vector<float> o(std::size_t(B) * Hq * D), lse(std::size_t(B) * Hq);
      const QueryView qv = make_query_view(q.data(), DType::kF32, B, Hq, D);
      REQUIRE(layer.attn
                  ->decode(ids, qv, make_partial_view(o.data(), DType::kF32, lse.data(), B, Hq, D),
                           shared_executor())
                  .is_ok());
      // Dense reference over the layer's own cache, through its paged view.
      PageTable table;
      PagedKvView kv;
      REQUIRE(layer.attn->kv_view(ids, &table, &kv).is_ok());
      DecodeProblem p{B, Hq, 2, D, DType::kF32, DType::kF32, DType::kF32, {}};
      ref::Result r;
      REQUIRE(ref::decode(p, qv, kv, &r).is_ok());
      for (std::int32_t i = 0; i < B * Hq; ++i) {
        double num = 0, den = 0;
        for (std::int32_t d = 0; d < D; ++d) {
          const double e = o[std::size_t(i) * D + d] - r.o[std::size_t(i) * D + d];
          num += e * e;
          den += r.o[std::size_t(i) * D + d] * r.o[std::size_t(i) * D + d];
        }
        INFO("isa " << to_string(isa) << " gather " << static_cast<int>(gather) << " head " << i
                    << " " << seed_note());
        CHECK(std::sqrt(num / den) <= 1e-5);
        CHECK(lse[i] == Approx(r.lse2[i]).epsilon(1e-5));
      }
    }
  }
}

TEST_CASE("lsh check 6: centering leaves exact attention unchanged; partials merge", "[lsh]") {
  auto rng = make_rng("lsh-check6");
  LshConfig cfg = config(10, 150);
  cfg.sample_all = true;
  const std::int32_t Hq = 8, Hk = 2, D = 64, n = 2000;
  LshLayer a = make_layer(cfg, Hq, Hk, D, DType::kF32, {n}, rng, cpu_isa_default(), 2.0f);
  // The same keys, centered by the caller with a's mu.
  LshLayer c;
  c.cfg = cfg;
  c.shape = a.shape;
  REQUIRE(LshAttention::create(cfg, c.shape, &c.attn).is_ok());
  std::vector<float> kc = a.k.at(100);
  for (std::int32_t h = 0; h < Hk; ++h) {
    std::span<const float> mu;
    REQUIRE(a.attn->mu(100, h, &mu).is_ok());
    for (std::int64_t t = 0; t < n; ++t)
      for (std::int32_t d = 0; d < D; ++d) kc[(t * Hk + h) * D + d] -= mu[d];
  }
  REQUIRE(c.attn->prefill(100, kc.data(), a.v.at(100).data(), n, shared_executor()).is_ok());
  std::vector<float> q = normals(rng, std::size_t(Hq) * D);
  const std::int64_t ids[] = {100};
  std::vector<float> oa(std::size_t(Hq) * D), oc(oa.size()), la(Hq), lc(Hq);
  const QueryView qv = make_query_view(q.data(), DType::kF32, 1, Hq, D);
  REQUIRE(a.attn
              ->decode(ids, qv, make_partial_view(oa.data(), DType::kF32, la.data(), 1, Hq, D),
                       shared_executor())
              .is_ok());
  REQUIRE(c.attn
              ->decode(ids, qv, make_partial_view(oc.data(), DType::kF32, lc.data(), 1, Hq, D),
                       shared_executor())
              .is_ok());
  for (std::int32_t h = 0; h < Hq; ++h) {
    double num = 0, den = 0;
    for (std::int32_t d = 0; d < D; ++d) {
      num += std::pow(oa[h * D + d] - oc[h * D + d], 2);
      den += std::pow(oc[h * D + d], 2);
    }
    CHECK(std::sqrt(num / den) <= 1e-5);
  }

  // Partial-only path: the caller attends the exact part on its own
  // (uncentered) keys; merging gives decode()'s result.
  LshConfig cs = config(8, 40);
  LshLayer s = make_layer(cs, Hq, Hk, D, DType::kF32, {n}, rng, cpu_isa_default(), 2.0f);
  std::vector<float> om(oa.size()), lm(Hq), os(oa.size()), ls(Hq), oe(oa.size()), le(Hq);
  REQUIRE(s.attn
              ->decode(ids, qv, make_partial_view(om.data(), DType::kF32, lm.data(), 1, Hq, D),
                       shared_executor())
              .is_ok());
  REQUIRE(s.attn
              ->decode_sampled(ids, qv,
                               make_partial_view(os.data(), DType::kF32, ls.data(), 1, Hq, D),
                               shared_executor())
              .is_ok());
  LshPartition part;
  REQUIRE(s.attn->partition(100, &part).is_ok());
  std::vector<std::int64_t> exact;
  for (std::int64_t t = 0; t < part.sink_end; ++t) exact.push_back(t);
  for (std::int64_t t = part.tail_begin; t < part.length; ++t) exact.push_back(t);
  for (std::int32_t h = 0; h < Hq; ++h) {
    std::vector<double> o;
    le[h] = static_cast<float>(attend_positions(s, 100, h, q.data() + h * D, exact, &o));
    for (std::int32_t d = 0; d < D; ++d) oe[h * D + d] = static_cast<float>(o[d]);
  }
  const PartialView ps = make_partial_view(os.data(), DType::kF32, ls.data(), 1, Hq, D);
  REQUIRE(merge_partials(ps, make_partial_view(oe.data(), DType::kF32, le.data(), 1, Hq, D), ps)
              .is_ok());
  for (std::int32_t i = 0; i < Hq * D; ++i)
    CHECK(os[i] == Approx(om[i]).epsilon(1e-4).margin(1e-5));
  for (std::int32_t h = 0; h < Hq; ++h) CHECK(ls[h] == Approx(lm[h]).epsilon(1e-5));
}

TEST_CASE("lsh check 7: unnormalized numerator and denominator are unbiased", "[lsh]") {
  auto rng = make_rng("lsh-check7");
  constexpr std::int32_t D = 64, n = 2500, kSeeds = 64;
  // Keys with a spread of cosines to a fixed query: k = a q^ + noise.
  std::vector<float> q = normals(rng, D);
  double qn = 0;
  for (float x : q) qn += double{x} * x;
  qn = std::sqrt(qn);
  std::vector<float> k = normals(rng, std::size_t(n) * D), v = normals(rng, std::size_t(n) * D);
  std::uniform_real_distribution<float> ud(-4.0f, 10.0f);
  for (std::int64_t i = 0; i < n; ++i) {
    const float a = ud(rng);
    for (std::int32_t d = 0; d < D; ++d) k[i * D + d] += a * q[d] / static_cast<float>(qn);
  }
  std::vector<double> z_num, z_den, est_nums, est_dens;
  double exact_num = 0, exact_den = 0;
  for (int seed_i = 0; seed_i < kSeeds; ++seed_i) {
    LshLayer layer;
    layer.cfg = config(10, 150);
    layer.cfg.seed = rng();
    layer.shape = {1, 1, D, DType::kF32, 0, n + 16, 1, 16, {}};
    REQUIRE(LshAttention::create(layer.cfg, layer.shape, &layer.attn).is_ok());
    REQUIRE(layer.attn->prefill(100, k.data(), v.data(), n, shared_executor()).is_ok());
    layer.k[100] = k;
    layer.v[100] = v;
    std::vector<std::int64_t> sampled;
    REQUIRE(layer.attn->sampled_positions(100, 0, q.data(), &sampled).is_ok());
    LshPartition part;
    REQUIRE(layer.attn->partition(100, &part).is_ok());
    std::span<const float> mu;
    REQUIRE(layer.attn->mu(100, 0, &mu).is_ok());
    // Horvitz-Thompson sums over the indexed part, scores shifted by a constant.
    const double scale = 1.0 / std::sqrt(double(D));
    std::vector<double> s(n), u(n);
    double smax = -1e300;
    for (std::int64_t i = part.sink_end; i < part.tail_begin; ++i) {
      double qk = 0, qc = 0, kk = 0;
      for (std::int32_t d = 0; d < D; ++d) {
        const double c = double{k[i * D + d]} - mu[d];
        qk += double{q[d]} * k[i * D + d];
        qc += double{q[d]} * c;
        kk += c * c;
      }
      s[i] = scale * qk;
      smax = std::max(smax, s[i]);
      u[i] = lsh_sample_probability(qc / (qn * std::sqrt(kk)), 10, 150, 2);
    }
    double num = 0, den = 0, est_num = 0, est_den = 0, var_num = 0, var_den = 0;
    std::vector<char> in(n, 0);
    for (std::int64_t t : sampled) in[t] = 1;
    for (std::int64_t i = part.sink_end; i < part.tail_begin; ++i) {
      const double e = std::exp(s[i] - smax), x = v[i * D];
      num += e * x;
      den += e;
      if (in[i]) {
        est_num += e * x / u[i];
        est_den += e / u[i];
      }
      var_num += (1 - u[i]) / u[i] * e * e * x * x;
      var_den += (1 - u[i]) / u[i] * e * e;
    }
    z_num.push_back((est_num - num) / std::sqrt(var_num));
    z_den.push_back((est_den - den) / std::sqrt(var_den));
    est_nums.push_back(est_num);
    est_dens.push_back(est_den);
    exact_num = num;
    exact_den = den;
  }
  // Unbiasedness: the mean estimate over the independent projections against
  // the exact sum (t statistic with the spread across projections). The
  // z-scores of single estimates use that spread too: inclusions of similar
  // keys under one projection are correlated, so the independent-inclusion
  // (Horvitz-Thompson) variance understates it; its z-scores are printed.
  for (const auto& [est, exact, z_ht, what] :
       {std::tuple{&est_nums, exact_num, &z_num, "numerator"},
        std::tuple{&est_dens, exact_den, &z_den, "denominator"}}) {
    const double n_s = double(est->size());
    double mean = 0, var = 0;
    for (double x : *est) mean += x;
    mean /= n_s;
    for (double x : *est) var += (x - mean) * (x - mean);
    const double sd = std::sqrt(var / (n_s - 1));
    const double t = (mean - exact) / (sd / std::sqrt(n_s));
    double mean_abs = 0, mean_abs_ht = 0;
    int over3 = 0;
    for (double x : *est) {
      const double z = (x - exact) / sd;
      mean_abs += std::abs(z);
      over3 += std::abs(z) > 3;
    }
    for (double z : *z_ht) mean_abs_ht += std::abs(z);
    mean_abs /= n_s;
    mean_abs_ht /= n_s;
    INFO(what << ": t = " << t << ", mean |z| = " << mean_abs << ", |z| > 3: " << over3 << " of "
              << est->size() << " (independent-inclusion variance: mean |z| = " << mean_abs_ht
              << ") " << seed_note());
    // For 64 N(0,1) values mean |z| is 0.80 with a standard error of
    // 0.60 / sqrt(64) = 0.075: 4 sigma is 0.50 .. 1.10. Importance weights are
    // heavy-tailed (a rarely sampled key with a large weight), which lowers
    // mean |z| when one such estimate inflates the spread; at most 3 of 64
    // beyond 3 sigma (a normal gives 0.13 on average).
    CHECK(std::abs(t) < 4.0);
    CHECK(mean_abs > 0.45);  // 0.50 less a margin for the heavy tail
    CHECK(mean_abs < 1.10);
    CHECK(over3 <= 3);
  }
}

TEST_CASE("lsh check 8: sampled fraction on isotropic keys matches MAGICPIG.md", "[lsh]") {
  auto rng = make_rng("lsh-check8");
  // MAGICPIG.md §6, isotropic centered keys, d = 128.
  for (auto [K, L, want] :
       {std::tuple{10, 150, 0.0157}, {8, 75, 0.0458}, {10, 170, 0.0197}, {11, 300, 0.0173}}) {
    LshLayer layer =
        make_layer(config(K, L), 16, 2, 128, DType::kBF16, {4164}, rng, cpu_isa_default(), 0.0f);
    double sum = 0;
    int count = 0;
    for (int t = 0; t < 24; ++t) {
      for (std::int32_t h = 0; h < 16; ++h) {
        std::vector<float> q = normals(rng, 128);
        std::vector<std::int64_t> s;
        REQUIRE(layer.attn->sampled_positions(100, h, q.data(), &s).is_ok());
        sum += double(s.size()) / 4096.0;
        ++count;
      }
    }
    const double frac = sum / count;
    INFO("K" << K << "L" << L << ": sampled fraction " << frac << " want " << want << " "
             << seed_note());
    CHECK(std::abs(frac / want - 1.0) <= 0.05);
  }
}

TEST_CASE("lsh check 9: sampling beats TopK at the same budget on diffuse attention", "[lsh]") {
  auto rng = make_rng("lsh-check9");
  // Diffuse heads: scores with a spread of about 1 (no few keys dominate)
  // and values that depend on the keys (v = A k + noise, as both come from
  // one hidden state), so the attention tail TopK drops carries signal.
  const std::int32_t Hq = 8, Hk = 2, D = 128;
  const std::int64_t n = 8192;
  LshLayer layer;
  layer.cfg = config(10, 150);
  layer.shape = {Hq, Hk, D, DType::kF32, 0, n + 64, 1, 16, {}};
  REQUIRE(LshAttention::create(layer.cfg, layer.shape, &layer.attn).is_ok());
  std::vector<float> k = normals(rng, std::size_t(n) * Hk * D), v(k.size());
  const std::vector<float> off = normals(rng, std::size_t(Hk) * D, 0.5f);
  const std::vector<float> A = normals(rng, std::size_t(D) * D, 1.0f / std::sqrt(float(D)));
  const std::vector<float> noise = normals(rng, k.size(), 0.5f);
  for (std::size_t i = 0; i < k.size(); ++i) k[i] += off[i % (Hk * D)];
  for (std::int64_t t = 0; t < n * Hk; ++t)
    for (std::int32_t r = 0; r < D; ++r) {
      float acc = noise[std::size_t(t) * D + r];
      for (std::int32_t c = 0; c < D; ++c)
        acc += A[std::size_t(r) * D + c] * k[std::size_t(t) * D + c];
      v[std::size_t(t) * D + r] = acc;
    }
  REQUIRE(layer.attn->prefill(100, k.data(), v.data(), n, shared_executor()).is_ok());
  layer.k[100] = k;
  layer.v[100] = v;
  double err_lsh = 0, err_topk = 0;
  int heads = 0;
  for (int t = 0; t < 4; ++t) {
    std::vector<float> q = normals(rng, std::size_t(Hq) * D, 1.0f);
    std::vector<float> o(std::size_t(Hq) * D), lse(Hq);
    const std::int64_t ids[] = {100};
    REQUIRE(layer.attn
                ->decode(ids, make_query_view(q.data(), DType::kF32, 1, Hq, D),
                         make_partial_view(o.data(), DType::kF32, lse.data(), 1, Hq, D),
                         shared_executor())
                .is_ok());
    LshPartition part;
    REQUIRE(layer.attn->partition(100, &part).is_ok());
    for (std::int32_t h = 0; h < Hq; ++h) {
      const float* qh = q.data() + h * D;
      std::vector<std::int64_t> all(n);
      std::iota(all.begin(), all.end(), 0);
      std::vector<double> exact, top;
      attend_positions(layer, 100, h, qh, all, &exact);
      std::vector<std::int64_t> sampled;
      REQUIRE(layer.attn->sampled_positions(100, h, qh, &sampled).is_ok());
      // TopK: the exact part plus the |sampled| highest-scoring indexed keys.
      std::vector<std::pair<double, std::int64_t>> sc;
      for (std::int64_t i = part.sink_end; i < part.tail_begin; ++i) {
        double s = 0;
        for (std::int32_t d = 0; d < D; ++d) s += double{qh[d]} * layer.key(100, i, h / 4)[d];
        sc.emplace_back(-s, i);
      }
      std::sort(sc.begin(), sc.end());
      std::vector<std::int64_t> keep;
      for (std::int64_t i = 0; i < part.sink_end; ++i) keep.push_back(i);
      for (std::int64_t i = part.tail_begin; i < n; ++i) keep.push_back(i);
      for (std::size_t i = 0; i < sampled.size(); ++i) keep.push_back(sc[i].second);
      attend_positions(layer, 100, h, qh, keep, &top);
      double nl = 0, nt = 0, ne = 0;
      for (std::int32_t d = 0; d < D; ++d) {
        nl += std::pow(o[h * D + d] - exact[d], 2);
        nt += std::pow(top[d] - exact[d], 2);
        ne += exact[d] * exact[d];
      }
      err_lsh += std::sqrt(nl / ne);
      err_topk += std::sqrt(nt / ne);
      ++heads;
    }
  }
  err_lsh /= heads;
  err_topk /= heads;
  INFO("diffuse: rel error lsh " << err_lsh << " topk " << err_topk << " " << seed_note());
  CHECK(err_lsh < err_topk);
}

TEST_CASE("lsh: incremental insertion gives the tables of a full rebuild", "[lsh]") {
  auto rng = make_rng("lsh-incremental");
  // LshTables alone: build + inserts (side tables, then folds) vs one build.
  for (auto [K, L] : {std::pair{4, 5}, {10, 12}}) {
    const std::int64_t n = 9000;
    std::vector<std::uint16_t> codes(static_cast<std::size_t>(n) * L);
    for (auto& c : codes) c = static_cast<std::uint16_t>(rng() % (1u << K));
    LshTables inc(K, L), full(K, L);
    inc.build(codes.data(), 3000);
    std::int64_t at = 3000;
    for (std::int64_t step : {1, 7, 200, 1000, 33, 2500, 2259}) {
      inc.insert(codes.data() + at * L, step);
      at += step;
      full.build(codes.data(), at);
      for (std::int32_t l = 0; l < L; ++l)
        for (std::uint32_t c = 0; c < (1u << K); ++c) {
          std::vector<std::uint32_t> a, b;
          inc.for_each_in_bucket(l, c, [&](std::uint32_t p) { a.push_back(p); });
          full.for_each_in_bucket(l, c, [&](std::uint32_t p) { b.push_back(p); });
          REQUIRE(a == b);
        }
    }
    REQUIRE(at == n);
    inc.compact();
    for (std::int32_t l = 0; l < L; ++l) {
      REQUIRE(std::equal(inc.offsets(l).begin(), inc.offsets(l).end(), full.offsets(l).begin()));
      for (std::int64_t i = 0; i < n; ++i) REQUIRE(inc.position(l, i) == full.position(l, i));
    }
  }

  // A layer: generated tokens leave the exact tail and are indexed; the sets
  // equal those of an index rebuilt from scratch over the same positions.
  LshConfig cfg = config(8, 40);
  cfg.max_exact_tail = 96;
  LshLayer layer = make_layer(cfg, 4, 2, 64, DType::kBF16, {2000}, rng);
  append_tokens(layer, 100, 700, rng);
  LshPartition part;
  REQUIRE(layer.attn->partition(100, &part).is_ok());
  CHECK(part.length == 2700);
  CHECK(part.length - part.tail_begin <= cfg.max_exact_tail);
  CHECK(part.tail_begin > 2000 - cfg.window);  // generated tokens were indexed
  std::vector<std::vector<std::int64_t>> before;
  std::vector<std::vector<float>> queries;
  for (int i = 0; i < 16; ++i) {
    queries.push_back(normals(rng, 64));
    const float* kk = layer.key(100, part.tail_begin - 1 - i * 17, (i % 4) / 2);
    for (int d = 0; d < 64; ++d) queries.back()[d] = queries.back()[d] * 0.2f + kk[d];
    std::vector<std::int64_t> s;
    REQUIRE(layer.attn->sampled_positions(100, i % 4, queries.back().data(), &s).is_ok());
    REQUIRE(s == brute_force_sampled(layer, 100, i % 4, queries.back().data()));
    before.push_back(s);
  }
  // Decode over the side tables against the double reference (the sets above
  // were checked through sampled_positions() only).
  for (bool merged : {true, false})
    check_decode_against_reference(layer, rng, merged, DType::kF32, DType::kF32,
                                   lsh_output_tolerance(DType::kF32),
                                   std::string("after appends, per head") + seed_note());
  REQUIRE(layer.attn->rebuild_index(100, shared_executor()).is_ok());
  for (int i = 0; i < 16; ++i) {
    std::vector<std::int64_t> s;
    REQUIRE(layer.attn->sampled_positions(100, i % 4, queries[i].data(), &s).is_ok());
    CHECK(s == before[i]);
  }

  // The union gather over side tables: two sequences, one with appends.
  cfg.gather = LshConfig::Gather::kUnion;
  LshLayer grouped = make_layer(cfg, 8, 2, 64, DType::kBF16, {1500, 700}, rng);
  append_tokens(grouped, 101, 300, rng);
  for (bool merged : {true, false})
    check_decode_against_reference(grouped, rng, merged, DType::kF32, DType::kF32,
                                   lsh_output_tolerance(DType::kF32),
                                   std::string("after appends, union") + seed_note());
}

TEST_CASE("lsh: results are bitwise identical on any thread count", "[lsh][determinism]") {
  auto rng = make_rng("lsh-determinism");
  for (LshConfig::Gather gather : {LshConfig::Gather::kPerHead, LshConfig::Gather::kUnion}) {
    LshConfig cfg = config(8, 60);
    cfg.gather = gather;
    LshLayer layer = make_layer(cfg, 16, 4, 128, DType::kBF16, {3000, 1000, 5000, 64}, rng);
    const auto ids = seq_ids(4);
    std::vector<float> q = normals(rng, 4 * 16 * 128);
    const QueryView qv = make_query_view(q.data(), DType::kF32, 4, 16, 128);
    auto run = [&](const CpuExecutor& ex) {
      std::vector<float> o(4 * 16 * 128), lse(4 * 16);
      REQUIRE(layer.attn
                  ->decode(ids, qv,
                           make_partial_view(o.data(), DType::kF32, lse.data(), 4, 16, 128), ex)
                  .is_ok());
      o.insert(o.end(), lse.begin(), lse.end());
      return o;
    };
    const auto one = run(CpuExecutor(1));
    const auto two = run(CpuExecutor(2));
    const auto four = run(CpuExecutor(4));
    INFO("gather " << static_cast<int>(gather));
    CHECK(std::memcmp(one.data(), two.data(), one.size() * 4) == 0);
    CHECK(std::memcmp(one.data(), four.data(), one.size() * 4) == 0);
  }
}

TEST_CASE("lsh: bad input returns a Status and changes nothing", "[lsh][errors]") {
  auto rng = make_rng("lsh-errors");
  std::unique_ptr<LshAttention> a;
  LshShape s{8, 2, 64, DType::kBF16, 0, 4096, 2, 16, {}};
  CHECK(LshAttention::create(LshConfig{}, s, nullptr).code() == StatusCode::kInvalidArgument);
  LshConfig bad;
  bad.K = 17;
  CHECK(LshAttention::create(bad, s, &a).code() == StatusCode::kInvalidArgument);
  LshShape s2 = s;
  s2.head_dim = 96;
  CHECK(LshAttention::create(LshConfig{}, s2, &a).code() == StatusCode::kNotSupported);
  s2 = s;
  s2.num_q_heads = 7;
  CHECK(LshAttention::create(LshConfig{}, s2, &a).code() == StatusCode::kInvalidArgument);
  s2 = s;
  s2.max_tokens = 0;
  CHECK(LshAttention::create(LshConfig{}, s2, &a).code() == StatusCode::kInvalidArgument);

  LshLayer layer = make_layer(config(8, 20), 8, 2, 64, DType::kBF16, {500}, rng);
  LshAttention& L = *layer.attn;
  std::vector<float> q(8 * 64, 0.5f), o(8 * 64), lse(8);
  const std::int64_t known[] = {100}, unknown[] = {7};
  const QueryView qv = make_query_view(q.data(), DType::kF32, 1, 8, 64);
  const PartialView ov = make_partial_view(o.data(), DType::kF32, lse.data(), 1, 8, 64);
  CHECK(L.decode(unknown, qv, ov, shared_executor()).code() == StatusCode::kInvalidArgument);
  CHECK(L.decode(known, make_query_view(q.data(), DType::kF32, 1, 8, 32),
                 make_partial_view(o.data(), DType::kF32, lse.data(), 1, 8, 32), shared_executor())
            .code() == StatusCode::kInvalidArgument);  // head-dim mismatch
  CHECK(L.decode(known, make_query_view(q.data(), DType::kF32, 1, 4, 64), ov, shared_executor())
            .code() == StatusCode::kInvalidArgument);  // head count
  CHECK(L.decode(known, make_query_view(q.data(), DType::kF32, 2, 8, 64), ov, shared_executor())
            .code() == StatusCode::kInvalidArgument);  // batch
  CHECK(L.decode(known, make_query_view(nullptr, DType::kF32, 1, 8, 64), ov, shared_executor())
            .code() == StatusCode::kInvalidArgument);
  std::vector<std::byte> kv(2 * 64 * 2);
  CHECK(L.append(7, kv.data(), kv.data(), 1).code() == StatusCode::kInvalidArgument);
  CHECK(L.append(100, nullptr, kv.data(), 1).code() == StatusCode::kInvalidArgument);
  CHECK(L.prefill(100, kv.data(), kv.data(), 1, shared_executor()).code() ==
        StatusCode::kInvalidArgument);  // exists
  CHECK(L.prefill(5, kv.data(), kv.data(), -1, shared_executor()).code() ==
        StatusCode::kInvalidArgument);
  CHECK_FALSE(L.contains(5));
  // A prefill past the pool's capacity fails and leaves no sequence behind.
  std::vector<std::byte> big(std::size_t(5000) * 2 * 64 * 2);
  CHECK(L.prefill(6, big.data(), big.data(), 5000, shared_executor()).code() ==
        StatusCode::kOutOfMemory);
  CHECK_FALSE(L.contains(6));
  CHECK(L.release(7).code() == StatusCode::kInvalidArgument);
  // Still works after the errors.
  CHECK(L.decode(known, qv, ov, shared_executor()).is_ok());
  CHECK(L.release(100).is_ok());
  CHECK(L.decode(known, qv, ov, shared_executor()).code() == StatusCode::kInvalidArgument);
}

TEST_CASE("lsh: strides, sizes and heads out of range are errors that change nothing",
          "[lsh][errors]") {
  auto rng = make_rng("lsh-errors-2");
  std::unique_ptr<LshAttention> a;
  LshShape s{8, 2, 64, DType::kBF16, 0, INT64_MAX, 2, 16, {}};  // pages overflow int32
  CHECK(LshAttention::create(LshConfig{}, s, &a).code() == StatusCode::kInvalidArgument);
  s.max_tokens = 4096;
  s.max_sequences = INT32_MAX;
  CHECK(LshAttention::create(LshConfig{}, s, &a).code() == StatusCode::kInvalidArgument);
  s.max_sequences = 2;
  s.page_size = 1;
  s.max_tokens = INT64_MAX;
  CHECK(LshAttention::create(LshConfig{}, s, &a).code() == StatusCode::kInvalidArgument);
  s.page_size = 16;
  s.max_tokens = 4096;
  s.sm_scale = 3e38f;  // finite, but 3e38 * log2(e) is not
  CHECK(LshAttention::create(LshConfig{}, s, &a).code() == StatusCode::kInvalidArgument);

  LshLayer layer = make_layer(config(8, 20), 8, 2, 64, DType::kBF16, {500}, rng);
  LshAttention& L = *layer.attn;
  CHECK(L.projection(-1) == nullptr);
  CHECK(L.projection(2) == nullptr);
  CHECK(L.projection(1) != nullptr);

  const std::int64_t known[] = {100};
  std::vector<float> q(8 * 64, 0.5f), o(8 * 64), lse(8);
  const QueryView qv = make_query_view(q.data(), DType::kF32, 1, 8, 64);
  const PartialView ov = make_partial_view(o.data(), DType::kF32, lse.data(), 1, 8, 64);
  QueryView bq = qv;
  bq.stride_head = -64;
  CHECK(L.decode(known, bq, ov, shared_executor()).code() == StatusCode::kInvalidArgument);
  PartialView bo = ov;
  bo.stride_head = -64;
  CHECK(L.decode(known, qv, bo, shared_executor()).code() == StatusCode::kInvalidArgument);
  bo = ov;
  bo.stride_head = 0;  // every head's row on one memory
  CHECK(L.decode(known, qv, bo, shared_executor()).code() == StatusCode::kInvalidArgument);

  LshPartition before, after;
  REQUIRE(L.partition(100, &before).is_ok());
  std::vector<std::byte> kv(std::size_t(4) * 2 * 64 * 2);
  for (const std::int64_t stride : {std::int64_t{-128}, std::int64_t{1}, std::int64_t{127}}) {
    INFO("token stride " << stride);
    CHECK(L.prefill(5, kv.data(), kv.data(), 2, shared_executor(), stride).code() ==
          StatusCode::kInvalidArgument);
    CHECK(L.append(100, kv.data(), kv.data(), 2, stride).code() == StatusCode::kInvalidArgument);
  }
  CHECK(L.prefill(5, kv.data(), kv.data(), INT64_MAX, shared_executor()).code() ==
        StatusCode::kOutOfMemory);
  CHECK(L.append(100, kv.data(), kv.data(), INT64_MAX).code() == StatusCode::kOutOfMemory);
  CHECK_FALSE(L.contains(5));
  REQUIRE(L.partition(100, &after).is_ok());
  CHECK((after.sink_end == before.sink_end && after.tail_begin == before.tail_begin &&
         after.length == before.length));
  // No page leaked: the rest of the pool still takes a 4096-token prefill.
  const auto big = encode(normals(rng, std::size_t(4096) * 2 * 64), DType::kBF16);
  CHECK(L.prefill(6, big.data(), big.data(), 4096, shared_executor()).is_ok());
  CHECK(L.decode(known, qv, ov, shared_executor()).is_ok());
}

namespace {

// What an LSH sequence's state shows from outside: its partition, memory,
// table sizes and a decode's output bits.
struct SeqState {
  std::int64_t sink_end, tail_begin, length;
  std::size_t kv, index;
  std::vector<std::int64_t> sizes;
  std::vector<float> o, lse;
  bool operator==(const SeqState&) const = default;
};

SeqState seq_state(LshAttention& L, std::int64_t id, const std::vector<float>& q) {
  SeqState st{};
  LshPartition p;
  REQUIRE(L.partition(id, &p).is_ok());
  st.sink_end = p.sink_end;
  st.tail_begin = p.tail_begin;
  st.length = p.length;
  LshMemory m;
  REQUIRE(L.memory(id, &m).is_ok());
  st.kv = m.kv;
  st.index = m.index;
  for (std::int32_t h = 0; h < 2; ++h) st.sizes.push_back(L.tables(id, h)->size());
  st.o.assign(8 * 64, 0.0f);
  st.lse.assign(8, 0.0f);
  const std::int64_t ids[] = {id};
  REQUIRE(L.decode(ids, make_query_view(q.data(), DType::kF32, 1, 8, 64),
                   make_partial_view(st.o.data(), DType::kF32, st.lse.data(), 1, 8, 64),
                   shared_executor())
              .is_ok());
  return st;
}

// Appends n tokens to sequence id, failing each allocation of the call in
// turn until it succeeds; every failure must be kOutOfMemory and leave the
// sequence as it was. Returns how many failed.
int append_failing_each_allocation(LshAttention& L, std::int64_t id, std::int64_t n,
                                   std::mt19937_64& rng) {
  const auto keys = encode(normals(rng, std::size_t(n) * 2 * 64), DType::kBF16);
  const auto values = encode(normals(rng, std::size_t(n) * 2 * 64), DType::kBF16);
  const std::vector<float> q = normals(rng, 8 * 64);
  const SeqState before = seq_state(L, id, q);
  int failed = 0;
  for (long k = 0;; ++k) {
    hattn_test::fail_allocation_in(k);
    const Status st = L.append(id, keys.data(), values.data(), n);
    hattn_test::fail_allocation_in(-1);
    if (st.is_ok()) break;
    INFO("allocation " << k << " failed");
    REQUIRE(st.code() == StatusCode::kOutOfMemory);
    ++failed;
    CHECK(seq_state(L, id, q) == before);
  }
  return failed;
}

}  // namespace

TEST_CASE("lsh: an append that runs out of memory at any allocation changes nothing",
          "[lsh][errors]") {
  auto rng = make_rng("lsh-append-oom");
  // Two sequences: 600 tokens (indexed at prefill: the append adds side
  // tables) and 30 (nothing indexed yet: the append computes the key means
  // and builds the first tables).
  LshLayer layer = make_layer(config(8, 20), 8, 2, 64, DType::kBF16, {600, 30}, rng);
  LshAttention& L = *layer.attn;
  const std::vector<float> q = normals(rng, 8 * 64);
  for (const std::int64_t id : {100, 101}) {
    const SeqState before = seq_state(L, id, q);
    INFO("sequence " << id);
    // Past max_exact_tail (256) beyond what is indexed: the append indexes.
    CHECK(append_failing_each_allocation(L, id, 300, rng) > 0);
    const SeqState done = seq_state(L, id, q);
    CHECK(done.length == before.length + 300);
    CHECK(done.tail_begin == done.length - 64);
    CHECK(done.sizes[0] == done.tail_begin - done.sink_end);
    CHECK(done.sizes[1] == done.sizes[0]);
  }
  // The first tables of sequence 101 equal a rebuild over the same positions.
  for (std::int32_t h = 0; h < 2; ++h) {
    const LshTables before = *L.tables(101, h);
    REQUIRE(L.rebuild_index(101, shared_executor()).is_ok());
    const LshTables& after = *L.tables(101, h);
    REQUIRE(after.size() == before.size());
    for (std::int32_t l = 0; l < before.L(); ++l)
      for (std::uint32_t c = 0; c < 256; ++c) {
        std::vector<std::uint32_t> x, y;
        before.for_each_in_bucket(l, c, [&](std::uint32_t i) { x.push_back(i); });
        after.for_each_in_bucket(l, c, [&](std::uint32_t i) { y.push_back(i); });
        REQUIRE(x == y);
      }
  }

  // A prefill that fails at any allocation (of the calling thread) leaves no
  // sequence and no pages behind.
  const std::int64_t np = 700;
  const auto pk = encode(normals(rng, std::size_t(np) * 2 * 64), DType::kBF16);
  int prefill_failed = 0;
  for (long k = 0;; ++k) {
    hattn_test::fail_allocation_in(k);
    const Status st = L.prefill(9, pk.data(), pk.data(), np, shared_executor());
    hattn_test::fail_allocation_in(-1);
    if (st.is_ok()) break;
    INFO("prefill allocation " << k << " failed");
    REQUIRE(st.code() == StatusCode::kOutOfMemory);
    CHECK_FALSE(L.contains(9));
    ++prefill_failed;
  }
  CHECK(prefill_failed > 0);
  REQUIRE(L.release(9).is_ok());
  // Every page is back: the pool has ceil((630 + 4096) / 16) + 3 = 299
  // pages; the two sequences hold ceil(900 / 16) + ceil(330 / 16) = 57 + 21.
  // A prefill of the other 221 pages' tokens fits exactly.
  const std::int64_t rest = (299 - 57 - 21) * 16;
  const auto rk = encode(normals(rng, std::size_t(rest) * 2 * 64), DType::kBF16);
  CHECK(L.prefill(10, rk.data(), rk.data(), rest, shared_executor()).is_ok());
  CHECK(L.prefill(11, rk.data(), rk.data(), 1, shared_executor()).code() ==
        StatusCode::kOutOfMemory);
}

TEST_CASE("lsh: LshTables checks K and L, and build, insert and compact keep the tables on failure",
          "[lsh][errors]") {
  CHECK_THROWS_AS(LshTables(0, 10), std::invalid_argument);
  CHECK_THROWS_AS(LshTables(17, 10), std::invalid_argument);
  CHECK_THROWS_AS(LshTables(8, 0), std::invalid_argument);
  auto rng = make_rng("lsh-tables-oom");
  const std::int32_t K = 6, L = 5;
  auto codes = [&](std::int64_t n) {
    std::vector<std::uint16_t> c(static_cast<std::size_t>(n * L));
    for (auto& x : c) x = static_cast<std::uint16_t>(rng() % (1u << K));
    return c;
  };
  auto contents = [&](const LshTables& t) {
    std::vector<std::vector<std::uint32_t>> all;
    for (std::int32_t l = 0; l < L; ++l)
      for (std::uint32_t c = 0; c < (1u << K); ++c) {
        all.emplace_back();
        t.for_each_in_bucket(l, c, [&](std::uint32_t i) { all.back().push_back(i); });
      }
    return all;
  };
  LshTables t(K, L);
  const auto c0 = codes(300), c1 = codes(200), c2 = codes(2000);
  t.build(c0.data(), 300);
  t.insert(c1.data(), 200);  // side tables
  REQUIRE(t.side_size() == 200);
  const auto before = contents(t);
  // Each operation, failing at every allocation in turn, until it succeeds.
  auto each_failure = [&](auto&& op) {
    int failed = 0;
    for (long k = 0;; ++k) {
      hattn_test::fail_allocation_in(k);
      bool ok = true;
      try {
        op();
      } catch (const std::bad_alloc&) {
        ok = false;
      }
      hattn_test::fail_allocation_in(-1);
      if (ok) return failed;
      ++failed;
      CHECK(t.size() == 500);
      CHECK(t.side_size() == 200);
      CHECK(contents(t) == before);
    }
  };
  LshTables copy = t;
  CHECK(each_failure([&] { t.compact(); }) > 0);
  CHECK(t.side_size() == 0);
  CHECK(contents(t) == before);
  t = copy;
  CHECK(each_failure([&] {
          LshTables::Pending p = t.prepare_insert(c2.data(), 2000);
          t.commit(std::move(p));
        }) > 0);
  CHECK(t.size() == 2500);
  t = copy;
  CHECK(each_failure([&] { t.build(c2.data(), 2000); }) > 0);
  CHECK(t.size() == 2000);
  CHECK(t.side_size() == 0);
}

TEST_CASE(
    "lsh: a decode that runs out of memory returns kOutOfMemory, and a retry gives the same bits",
    "[lsh][errors]") {
  // For k = 0, 1, ...: a fresh layer (so the step's scratch still has to
  // grow) whose first decode fails its k-th allocation, then a decode on the
  // same layer with nothing failing, which must give the bits of a layer that
  // never failed; until k is past the step's last allocation. One thread, so
  // every allocation of the step is on the calling thread, where the hook
  // fails it.
  for (LshConfig::Gather gather : {LshConfig::Gather::kPerHead, LshConfig::Gather::kUnion}) {
    INFO("gather " << static_cast<int>(gather));
    LshConfig cfg = config(8, 20);
    cfg.gather = gather;
    const CpuExecutor one(1);
    struct Out {
      std::vector<float> o, lse;
    };
    // Decodes twice on a fresh layer; the first decode fails its k-th
    // allocation (k < 0: none). Returns the status of the first and the
    // output of the second.
    auto run = [&](long k, Status* first) {
      auto rng = make_rng("lsh-decode-oom");
      LshLayer layer = make_layer(cfg, 8, 2, 64, DType::kBF16, {700, 300}, rng);
      const std::vector<float> q = normals(rng, 2 * 8 * 64);
      Out out{std::vector<float>(2 * 8 * 64, -1.0f), std::vector<float>(2 * 8, -1.0f)};
      const std::int64_t ids[] = {100, 101};
      const auto qv = make_query_view(q.data(), DType::kF32, 2, 8, 64);
      const auto ov = make_partial_view(out.o.data(), DType::kF32, out.lse.data(), 2, 8, 64);
      hattn_test::fail_allocation_in(k);
      *first = layer.attn->decode(ids, qv, ov, one);
      hattn_test::fail_allocation_in(-1);
      std::fill(out.o.begin(), out.o.end(), -1.0f);
      std::fill(out.lse.begin(), out.lse.end(), -1.0f);
      REQUIRE(layer.attn->decode(ids, qv, ov, one).is_ok());
      return out;
    };
    Status st;
    const Out ref = run(-1, &st);
    REQUIRE(st.is_ok());
    auto same_bits = [](const std::vector<float>& a, const std::vector<float>& b) {
      return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
    };
    long failed = 0;
    for (long k = 0;; ++k) {
      INFO("allocation " << k << " failed");
      const Out got = run(k, &st);
      CHECK(same_bits(got.o, ref.o));
      CHECK(same_bits(got.lse, ref.lse));
      if (st.is_ok()) break;
      REQUIRE(st.code() == StatusCode::kOutOfMemory);
      ++failed;
    }
    CHECK(failed > 10);  // the step's scratch: a dozen arrays or more per thread slot
  }
}

TEST_CASE("lsh: memory accounting; positions in 16 bits below 65536", "[lsh]") {
  auto rng = make_rng("lsh-memory");
  LshLayer layer = make_layer(config(10, 150), 4, 1, 128, DType::kBF16, {8192}, rng);
  LshMemory m;
  REQUIRE(layer.attn->memory(100, &m).is_ok());
  CHECK(m.kv == 2 * std::size_t{8192} * 128 * 2);  // page-aligned length
  const std::size_t idx = 150 * (std::size_t{8192 - 68} * 2 + 1025 * 4);
  CHECK(m.index == idx);
  CHECK(m.means == 128 * 4);

  LshTables t(2, 1);
  std::vector<std::uint16_t> codes(70000);
  for (auto& c : codes) c = static_cast<std::uint16_t>(rng() % 4);
  t.build(codes.data(), 65535);
  CHECK_FALSE(t.wide());
  t.insert(codes.data() + 65535, 4465);
  t.compact();
  CHECK(t.wide());
  CHECK(t.size() == 70000);
  CHECK(t.bytes() == 5 * 4 + 70000 * 4);
}
