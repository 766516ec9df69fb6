// Host-side logic of the CUDA backend, tested without a GPU: how plan()
// splits a step (group passes, KV chunks, workspace), the chunk ranges the
// kernels attend, the fast divider that maps tokens to pages, and the merge
// arithmetic the device shares with core/merge.hpp.

#include <catch2/catch.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/catch_print.hpp"
#include "common/seed.hpp"
#include "hattn/core/merge.hpp"
#include "hattn/cuda/detail/fast_divmod.hpp"
#include "hattn/cuda/detail/merge_math.hpp"
#include "hattn/cuda/plan.hpp"

using hattn::DecodeProblem;
using hattn::DType;
using hattn::StatusCode;
namespace hc = hattn::cuda;
namespace hcd = hattn::cuda::detail;

namespace {

DecodeProblem problem(std::int32_t batch, std::int32_t kv_heads, std::int32_t group,
                      std::int32_t head_dim = 128) {
  DecodeProblem p;
  p.batch_size = batch;
  p.num_kv_heads = kv_heads;
  p.num_q_heads = kv_heads * group;
  p.head_dim = head_dim;
  p.kv_dtype = DType::kBF16;
  return p;
}

bool is_width(std::int32_t w) { return hattn::contains<hc::GroupWidths>(w); }

}  // namespace

TEST_CASE("cuda plan: group passes cover the group with the smallest kernel width",
          "[cuda][plan]") {
  for (std::int32_t g = 1; g <= 70; ++g) {
    INFO("group=" << g);
    const hcd::GroupSplit s = hcd::split_group(g);
    CHECK(is_width(s.width));
    CHECK(s.heads_per_pass >= 1);
    CHECK(s.heads_per_pass <= s.width);
    CHECK(s.width <= hc::kMaxGroupWidth);
    // the smallest width that fits a pass
    CHECK((s.width == 1 || s.width / 2 < s.heads_per_pass));
    CHECK(s.num_passes * s.heads_per_pass >= g);
    CHECK((s.num_passes - 1) * s.heads_per_pass < g);
    // as few passes as the widest kernel allows: every K/V load serves up to 8 heads
    CHECK(s.num_passes == (g + hc::kMaxGroupWidth - 1) / hc::kMaxGroupWidth);
  }
}

TEST_CASE("cuda plan: chunk split bounds", "[cuda][plan]") {
  std::size_t checked = 0;
  for (const std::int32_t batch : {1, 2, 8, 64, 300})
    for (const std::int32_t kv_heads : {1, 8, 40})
      for (const std::int32_t group : {1, 4, 8, 20})
        for (const std::int64_t len : {0L, 1L, 63L, 64L, 65L, 255L, 256L, 511L, 1000L, 4096L, 4097L,
                                       32768L, 131072L, 1000003L})
          for (const std::int32_t sms : {1, 16, 108, 132, 1000}) {
            const DecodeProblem p = problem(batch, kv_heads, group);
            const hcd::ChunkSplit s = hcd::split_chunks(p, len, sms);
            INFO("batch=" << batch << " kv_heads=" << kv_heads << " group=" << group
                          << " len=" << len << " sms=" << sms << " -> chunks=" << s.num_chunks
                          << " tokens=" << s.chunk_tokens);
            REQUIRE(s.num_chunks >= 1);
            CHECK(s.num_chunks <= hcd::max_chunks(p));
            CHECK(s.chunk_tokens >= hcd::kChunkAlign);
            CHECK(s.chunk_tokens % hcd::kChunkAlign == 0);
            CHECK(std::int64_t{s.num_chunks} * s.chunk_tokens >= len);
            if (len > 0) CHECK(std::int64_t{s.num_chunks - 1} * s.chunk_tokens < len);
            if (s.num_chunks > 1) CHECK(s.chunk_tokens >= hcd::kMinChunkTokens);
            const std::int64_t units = hcd::work_units(p);
            const std::int64_t target = hcd::target_ctas(p, sms);
            if (units * 2 > target) CHECK(s.num_chunks == 1);
            // Never more CTAs than one wave, unless unsplit.
            if (s.num_chunks > 1) CHECK(units * s.num_chunks <= target);
            // Enough CTAs for the SMs unless a limit (min chunk, max chunks) says
            // otherwise; rounding chunks up to kChunkAlign tokens (at most 64 on
            // >= 256) may drop up to a fifth of them.
            const std::int64_t want = std::min(
                {std::max<std::int64_t>(1, target / units),
                 std::max<std::int64_t>(1, len / hcd::kMinChunkTokens), hcd::max_chunks(p)});
            CHECK(4 * std::int64_t{s.num_chunks} >= 3 * want);
            // More SMs never means fewer chunks.
            const hcd::ChunkSplit more = hcd::split_chunks(p, len, sms * 2);
            CHECK(more.num_chunks >= s.num_chunks);
            ++checked;
          }
  CHECK(checked > 1000);
}

TEST_CASE("cuda plan: chunk ranges cover every token exactly once, any length", "[cuda][plan]") {
  std::mt19937_64 rng = hattn_test::make_rng("cuda-chunk-ranges");
  std::uniform_int_distribution<std::int64_t> planned(0, 200000);
  for (int i = 0; i < 300; ++i) {
    const DecodeProblem p = problem(1 + i % 9, 1 + i % 8, 1 + i % 12);
    const std::int64_t max_len = planned(rng);
    const hcd::ChunkSplit s = hcd::split_chunks(p, max_len, 132);
    // Device lengths: shorter, equal, and longer than planned (the last chunk
    // must take the rest).
    for (const std::int64_t len :
         {std::int64_t{0}, max_len / 3, max_len, max_len + 1, max_len * 2 + 77}) {
      INFO("chunks=" << s.num_chunks << " tokens=" << s.chunk_tokens << " len=" << len);
      std::int64_t next = 0;
      for (std::int64_t c = 0; c < s.num_chunks; ++c) {
        const hcd::TokenRange r = hcd::chunk_range(c, s.num_chunks, s.chunk_tokens, len);
        REQUIRE(r.begin == next);  // contiguous, ordered, disjoint
        REQUIRE(r.end >= r.begin);
        next = r.end;
      }
      CHECK(next == len);
    }
  }
}

TEST_CASE("cuda plan: make_plan fills the plan and places partials inside the workspace",
          "[cuda][plan]") {
  for (const std::int32_t batch : {1, 3, 64})
    for (const std::int32_t group : {1, 4, 6, 20})
      for (const std::int32_t dim : {64, 128, 256})
        for (const std::int64_t len : {0L, 17L, 5000L, 131072L}) {
          const DecodeProblem p = problem(batch, 8, group, dim);
          const std::size_t ws = hc::detail::workspace_size(p);
          REQUIRE(ws > 0);
          std::vector<std::int64_t> lens(static_cast<std::size_t>(batch), len);
          lens[0] = len / 2;  // ragged
          // A fake device base far from null, 256-aligned; plan only does pointer arithmetic.
          auto* base = reinterpret_cast<std::byte*>(std::uintptr_t{1} << 40);
          hc::DecodePlan pl;
          REQUIRE(hcd::make_plan(p, lens, 132, base, ws, &pl) == StatusCode::kSuccess);
          INFO("batch=" << batch << " group=" << group << " D=" << dim << " len=" << len
                        << " chunks=" << pl.num_chunks);
          CHECK(pl.planned());
          CHECK(pl.max_seq_len == (batch > 1 ? len : len / 2));
          CHECK(pl.num_ctas ==
                std::int64_t{batch} * 8 * pl.num_passes * std::int64_t{pl.num_chunks});
          CHECK(pl.num_passes * pl.heads_per_pass >= group);
          const auto off = [&](const void* q) {
            return static_cast<std::size_t>(static_cast<const std::byte*>(q) - base);
          };
          CHECK(off(pl.error_flags) + sizeof(std::uint32_t) <= off(pl.partial_lse));
          CHECK(off(pl.partial_lse) % 16 == 0);
          CHECK(off(pl.partial_o) % 16 == 0);
          if (pl.num_chunks > 1) {
            const std::size_t rows = static_cast<std::size_t>(batch) * pl.num_chunks * 8 * group;
            CHECK(off(pl.partial_lse) + rows * sizeof(float) <= off(pl.partial_o));
            CHECK(off(pl.partial_o) + rows * dim * sizeof(float) <= ws);
          }
        }
}

TEST_CASE("cuda plan: bad input returns a Status", "[cuda][plan][errors]") {
  const DecodeProblem p = problem(2, 2, 2, 64);
  const std::size_t need = hc::detail::workspace_size(p);
  std::vector<std::byte> mem(need + 16);
  std::byte* ws = mem.data() + (16 - reinterpret_cast<std::uintptr_t>(mem.data()) % 16) % 16;
  const std::vector<std::int64_t> lens = {10, 20};
  hc::DecodePlan pl;
  CHECK(hcd::make_plan(p, lens, 132, ws, need, &pl) == StatusCode::kSuccess);
  CHECK(hcd::make_plan(p, lens, 132, ws, need, nullptr) == StatusCode::kInvalidArgument);
  CHECK(hcd::make_plan(p, lens, 0, ws, need, &pl) == StatusCode::kInvalidArgument);
  CHECK(hcd::make_plan(p, std::vector<std::int64_t>{10}, 132, ws, need, &pl) ==
        StatusCode::kInvalidArgument);
  CHECK(hcd::make_plan(p, std::vector<std::int64_t>{10, -1}, 132, ws, need, &pl) ==
        StatusCode::kInvalidArgument);
  CHECK(hcd::make_plan(p, std::vector<std::int64_t>{10, std::int64_t{1} << 31}, 132, ws, need,
                       &pl) == StatusCode::kNotSupported);
  CHECK(hcd::make_plan(p, lens, 132, ws, need - 1, &pl) == StatusCode::kWorkspaceTooSmall);
  CHECK(hcd::make_plan(p, lens, 132, nullptr, need, &pl) == StatusCode::kInvalidArgument);
  CHECK(hcd::make_plan(p, lens, 132, ws + 4, need, &pl) == StatusCode::kInvalidArgument);
  DecodeProblem bad = p;
  bad.head_dim = 96;
  CHECK(hcd::make_plan(bad, lens, 132, ws, need, &pl) == StatusCode::kNotSupported);
  CHECK(hc::detail::workspace_size(bad) == 0);
  bad = p;
  bad.num_q_heads = 3;  // not a multiple of the KV heads
  CHECK(hcd::make_plan(bad, lens, 132, ws, need, &pl) == StatusCode::kInvalidArgument);
  // A failed plan leaves the output alone.
  hc::DecodePlan untouched;
  CHECK(hcd::make_plan(p, lens, 132, ws, need - 1, &untouched) != StatusCode::kSuccess);
  CHECK(!untouched.planned());
}

TEST_CASE("cuda fast divmod is exact for every page size and token index", "[cuda][divmod]") {
  std::mt19937_64 rng = hattn_test::make_rng("cuda-divmod");
  std::vector<std::uint32_t> divisors;
  for (std::uint32_t d = 1; d <= 1100; ++d) divisors.push_back(d);
  for (const std::uint32_t d : {4095u, 4096u, 4097u, 65535u, 65536u, 1u << 20, (1u << 30) - 1,
                                1u << 30, (1u << 30) + 1, (1u << 31) - 1})
    divisors.push_back(d);
  std::uniform_int_distribution<std::uint32_t> any(0, (1u << 31) - 1);
  for (const std::uint32_t d : divisors) {
    const hcd::FastDivmod f = hcd::FastDivmod::make(d);
    std::vector<std::uint32_t> ns = {
        0, 1, d - 1, d, d + 1, 2 * d - 1, (1u << 31) - 1, (1u << 31) - 2, (1u << 30)};
    for (std::uint32_t k = 1; k < 8; ++k) ns.push_back(((1u << 31) - 1) / d * d - k % d);
    for (int i = 0; i < 200; ++i) ns.push_back(any(rng));
    for (const std::uint32_t n : ns) {
      if (n >= (1u << 31)) continue;
      std::uint32_t q = 0, r = 0;
      f.divmod(n, q, r);
      if (q != n / d || r != n % d) {
        INFO("n=" << n << " d=" << d << " got q=" << q << " r=" << r << "; "
                  << hattn_test::seed_note());
        REQUIRE(q == n / d);
        REQUIRE(r == n % d);
      }
    }
  }
}

TEST_CASE("cuda merge math is core/merge.hpp's formula", "[cuda][merge]") {
  // The device merges use merge_math.hpp; on the host it must give exactly
  // hattn::merge_weights (same operations, same C math functions).
  std::mt19937_64 rng = hattn_test::make_rng("cuda-merge-math");
  std::uniform_real_distribution<float> lse(-60.0f, 60.0f);
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<std::pair<float, float>> cases = {{-inf, -inf}, {-inf, 0.0f},      {0.0f, -inf},
                                                {3.0f, 3.0f}, {-200.0f, 200.0f}, {1e-30f, 0.0f}};
  for (int i = 0; i < 2000; ++i) cases.emplace_back(lse(rng), lse(rng));
  for (const auto& [a, b] : cases) {
    const hattn::MergeWeights want = hattn::merge_weights(a, b);
    const hcd::MergeWeightsF got = hcd::merge_weights2(a, b);
    INFO("lse_a=" << a << " lse_b=" << b);
    CHECK(std::bit_cast<std::uint32_t>(got.lse) == std::bit_cast<std::uint32_t>(want.lse));
    CHECK(std::bit_cast<std::uint32_t>(got.wa) == std::bit_cast<std::uint32_t>(want.wa));
    CHECK(std::bit_cast<std::uint32_t>(got.wb) == std::bit_cast<std::uint32_t>(want.wb));
    // A side with zero weight never contributes, even NaN.
    const float nan = std::numeric_limits<float>::quiet_NaN();
    if (got.wa == 0.0f) CHECK(!std::isnan(hcd::merge_value(got, nan, 1.0f)));
    if (got.wb == 0.0f) CHECK(!std::isnan(hcd::merge_value(got, 1.0f, nan)));
  }
  // n-way helpers: empty partials weigh nothing; no keys at all stays empty.
  CHECK(hcd::chunk_weight(-inf, -inf) == 0.0f);
  CHECK(hcd::chunk_weight(-inf, 5.0f) == 0.0f);
  CHECK(hcd::chunk_weight(5.0f, 5.0f) == 1.0f);
  CHECK(hcd::merged_lse(-inf, 0.0f) == -inf);
  CHECK(hcd::merged_lse(2.0f, 1.0f) == 2.0f);
  // An n-way merge with these helpers equals folding pairwise merges (up to rounding).
  std::uniform_real_distribution<float> val(-3.0f, 3.0f);
  for (int t = 0; t < 200; ++t) {
    const int n = 1 + t % 9;
    std::vector<float> l(n), o(n);
    for (int i = 0; i < n; ++i) {
      l[i] = i % 4 == 3 ? -inf : lse(rng);
      o[i] = val(rng);
    }
    float mx = -inf;
    for (const float x : l) mx = std::max(mx, x);
    float sum = 0.0f, acc = 0.0f;
    for (int i = 0; i < n; ++i) {
      const float w = hcd::chunk_weight(l[i], mx);
      sum += w;
      acc += w * o[i];
    }
    const float nway_lse = hcd::merged_lse(mx, sum);
    const float nway_o = sum > 0.0f ? acc / sum : 0.0f;
    float pl = -inf, po = 0.0f;
    for (int i = 0; i < n; ++i) {
      const hcd::MergeWeightsF w = hcd::merge_weights2(pl, l[i]);
      po = hcd::merge_value(w, po, o[i]);
      pl = w.lse;
    }
    INFO("n=" << n << " nway=(" << nway_o << ", " << nway_lse << ") pairwise=(" << po << ", " << pl
              << ")");
    if (pl == -inf) {
      CHECK(nway_lse == -inf);
      CHECK(nway_o == 0.0f);
    } else {
      CHECK(std::abs(nway_lse - pl) <= 1e-5f * (1.0f + std::abs(pl)));
      CHECK(std::abs(nway_o - po) <= 1e-5f * (1.0f + std::abs(po)));
    }
  }
}
