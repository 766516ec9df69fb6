// Checks of the checking itself: the reference against an attention written
// here from the values as they were stored (so the views' addressing and the
// reference are not only checked against each other), and the guards and
// comparisons catching what they are meant to catch.

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "common/catch_print.hpp"
#include "common/check.hpp"
#include "common/decode_fixture.hpp"
#include "common/seed.hpp"
#include "hattn/ref/decode.hpp"

using hattn::DType;
using hattn::KvLayout;
using hattn_test::DecodeCase;
using hattn_test::ViewKind;

namespace {

// Softmax attention over packed values, in double, written without the views.
hattn::ref::Result independent_attention(const DecodeCase& c,
                                         const hattn_test::DecodeInputs::Values& v, double scale) {
  const std::size_t B = c.lens.size(), Hk = static_cast<std::size_t>(c.num_kv_heads),
                    G = static_cast<std::size_t>(c.group), H = Hk * G,
                    D = static_cast<std::size_t>(c.head_dim);
  hattn::ref::Result r;
  r.o.assign(B * H * D, 0.0);
  r.lse2.assign(B * H, -std::numeric_limits<double>::infinity());
  for (std::size_t b = 0; b < B; ++b) {
    const auto n = static_cast<std::size_t>(c.lens[b]);
    if (n == 0) continue;
    for (std::size_t h = 0; h < H; ++h) {
      const std::size_t hk = h / G;
      std::vector<double> s(n);
      double m = -std::numeric_limits<double>::infinity();
      for (std::size_t t = 0; t < n; ++t) {
        double dot = 0;
        for (std::size_t d = 0; d < D; ++d)
          dot += static_cast<double>(v.q[(b * H + h) * D + d]) *
                 v.k[v.seq_offset[b] + (t * Hk + hk) * D + d];
        s[t] = dot * scale;
        m = std::max(m, s[t]);
      }
      double l = 0;
      for (std::size_t t = 0; t < n; ++t) {
        const double w = std::exp(s[t] - m);
        l += w;
        for (std::size_t d = 0; d < D; ++d)
          r.o[(b * H + h) * D + d] += w * v.v[v.seq_offset[b] + (t * Hk + hk) * D + d];
      }
      for (std::size_t d = 0; d < D; ++d) r.o[(b * H + h) * D + d] /= l;
      r.lse2[b * H + h] = (m + std::log(l)) / std::log(2.0);
    }
  }
  return r;
}

}  // namespace

TEST_CASE("ref::decode equals attention computed from the values as written", "[harness][ref]") {
  // Summation order differs, both in double: agreement to ~1e-13.
  const hattn_test::Tolerance tight{1e-12, 1e-10, 1e-20};
  std::size_t i = 0;
  for (const KvLayout layout : {KvLayout::kNHD, KvLayout::kHND})
    for (const bool padded : {false, true})
      for (const int page : {1, 7, 16, 0}) {  // 0: dense view
        DecodeCase c;
        c.layout = layout;
        c.padded = padded;
        c.view = page ? ViewKind::kPaged : ViewKind::kDense;
        c.page_size = page ? page : 16;
        c.kv = i % 3 == 0 ? DType::kF16 : DType::kBF16;
        c.q = i % 2 ? DType::kBF16 : DType::kF32;
        c.head_dim = 64;
        c.num_kv_heads = 2;
        c.group = 3;
        c.lens = {0, 1, 9, 40};
        c.sm_scale = i % 4 == 1 ? std::optional<float>(0.3f) : std::nullopt;
        const std::string tag = "harness/ref#" + std::to_string(i++);
        std::mt19937_64 rng = hattn_test::make_rng(tag);
        const hattn_test::DecodeInputs in(c, rng, /*keep_values=*/true);
        hattn::ref::Result got;
        if (c.view == ViewKind::kPaged)
          REQUIRE(hattn::ref::decode(in.problem(), in.query(), in.paged(), &got) ==
                  hattn::StatusCode::kSuccess);
        else
          REQUIRE(hattn::ref::decode(in.problem(), in.query(), in.dense(), &got) ==
                  hattn::StatusCode::kSuccess);
        const hattn::ref::Result want =
            independent_attention(c, in.values(), static_cast<double>(in.problem().scale()));
        CHECK(hattn_test::compare("o", got.o, want.o, tight, tag + ": " + c.describe()) == "");
        CHECK(hattn_test::compare("lse2", got.lse2, want.lse2, tight, tag + ": " + c.describe()) ==
              "");
      }
}

TEST_CASE("compare flags NaN, infinities, single outliers and NMSE", "[harness]") {
  // Keep these made-up comparisons out of the run's worst-ratio summary.
  const double worst_before = hattn_test::worst_tolerance_ratio();
  const hattn_test::Tolerance tol{1e-5, 1e-4, 1e-8};
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<double> ref = {1.0, -2.0, 0.5, -inf};
  CHECK(hattn_test::compare("x", ref, ref, tol, "") == "");
  std::vector<double> got = ref;
  got[1] = nan;
  CHECK(hattn_test::compare("x", got, ref, tol, "") != "");
  got = ref;
  got[3] = 0.0;  // -inf expected exactly
  CHECK(hattn_test::compare("x", got, ref, tol, "") != "");
  got = ref;
  got[0] = inf;
  CHECK(hattn_test::compare("x", got, ref, tol, "") != "");
  got = ref;
  got[2] = 0.5 + 2e-5 + 1e-4 * 0.5;  // just outside
  CHECK(hattn_test::compare("x", got, ref, tol, "") != "");
  got[2] = 0.5 + 0.9 * (1e-5 + 1e-4 * 0.5);  // just inside
  CHECK(hattn_test::compare("x", got, ref, tol, "") == "");
  // Every element inside, but the error is systematic: NMSE catches it.
  const hattn_test::Tolerance loose_elem{1.0, 0.0, 1e-8};
  CHECK(hattn_test::compare("x", std::vector<double>{1.1, 1.1}, std::vector<double>{1.0, 1.0},
                            loose_elem, "") != "");
  // The message names the element and the seed.
  got = ref;
  got[1] = -3.0;
  const std::string msg = hattn_test::compare("x", got, ref, tol, "ctx");
  CHECK(msg.find("[1]") != std::string::npos);
  CHECK(msg.find("HATTN_TEST_SEED") != std::string::npos);
  CHECK(msg.find("ctx") != std::string::npos);
  hattn_test::set_worst_tolerance_ratio(worst_before);
}

TEST_CASE("OutputBuffer poisons its outputs and notices writes to padding or guard", "[harness]") {
  hattn::DecodeProblem p;
  p.batch_size = 2;
  p.num_q_heads = 3;
  p.num_kv_heads = 1;
  p.head_dim = 64;
  for (const DType t : {DType::kF32, DType::kBF16, DType::kF16}) {
    p.o_dtype = t;
    INFO("dtype " << hattn::to_string(t));
    {
      hattn_test::OutputBuffer out(p, true);
      for (const double x : out.o()) CHECK(std::isnan(x));
      for (const double x : out.lse2()) CHECK(std::isnan(x));
      CHECK(out.check_untouched() == "");
      // Writing every addressed element is fine.
      const hattn::PartialView& v = out.view();
      for (std::int32_t b = 0; b < 2; ++b)
        for (std::int32_t h = 0; h < 3; ++h) {
          v.lse2[b * v.lse_stride_batch + h] = 0.0f;
          for (std::int32_t d = 0; d < 64; ++d)
            hattn::store_from_float(v.o, t, b * v.stride_batch + h * v.stride_head + d, 1.0f);
        }
      CHECK(out.check_untouched() == "");
      // One element past a head (padding) is not.
      hattn::store_from_float(v.o, t, v.stride_head * 0 + 64, 1.0f);
      CHECK(out.check_untouched() != "");
    }
    {
      hattn_test::OutputBuffer out(p, false);
      const hattn::PartialView& v = out.view();
      // One element past the end: the guard.
      hattn::store_from_float(v.o, t, 2 * v.stride_batch, 0.0f);
      CHECK(out.check_untouched() != "");
    }
    {
      hattn_test::OutputBuffer out(p, false);
      const hattn::PartialView& v = out.view();
      v.lse2[2 * v.lse_stride_batch] = 0.0f;
      CHECK(out.check_untouched() != "");
    }
  }
}
