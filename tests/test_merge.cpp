// Merging partial results (core/merge.hpp) against ref::merge and the
// softmax over the union of the keys.

#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/catch_print.hpp"
#include "common/check.hpp"
#include "common/decode_fixture.hpp"
#include "common/seed.hpp"
#include "hattn/core/merge.hpp"
#include "hattn/cpu/dense_decode.hpp"
#include "hattn/ref/decode.hpp"
#include "hattn/ref/merge.hpp"

using hattn::DType;
using hattn::PartialView;
using hattn::StatusCode;
using hattn_test::compare;
using hattn_test::seed_note;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// An owned partial [B][H][D] of any dtype, optionally with padded strides.
struct Partial {
  std::vector<std::byte> o;
  std::vector<float> lse;
  PartialView view{};

  Partial(std::int32_t B, std::int32_t H, std::int32_t D, DType t, bool padded = false) {
    const std::int64_t sh = padded ? D + 1 : D, sb = padded ? H * sh + 2 : std::int64_t{H} * D;
    const std::int64_t sl = padded ? H + 3 : H;
    o.resize(hattn::size_of(t) * static_cast<std::size_t>(B * sb));
    lse.assign(static_cast<std::size_t>(B * sl), std::numeric_limits<float>::quiet_NaN());
    hattn_test::fill_nan(o.data(), t, static_cast<std::size_t>(B * sb));
    view = {o.data(), t, lse.data(), B, H, D, sb, sh, sl};
  }
  Partial(const Partial& other) : o(other.o), lse(other.lse), view(other.view) {
    view.o = o.data();
    view.lse2 = lse.data();
  }
  Partial& operator=(const Partial&) = delete;

  std::size_t rows() const { return static_cast<std::size_t>(view.batch_size) * view.num_heads; }
  std::int64_t o_at(std::size_t row, std::int32_t d) const {
    const auto r = static_cast<std::int64_t>(row);
    return r / view.num_heads * view.stride_batch + r % view.num_heads * view.stride_head + d;
  }
  float& lse_at(std::size_t row) {
    const auto r = static_cast<std::int64_t>(row);
    return lse[static_cast<std::size_t>(r / view.num_heads * view.lse_stride_batch +
                                        r % view.num_heads)];
  }
  void set(std::size_t row, std::int32_t d, float x) {
    hattn::store_from_float(view.o, view.dtype, o_at(row, d), x);
  }
  // Values as stored, in double, [row][d] and [row].
  std::vector<double> o_values() const {
    std::vector<double> r;
    for (std::size_t row = 0; row < rows(); ++row)
      for (std::int32_t d = 0; d < view.head_dim; ++d)
        r.push_back(hattn::load_as_float(view.o, view.dtype, o_at(row, d)));
    return r;
  }
  std::vector<double> lse_values() {
    std::vector<double> r;
    for (std::size_t row = 0; row < rows(); ++row) r.push_back(lse_at(row));
    return r;
  }
};

Partial random_partial(std::mt19937_64& rng, std::int32_t B, std::int32_t H, std::int32_t D,
                       DType t, bool padded, float lse_spread) {
  Partial p(B, H, D, t, padded);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (std::size_t row = 0; row < p.rows(); ++row) {
    for (std::int32_t d = 0; d < D; ++d) p.set(row, d, normal(rng));
    p.lse_at(row) = lse_spread * normal(rng);
  }
  return p;
}

// ref::merge of the stored values of a and b (then c), in double.
void ref_merge_into(std::vector<double>& o, std::vector<double>& lse, Partial& b) {
  REQUIRE(hattn::ref::merge(o, lse, b.o_values(), b.lse_values(),
                            static_cast<std::size_t>(b.view.head_dim)) == StatusCode::kSuccess);
}

bool any_nan(const std::vector<double>& v) {
  for (const double x : v)
    if (std::isnan(x)) return true;
  return false;
}

}  // namespace

TEST_CASE("merge_partials matches ref::merge, is associative and commutative", "[merge]") {
  std::mt19937_64 rng = hattn_test::make_rng("merge/assoc");
  const std::int32_t B = 3, H = 4, D = 64;
  const DType dtypes[] = {DType::kF32, DType::kBF16, DType::kF16};
  for (int i = 0; i < 9; ++i) {
    // Inputs of every dtype; output dtype rotates; lse spread from close
    // (both sides matter) to far apart (one side dominates).
    const DType in_t = dtypes[i % 3], out_t = dtypes[(i / 3) % 3];
    const float spread = i % 3 == 0 ? 0.5f : (i % 3 == 1 ? 4.0f : 40.0f);
    const std::string ctx = "merge in=" + std::string(hattn::to_string(in_t)) +
                            " out=" + std::string(hattn::to_string(out_t)) +
                            " spread=" + std::to_string(spread);
    INFO(ctx << "; " << seed_note());
    Partial a = random_partial(rng, B, H, D, in_t, i % 2 == 0, spread);
    Partial b = random_partial(rng, B, H, D, in_t, i % 2 == 1, spread);
    Partial c = random_partial(rng, B, H, D, DType::kF32, false, spread);

    std::vector<double> ref_o = a.o_values(), ref_lse = a.lse_values();
    ref_merge_into(ref_o, ref_lse, b);
    ref_merge_into(ref_o, ref_lse, c);

    // (a b) c, with the intermediate in f32 so only the final store rounds.
    Partial ab(B, H, D, DType::kF32), abc(B, H, D, out_t, true);
    REQUIRE(hattn::merge_partials(a.view, b.view, ab.view) == StatusCode::kSuccess);
    REQUIRE(hattn::merge_partials(ab.view, c.view, abc.view) == StatusCode::kSuccess);
    // a (b c)
    Partial bc(B, H, D, DType::kF32), a_bc(B, H, D, out_t);
    REQUIRE(hattn::merge_partials(b.view, c.view, bc.view) == StatusCode::kSuccess);
    REQUIRE(hattn::merge_partials(a.view, bc.view, a_bc.view) == StatusCode::kSuccess);
    // (b a) c: commutativity of the first step
    Partial ba(B, H, D, DType::kF32), bac(B, H, D, out_t);
    REQUIRE(hattn::merge_partials(b.view, a.view, ba.view) == StatusCode::kSuccess);
    REQUIRE(hattn::merge_partials(ba.view, c.view, bac.view) == StatusCode::kSuccess);

    const hattn_test::Tolerance tol = hattn_test::output_tolerance(out_t);
    CHECK(compare("(ab)c o", abc.o_values(), ref_o, tol, ctx) == "");
    CHECK(compare("(ab)c lse2", abc.lse_values(), ref_lse, hattn_test::kLse2Tolerance, ctx) == "");
    CHECK(compare("a(bc) o", a_bc.o_values(), ref_o, tol, ctx) == "");
    CHECK(compare("a(bc) lse2", a_bc.lse_values(), ref_lse, hattn_test::kLse2Tolerance, ctx) == "");
    CHECK(compare("(ba)c o", bac.o_values(), ref_o, tol, ctx) == "");
    // The two groupings agree with each other: each is within tol of the
    // exact merge, so they are within twice tol of each other (two roundings
    // to bf16 may differ by one ulp, 2^-7 relative).
    const hattn_test::Tolerance twice{2 * tol.atol, 2 * tol.rtol, 4 * tol.nmse};
    CHECK(compare("(ab)c vs a(bc)", abc.o_values(), a_bc.o_values(), twice, ctx) == "");
  }
}

TEST_CASE("merging into one of the inputs (aliasing) gives the same result", "[merge]") {
  std::mt19937_64 rng = hattn_test::make_rng("merge/alias");
  Partial a = random_partial(rng, 2, 3, 128, DType::kF32, true, 3.0f);
  Partial b = random_partial(rng, 2, 3, 128, DType::kF32, true, 3.0f);
  Partial out(2, 3, 128, DType::kF32, true);
  REQUIRE(hattn::merge_partials(a.view, b.view, out.view) == StatusCode::kSuccess);
  Partial in_place = a;
  REQUIRE(hattn::merge_partials(in_place.view, b.view, in_place.view) == StatusCode::kSuccess);
  // Bytes, not values: the padding holds NaN (and must stay as it was).
  CHECK(in_place.o == out.o);
  CHECK(std::memcmp(in_place.lse.data(), out.lse.data(), out.lse.size() * sizeof(float)) == 0);
}

TEST_CASE("an empty partial (lse2 = -inf) is the identity, whatever its o holds", "[merge]") {
  std::mt19937_64 rng = hattn_test::make_rng("merge/empty");
  const std::int32_t B = 2, H = 3, D = 64;
  const float garbage[] = {std::numeric_limits<float>::quiet_NaN(),
                           std::numeric_limits<float>::infinity(), -1e30f, 0.0f};
  for (const DType t : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (const float g : garbage) {
      INFO("dtype " << hattn::to_string(t) << ", empty o = " << g << "; " << seed_note());
      Partial a = random_partial(rng, B, H, D, t, false, 5.0f);
      Partial e(B, H, D, t, true);
      for (std::size_t row = 0; row < e.rows(); ++row) {
        e.lse_at(row) = hattn::kNegInf;
        for (std::int32_t d = 0; d < D; ++d) e.set(row, d, g);
      }
      // a + empty and empty + a: bitwise a (the weight of a is exactly 1).
      Partial r1(B, H, D, t), r2(B, H, D, t);
      REQUIRE(hattn::merge_partials(a.view, e.view, r1.view) == StatusCode::kSuccess);
      REQUIRE(hattn::merge_partials(e.view, a.view, r2.view) == StatusCode::kSuccess);
      CHECK(r1.o == a.o);
      CHECK(r1.lse == a.lse);
      CHECK(r2.o == a.o);
      CHECK(r2.lse == a.lse);
      // empty + empty: empty, o = 0, never NaN.
      Partial ee(B, H, D, t);
      REQUIRE(hattn::merge_partials(e.view, e.view, ee.view) == StatusCode::kSuccess);
      for (const double x : ee.o_values()) CHECK(x == 0.0);
      for (const double x : ee.lse_values()) CHECK(x == -kInf);
      // ref::merge agrees.
      std::vector<double> ro = a.o_values(), rl = a.lse_values();
      ref_merge_into(ro, rl, e);
      CHECK(ro == a.o_values());
      CHECK(rl == a.lse_values());
      std::vector<double> eo = e.o_values(), el = e.lse_values();
      ref_merge_into(eo, el, a);
      CHECK(eo == a.o_values());
      CHECK(el == a.lse_values());
    }
  }
}

TEST_CASE("merge never produces NaN, even for extreme lse2", "[merge]") {
  const float big = std::numeric_limits<float>::max();
  const float values[] = {hattn::kNegInf, -big, -1e4f, -1.0f, 0.0f, 1.0f, 126.0f, 1e4f, big};
  const std::int32_t n = static_cast<std::int32_t>(std::size(values));
  // Row i * n + j merges lse values[i] with values[j].
  Partial a(1, n * n, 16, DType::kF32), b(1, n * n, 16, DType::kF32),
      out(1, n * n, 16, DType::kF32);
  for (std::int32_t i = 0; i < n; ++i)
    for (std::int32_t j = 0; j < n; ++j) {
      const auto row = static_cast<std::size_t>(i * n + j);
      a.lse_at(row) = values[i];
      b.lse_at(row) = values[j];
      for (std::int32_t d = 0; d < 16; ++d) {
        a.set(row, d, static_cast<float>(d) - 8.0f);
        b.set(row, d, 3.0f);
      }
    }
  REQUIRE(hattn::merge_partials(a.view, b.view, out.view) == StatusCode::kSuccess);
  const std::vector<double> o = out.o_values(), lse = out.lse_values();
  for (std::int32_t i = 0; i < n; ++i)
    for (std::int32_t j = 0; j < n; ++j) {
      const auto row = static_cast<std::size_t>(i * n + j);
      INFO("lse_a = " << values[i] << ", lse_b = " << values[j] << ": merged lse2 = " << lse[row]);
      CHECK_FALSE(std::isnan(lse[row]));
      CHECK(lse[row] >= std::max(values[i], values[j]));  // never below the larger side
      for (std::int32_t d = 0; d < 16; ++d) {
        const double x = o[row * 16 + static_cast<std::size_t>(d)];
        CHECK_FALSE(std::isnan(x));
        // A convex combination of a (d - 8) and b (3), or 0 when both are empty.
        if (values[i] == hattn::kNegInf && values[j] == hattn::kNegInf)
          CHECK(x == 0.0);
        else
          CHECK((x >= std::min(d - 8.0, 3.0) - 1e-5 && x <= std::max(d - 8.0, 3.0) + 1e-5));
      }
    }
  const hattn::MergeWeights w = hattn::merge_weights(hattn::kNegInf, hattn::kNegInf);
  CHECK(w.lse == hattn::kNegInf);
  CHECK(w.wa == 0.0f);
  CHECK(w.wb == 0.0f);
}

TEST_CASE("merging partials of disjoint KV chunks equals the softmax over their union",
          "[merge][decode]") {
  // One dense KV block of two sequences; chunk views split every sequence at
  // the same tokens by offsetting the K/V pointers. Sequence 0 (37 tokens) is
  // shorter than the later splits, so its later chunks are empty partials.
  hattn_test::DecodeCase c;
  c.view = hattn_test::ViewKind::kDense;
  c.kv = DType::kBF16;
  c.head_dim = 128;
  c.num_kv_heads = 2;
  c.group = 4;
  c.lens = {37, 1000};
  std::mt19937_64 rng = hattn_test::make_rng("merge/chunks");
  const hattn_test::DecodeInputs in(c, rng);
  const hattn::DecodeProblem& p = in.problem();
  const hattn::DenseKvView full = in.dense();
  const std::int32_t B = p.batch_size, H = p.num_q_heads, D = p.head_dim;

  hattn::ref::Result whole;
  REQUIRE(hattn::ref::decode(p, in.query(), full, &whole) == StatusCode::kSuccess);

  const std::vector<std::int64_t> splits = {0, 20, 500, 1000};  // three chunks
  const std::size_t es = hattn::size_of(full.dtype);
  std::vector<std::vector<std::int32_t>> lens(splits.size() - 1);
  std::vector<hattn::DenseKvView> chunks;
  for (std::size_t k = 0; k + 1 < splits.size(); ++k) {
    const std::int64_t lo = splits[k], hi = splits[k + 1];
    hattn::DenseKvView v = full;
    v.k = static_cast<const std::byte*>(full.k) +
          lo * full.k_strides.token * static_cast<std::int64_t>(es);
    v.v = static_cast<const std::byte*>(full.v) +
          lo * full.v_strides.token * static_cast<std::int64_t>(es);
    v.max_seq_len = full.max_seq_len - lo;
    for (std::int32_t b = 0; b < B; ++b)
      lens[k].push_back(
          static_cast<std::int32_t>(std::clamp<std::int64_t>(full.seq_lens[b] - lo, 0, hi - lo)));
    v.seq_lens = lens[k].data();
    chunks.push_back(v);
  }
  const std::string ctx = "chunks of " + c.describe();
  INFO(ctx << "; " << seed_note());

  SECTION("ref::merge of ref partials, in double") {
    hattn::ref::Result acc;
    REQUIRE(hattn::ref::decode(p, in.query(), chunks[0], &acc) == StatusCode::kSuccess);
    for (std::size_t k = 1; k < chunks.size(); ++k) {
      hattn::ref::Result part;
      REQUIRE(hattn::ref::decode(p, in.query(), chunks[k], &part) == StatusCode::kSuccess);
      REQUIRE(hattn::ref::merge(acc.o, acc.lse2, part.o, part.lse2, static_cast<std::size_t>(D)) ==
              StatusCode::kSuccess);
    }
    const hattn_test::Tolerance exact{1e-12, 1e-12, 1e-20};  // double all the way
    CHECK(compare("o", acc.o, whole.o, exact, ctx) == "");
    CHECK(compare("lse2", acc.lse2, whole.lse2, exact, ctx) == "");
  }
  SECTION("merge_partials of ref partials stored in f32, and in reverse order") {
    std::vector<Partial> parts;
    for (const hattn::DenseKvView& v : chunks) {
      parts.emplace_back(B, H, D, DType::kF32);
      REQUIRE(hattn::ref::decode(p, in.query(), v, parts.back().view) == StatusCode::kSuccess);
    }
    Partial fwd = parts[0], rev = parts[2];
    for (std::size_t k = 1; k < parts.size(); ++k) {
      REQUIRE(hattn::merge_partials(fwd.view, parts[k].view, fwd.view) == StatusCode::kSuccess);
      REQUIRE(hattn::merge_partials(parts[2 - k].view, rev.view, rev.view) == StatusCode::kSuccess);
    }
    CHECK(compare("o", fwd.o_values(), whole.o, hattn_test::kF32OutTolerance, ctx) == "");
    CHECK(compare("lse2", fwd.lse_values(), whole.lse2, hattn_test::kLse2Tolerance, ctx) == "");
    CHECK(compare("o (reverse)", rev.o_values(), whole.o, hattn_test::kF32OutTolerance, ctx) == "");
    CHECK(!any_nan(fwd.o_values()));
  }
  SECTION("merge_partials of backend partials, on every ISA, into each output dtype") {
    for (const hattn::CpuIsa isa : hattn_test::available_isas()) {
      for (const DType out_t : {DType::kF32, DType::kBF16, DType::kF16}) {
        INFO("isa=" << hattn::to_string(isa) << " out=" << hattn::to_string(out_t));
        const hattn::cpu::DenseDecode backend(isa);
        std::vector<Partial> parts;
        for (const hattn::DenseKvView& v : chunks) {
          parts.emplace_back(B, H, D, DType::kF32);
          std::vector<std::byte> ws(hattn::cpu::DenseDecode::workspace_size(p));
          hattn::cpu::DecodePlan plan;
          REQUIRE(backend.plan(p, v, ws.data(), ws.size(), &plan) == StatusCode::kSuccess);
          REQUIRE(backend.run(plan, in.query(), v, parts.back().view,
                              hattn_test::shared_executor()) == StatusCode::kSuccess);
        }
        Partial tmp(B, H, D, DType::kF32), out(B, H, D, out_t, true);
        REQUIRE(hattn::merge_partials(parts[0].view, parts[1].view, tmp.view) ==
                StatusCode::kSuccess);
        REQUIRE(hattn::merge_partials(tmp.view, parts[2].view, out.view) == StatusCode::kSuccess);
        CHECK(compare("o", out.o_values(), whole.o, hattn_test::output_tolerance(out_t), ctx) ==
              "");
        CHECK(compare("lse2", out.lse_values(), whole.lse2, hattn_test::kLse2Tolerance, ctx) == "");
      }
    }
  }
}

TEST_CASE("merge_partials rejects mismatched shapes and null pointers", "[merge][errors]") {
  Partial a(2, 3, 64, DType::kF32), b(2, 3, 64, DType::kF32), out(2, 3, 64, DType::kF32);
  for (int field = 0; field < 3; ++field) {
    for (int which = 0; which < 3; ++which) {
      PartialView v[3] = {a.view, b.view, out.view};
      if (field == 0) v[which].batch_size = 1;
      if (field == 1) v[which].num_heads = 2;
      if (field == 2) v[which].head_dim = 128;
      INFO("field " << field << " of partial " << which);
      CHECK(hattn::merge_partials(v[0], v[1], v[2]) == StatusCode::kInvalidArgument);
    }
  }
  PartialView no_o = b.view, no_lse = out.view;
  no_o.o = nullptr;
  no_lse.lse2 = nullptr;
  CHECK(hattn::merge_partials(a.view, no_o, out.view) == StatusCode::kInvalidArgument);
  CHECK(hattn::merge_partials(a.view, b.view, no_lse) == StatusCode::kInvalidArgument);
  // Negative strides in any partial, and an output whose rows overlap.
  for (int which = 0; which < 3; ++which)
    for (int field = 0; field < 3; ++field) {
      PartialView v[3] = {a.view, b.view, out.view};
      if (field == 0) v[which].stride_batch = -v[which].stride_batch;
      if (field == 1) v[which].stride_head = -1;
      if (field == 2) v[which].lse_stride_batch = -3;
      INFO("negative stride " << field << " of partial " << which);
      CHECK(hattn::merge_partials(v[0], v[1], v[2]) == StatusCode::kInvalidArgument);
    }
  PartialView overlap = out.view;
  overlap.stride_head = 0;
  CHECK(hattn::merge_partials(a.view, b.view, overlap) == StatusCode::kInvalidArgument);
  overlap = out.view;
  overlap.lse_stride_batch = 0;
  CHECK(hattn::merge_partials(a.view, b.view, overlap) == StatusCode::kInvalidArgument);
  // Inputs may overlap (they are only read): one row broadcast to every head.
  PartialView bcast = b.view;
  bcast.stride_head = 0;
  CHECK(hattn::merge_partials(a.view, bcast, out.view) == StatusCode::kSuccess);
  // An empty batch needs no memory.
  const PartialView empty{nullptr, DType::kF32, nullptr, 0, 3, 64, 0, 0, 0};
  CHECK(hattn::merge_partials(empty, empty, empty) == StatusCode::kSuccess);
  // ref::merge checks its shapes too.
  std::vector<double> o(6 * 64), l(6), o2(5 * 64), l2(5);
  CHECK(hattn::ref::merge(o, l, o2, l2, 64) == StatusCode::kInvalidArgument);
  CHECK(hattn::ref::merge(o, l, o, l, 32) == StatusCode::kInvalidArgument);
}
