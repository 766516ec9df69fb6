// dispatch / contains (core/dispatch.hpp), and can_implement agreeing with
// the supported lists (core/supported.hpp).

#include <catch2/catch.hpp>

#include <type_traits>
#include <vector>

#include "common/catch_print.hpp"
#include "common/lists.hpp"
#include "hattn/core/dispatch.hpp"
#include "hattn/core/supported.hpp"
#include "hattn/cpu/dense_decode.hpp"

using hattn::DType;
using hattn::Status;
using hattn::StatusCode;

namespace {
using Small = hattn::ValueList<3, 5, 8>;
enum class Color : unsigned char { kRed, kGreen, kBlue };
using Colors = hattn::ValueList<Color::kRed, Color::kBlue>;
}  // namespace

TEST_CASE("contains tells the listed values", "[dispatch]") {
  STATIC_REQUIRE(Small::size == 3);
  STATIC_REQUIRE(hattn::contains<Small>(5));
  STATIC_REQUIRE_FALSE(hattn::contains<Small>(4));
  STATIC_REQUIRE(hattn::contains<Colors>(Color::kBlue));
  STATIC_REQUIRE_FALSE(hattn::contains<Colors>(Color::kGreen));
  STATIC_REQUIRE(hattn::contains<hattn::SupportedHeadDims>(128));
  STATIC_REQUIRE_FALSE(hattn::contains<hattn::SupportedHeadDims>(96));
  CHECK(hattn::contains<Small>(std::int64_t{8}));  // any integer type compares by value
  CHECK_FALSE(hattn::contains<Small>(-3));
}

TEST_CASE("for_each_value visits every value once, in order, as a constant", "[dispatch]") {
  std::vector<int> seen;
  hattn::for_each_value<Small>([&](auto c) {
    static_assert(std::is_same_v<decltype(c), std::integral_constant<int, decltype(c)::value>>);
    seen.push_back(c.value);
  });
  CHECK(seen == std::vector<int>{3, 5, 8});
}

TEST_CASE("dispatch calls f with the matching constant or returns kNotSupported", "[dispatch]") {
  for (const int v : {3, 5, 8}) {
    int called = 0, got = -1;
    const Status s = hattn::dispatch<Small>(v, [&](auto c) {
      ++called;
      got = c.value;
      constexpr int k = decltype(c)::value;  // usable at compile time
      static_assert(k == 3 || k == 5 || k == 8);
    });
    CHECK(s.is_ok());  // void f: success
    CHECK(called == 1);
    CHECK(got == v);
  }
  int called = 0;
  for (const int v : {0, 4, -5, 9}) {
    const Status s = hattn::dispatch<Small>(v, [&](auto) { ++called; });
    CHECK(s == StatusCode::kNotSupported);
  }
  CHECK(called == 0);
  // f returning Status: dispatch returns it.
  const Status s = hattn::dispatch<Small>(5, [](auto c) -> Status {
    if (c.value == 5) return {StatusCode::kInternal, "from f"};
    return Status::ok();
  });
  CHECK(s == StatusCode::kInternal);
  CHECK(std::string(s.message()) == "from f");
  CHECK(hattn::dispatch<Colors>(Color::kRed, [](auto c) {
          return c.value == Color::kRed ? Status::ok() : Status(StatusCode::kInternal, "wrong");
        }) == StatusCode::kSuccess);
}

TEST_CASE("DenseDecode::can_implement agrees with the supported lists", "[dispatch][decode]") {
  hattn::DecodeProblem p;
  p.batch_size = 2;
  p.num_kv_heads = 2;
  p.num_q_heads = 8;
  const auto kv_types = hattn_test::list_values<hattn::SupportedKvDTypes>();
  const auto q_types = hattn_test::list_values<hattn::SupportedQueryDTypes>();
  const auto o_types = hattn_test::list_values<hattn::SupportedOutDTypes>();
  // Every head dim up to 1024 (and a few dtypes): supported iff listed.
  for (int d = 1; d <= 1024; ++d) {
    p.head_dim = d;
    const bool listed = hattn::contains<hattn::SupportedHeadDims>(d);
    const Status s = hattn::cpu::DenseDecode::can_implement(p);
    if (s.is_ok() != listed || (!listed && s.code() != StatusCode::kNotSupported)) {
      INFO("head_dim " << d << ": " << Catch::StringMaker<Status>::convert(s));
      CHECK(false);
    }
    CHECK((hattn::cpu::DenseDecode::workspace_size(p) > 0) == listed);
  }
  // Every listed dtype combination is implemented, on each listed head dim;
  // any other dtype value is not.
  for (const int d : hattn_test::list_values<hattn::SupportedHeadDims>())
    for (const DType kv : kv_types)
      for (const DType q : q_types)
        for (const DType o : o_types) {
          p.head_dim = d;
          p.kv_dtype = kv;
          p.q_dtype = q;
          p.o_dtype = o;
          INFO("D=" << d << " kv=" << hattn::to_string(kv) << " q=" << hattn::to_string(q)
                    << " o=" << hattn::to_string(o));
          CHECK(hattn::cpu::DenseDecode::can_implement(p) == StatusCode::kSuccess);
        }
  p.head_dim = 128;
  for (int raw = 0; raw < 256; ++raw) {
    const auto t = static_cast<DType>(raw);
    hattn::DecodeProblem a = p, b = p, c = p;
    a.kv_dtype = b.q_dtype = c.o_dtype = t;
    const auto expect = [](bool listed) {
      return listed ? StatusCode::kSuccess : StatusCode::kNotSupported;
    };
    INFO("dtype value " << raw);
    CHECK(hattn::cpu::DenseDecode::can_implement(a) ==
          expect(hattn::contains<hattn::SupportedKvDTypes>(t)));
    CHECK(hattn::cpu::DenseDecode::can_implement(b) ==
          expect(hattn::contains<hattn::SupportedQueryDTypes>(t)));
    CHECK(hattn::cpu::DenseDecode::can_implement(c) ==
          expect(hattn::contains<hattn::SupportedOutDTypes>(t)));
  }
  // GQA: any multiple of num_kv_heads.
  p.head_dim = 64;
  for (int hq = 1; hq <= 64; ++hq) {
    p.num_q_heads = hq;
    CHECK(hattn::cpu::DenseDecode::can_implement(p).is_ok() == (hq % p.num_kv_heads == 0));
  }
}
