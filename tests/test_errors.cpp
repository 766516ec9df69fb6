// Bad input returns its Status code, from can_implement, plan, run and the
// reference alike; a failed call writes nothing.

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include "common/catch_print.hpp"
#include "common/decode_fixture.hpp"
#include "common/seed.hpp"
#include "hattn/cpu/dense_decode.hpp"
#include "hattn/ref/decode.hpp"

using hattn::DecodeProblem;
using hattn::DType;
using hattn::PagedKvView;
using hattn::Status;
using hattn::StatusCode;
using hattn::cpu::DecodePlan;
using hattn::cpu::DenseDecode;
using hattn_test::DecodeCase;
using hattn_test::DecodeInputs;
using hattn_test::OutputBuffer;

namespace {

constexpr StatusCode kOk = StatusCode::kSuccess;
constexpr StatusCode kInvalid = StatusCode::kInvalidArgument;
constexpr StatusCode kNotSupported = StatusCode::kNotSupported;

// A small valid step (B = 2, 4 query heads over 2 KV heads, D = 64, lengths
// 20 and 5, page size 16) in both views, to be broken one field at a time.
struct Fixture {
  DecodeCase paged_case, dense_case;
  std::mt19937_64 rng = hattn_test::make_rng("errors");
  DecodeInputs paged_in, dense_in;
  DenseDecode backend;

  static DecodeCase make(hattn_test::ViewKind view) {
    DecodeCase c;
    c.view = view;
    c.head_dim = 64;
    c.num_kv_heads = 2;
    c.group = 2;
    c.page_size = 16;
    c.lens = {20, 5};
    return c;
  }
  Fixture()
      : paged_case(make(hattn_test::ViewKind::kPaged)),
        dense_case(make(hattn_test::ViewKind::kDense)),
        paged_in(paged_case, rng),
        dense_in(dense_case, rng) {}

  const DecodeProblem& problem() const { return paged_in.problem(); }

  // plan() into a workspace of workspace_size(p) bytes.
  template <class Kv>
  Status plan(const DecodeProblem& p, const Kv& kv, DecodePlan* out) {
    ws.assign(DenseDecode::workspace_size(p) + 1, std::byte{0});
    return backend.plan(p, kv, ws.data(), ws.size(), out);
  }
  // A valid plan for the unmodified inputs.
  template <class Kv>
  DecodePlan good_plan(const Kv& kv) {
    DecodePlan pl;
    REQUIRE(plan(problem(), kv, &pl) == kOk);
    return pl;
  }

  std::vector<std::byte> ws;
};

// run() must fail with `want` and leave the output untouched.
template <class Kv>
void expect_run_fails(Fixture& f, const DecodePlan& plan, const hattn::QueryView& q, const Kv& kv,
                      const hattn::PartialView& out, const OutputBuffer& buf, StatusCode want) {
  const std::vector<std::byte> before = buf.bits();
  CHECK(f.backend.run(plan, q, kv, out, hattn_test::shared_executor()) == want);
  const bool unchanged = buf.bits() == before;
  CHECK(unchanged);
  CHECK(buf.check_untouched() == "");
}

}  // namespace

TEST_CASE("the fixture itself is valid", "[errors]") {
  Fixture f;
  const DecodePlan paged_plan = f.good_plan(f.paged_in.paged());
  OutputBuffer paged_out(f.problem(), false);
  CHECK(f.backend.run(paged_plan, f.paged_in.query(), f.paged_in.paged(), paged_out.view(),
                      hattn_test::shared_executor()) == kOk);
  const DecodePlan dense_plan = f.good_plan(f.dense_in.dense());
  OutputBuffer dense_out(f.problem(), false);
  CHECK(f.backend.run(dense_plan, f.dense_in.query(), f.dense_in.dense(), dense_out.view(),
                      hattn_test::shared_executor()) == kOk);
}

TEST_CASE("null pointers are invalid arguments", "[errors]") {
  Fixture f;
  const DecodeProblem p = f.problem();
  const PagedKvView kv = f.paged_in.paged();
  const DecodePlan plan = f.good_plan(kv);
  OutputBuffer buf(p, false);
  hattn::ref::Result r;

  SECTION("query data") {
    hattn::QueryView q = f.paged_in.query();
    q.data = nullptr;
    expect_run_fails(f, plan, q, kv, buf.view(), buf, kInvalid);
    CHECK(hattn::ref::decode(p, q, kv, &r) == kInvalid);
  }
  SECTION("output o and lse2") {
    hattn::PartialView o_null = buf.view(), lse_null = buf.view();
    o_null.o = nullptr;
    lse_null.lse2 = nullptr;
    expect_run_fails(f, plan, f.paged_in.query(), kv, o_null, buf, kInvalid);
    expect_run_fails(f, plan, f.paged_in.query(), kv, lse_null, buf, kInvalid);
    CHECK(hattn::ref::decode(p, f.paged_in.query(), kv, o_null) == kInvalid);
    CHECK(hattn::ref::decode(p, f.paged_in.query(), kv, lse_null) == kInvalid);
    CHECK(hattn::ref::decode(p, f.paged_in.query(), kv,
                             static_cast<hattn::ref::Result*>(nullptr)) == kInvalid);
  }
  SECTION("K and V, paged and dense") {
    for (int which = 0; which < 2; ++which) {
      PagedKvView bad = kv;
      hattn::DenseKvView dbad = f.dense_in.dense();
      (which == 0 ? bad.k : bad.v) = nullptr;
      (which == 0 ? dbad.k : dbad.v) = nullptr;
      DecodePlan pl;
      CHECK(f.plan(p, bad, &pl) == kInvalid);
      CHECK(pl.items == nullptr);  // a failed plan leaves the plan alone
      CHECK(f.plan(p, dbad, &pl) == kInvalid);
      expect_run_fails(f, plan, f.paged_in.query(), bad, buf.view(), buf, kInvalid);
      CHECK(hattn::ref::decode(p, f.paged_in.query(), bad, &r) == kInvalid);
      CHECK(hattn::ref::decode(p, f.dense_in.query(), dbad, &r) == kInvalid);
    }
  }
  SECTION("page table arrays") {
    PagedKvView no_indptr = kv, no_indices = kv, no_last = kv;
    no_indptr.indptr = nullptr;
    no_indices.indices = nullptr;
    no_last.last_page_len = nullptr;
    for (const PagedKvView& bad : {no_indptr, no_indices, no_last}) {
      DecodePlan pl;
      CHECK(f.plan(p, bad, &pl) == kInvalid);
      expect_run_fails(f, plan, f.paged_in.query(), bad, buf.view(), buf, kInvalid);
      CHECK(hattn::ref::decode(p, f.paged_in.query(), bad, &r) == kInvalid);
    }
  }
  SECTION("dense seq_lens") {
    hattn::DenseKvView bad = f.dense_in.dense();
    bad.seq_lens = nullptr;
    DecodePlan pl;
    CHECK(f.plan(p, bad, &pl) == kInvalid);
    CHECK(hattn::ref::decode(p, f.dense_in.query(), bad, &r) == kInvalid);
  }
  SECTION("workspace and plan") {
    DecodePlan pl;
    const std::size_t need = DenseDecode::workspace_size(p);
    CHECK(f.backend.plan(p, kv, nullptr, need, &pl) == kInvalid);
    std::vector<std::byte> ws(need);
    CHECK(f.backend.plan(p, kv, ws.data(), ws.size(), nullptr) == kInvalid);
  }
}

TEST_CASE("problem shapes the backend cannot take are rejected", "[errors]") {
  Fixture f;
  hattn::ref::Result r;
  const auto expect_problem = [&](const DecodeProblem& p, StatusCode want) {
    CHECK(DenseDecode::can_implement(p) == want);
    CHECK(DenseDecode::workspace_size(p) == 0);
    DecodePlan pl;
    CHECK(f.plan(p, f.paged_in.paged(), &pl) == want);
    CHECK(f.plan(p, f.dense_in.dense(), &pl) == want);
  };
  DecodeProblem p = f.problem();
  SECTION("num_q_heads not a multiple of num_kv_heads") {
    p.num_q_heads = 5;
    expect_problem(p, kInvalid);
    CHECK(hattn::ref::decode(p, f.paged_in.query(), f.paged_in.paged(), &r) == kInvalid);
  }
  SECTION("non-positive heads, head dim, negative batch, non-finite sm_scale") {
    DecodeProblem q = p;
    q.num_kv_heads = 0;
    expect_problem(q, kInvalid);
    q = p;
    q.num_q_heads = 0;
    expect_problem(q, kInvalid);
    q = p;
    q.head_dim = 0;
    expect_problem(q, kInvalid);
    q = p;
    q.batch_size = -1;
    expect_problem(q, kInvalid);
    for (const float s :
         {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
      q = p;
      q.sm_scale = s;
      expect_problem(q, kInvalid);
      CHECK(hattn::ref::decode(q, f.paged_in.query(), f.paged_in.paged(), &r) == kInvalid);
    }
  }
  SECTION("an sm_scale whose base-2 form overflows f32") {
    p.sm_scale = 3e38f;  // finite, but 3e38 * log2(e) is not
    expect_problem(p, kInvalid);
    CHECK(hattn::ref::decode(p, f.paged_in.query(), f.paged_in.paged(), &r) == kInvalid);
  }
  SECTION("sizes whose workspace would overflow size_t are kNotSupported") {
    p.batch_size = 16649994;
    p.num_kv_heads = 1;
    p.num_q_heads = 1073542560;
    p.head_dim = 256;
    CHECK(DenseDecode::can_implement(p) == kNotSupported);
    CHECK(DenseDecode::workspace_size(p) == 0);
  }
  SECTION("unsupported head dims are kNotSupported") {
    for (const int d : {96, 32, 80, 192, 512, 65}) {
      INFO("head_dim=" << d);
      DecodeCase c = Fixture::make(hattn_test::ViewKind::kPaged);
      c.head_dim = d;
      std::mt19937_64 rng = hattn_test::make_rng("errors/dim");
      const DecodeInputs in(c, rng);  // views of that head dim
      expect_problem(in.problem(), kNotSupported);
      DecodePlan pl;
      CHECK(f.plan(in.problem(), in.paged(), &pl) == kNotSupported);
    }
  }
  SECTION("dtypes outside the supported lists are kNotSupported") {
    const auto bogus = static_cast<DType>(9);
    DecodeProblem q = p;
    q.kv_dtype = bogus;
    expect_problem(q, kNotSupported);
    q = p;
    q.q_dtype = bogus;
    expect_problem(q, kNotSupported);
    q = p;
    q.o_dtype = bogus;
    expect_problem(q, kNotSupported);
  }
}

TEST_CASE("bad page tables are invalid arguments", "[errors]") {
  Fixture f;
  const DecodeProblem p = f.problem();
  const PagedKvView kv = f.paged_in.paged();
  const DecodePlan plan = f.good_plan(kv);
  OutputBuffer buf(p, false);
  hattn::ref::Result r;
  // Copies of the page table to corrupt: lengths 20 and 5 with P = 16 are
  // pages {i0, i1} and {i2}.
  std::vector<std::int32_t> indptr(kv.indptr, kv.indptr + 3);
  std::vector<std::int32_t> indices(kv.indices, kv.indices + 3);
  std::vector<std::int32_t> last(kv.last_page_len, kv.last_page_len + 2);
  REQUIRE(indptr == std::vector<std::int32_t>{0, 2, 3});
  PagedKvView bad = kv;
  bad.indptr = indptr.data();
  bad.indices = indices.data();
  bad.last_page_len = last.data();

  const auto expect_bad = [&](const char* what) {
    INFO(what);
    DecodePlan pl;
    CHECK(f.plan(p, bad, &pl) == kInvalid);
    CHECK(hattn::ref::decode(p, f.paged_in.query(), bad, &r) == kInvalid);
    expect_run_fails(f, plan, f.paged_in.query(), bad, buf.view(), buf, kInvalid);
  };
  SECTION("page index outside the pool") {
    indices[1] = static_cast<std::int32_t>(kv.num_pages);
    expect_bad("index == num_pages");
    indices[1] = std::numeric_limits<std::int32_t>::max();
    expect_bad("index == INT32_MAX");
    indices[1] = -1;
    expect_bad("index == -1");
    indices[1] = std::numeric_limits<std::int32_t>::min();
    expect_bad("index == INT32_MIN");
  }
  SECTION("pool smaller than the indices") {
    bad.num_pages = 0;
    expect_bad("num_pages == 0");
    bad.num_pages = -1;
    expect_bad("num_pages == -1");
  }
  SECTION("decreasing indptr") {
    indptr = {0, 3, 2};
    last = {16, 5};
    expect_bad("indptr {0, 3, 2}");
    indptr = {-1, 2, 3};
    expect_bad("indptr[0] = -1");
  }
  SECTION("last_page_len outside 1..page_size") {
    last[0] = 0;
    expect_bad("last_page_len 0");
    last[0] = 17;
    expect_bad("last_page_len 17 > page_size 16");
    last[0] = -3;
    expect_bad("last_page_len -3");
  }
  SECTION("page size and strides") {
    bad.page_size = 0;
    expect_bad("page_size 0");
    bad = kv;
    bad.k_strides.token = -1;
    expect_bad("negative K stride");
    bad = kv;
    bad.v_strides.outer = -64;
    expect_bad("negative V stride");
  }
}

TEST_CASE("bad dense lengths are invalid arguments", "[errors]") {
  Fixture f;
  const DecodeProblem p = f.problem();
  const hattn::DenseKvView kv = f.dense_in.dense();
  const DecodePlan plan = f.good_plan(kv);
  OutputBuffer buf(p, false);
  hattn::ref::Result r;
  std::vector<std::int32_t> lens(kv.seq_lens, kv.seq_lens + 2);
  hattn::DenseKvView bad = kv;
  bad.seq_lens = lens.data();
  for (const std::int32_t n : {static_cast<std::int32_t>(kv.max_seq_len + 1), -1,
                               std::numeric_limits<std::int32_t>::min()}) {
    INFO("seq_len " << n << ", max_seq_len " << kv.max_seq_len);
    lens[1] = n;
    DecodePlan pl;
    CHECK(f.plan(p, bad, &pl) == kInvalid);
    CHECK(hattn::ref::decode(p, f.dense_in.query(), bad, &r) == kInvalid);
    expect_run_fails(f, plan, f.dense_in.query(), bad, buf.view(), buf, kInvalid);
  }
}

TEST_CASE("a workspace smaller than workspace_size is kWorkspaceTooSmall", "[errors]") {
  Fixture f;
  const DecodeProblem p = f.problem();
  const std::size_t need = DenseDecode::workspace_size(p);
  REQUIRE(need > 0);
  std::vector<std::byte> ws(need);
  DecodePlan pl;
  CHECK(f.backend.plan(p, f.paged_in.paged(), ws.data(), need - 1, &pl) ==
        StatusCode::kWorkspaceTooSmall);
  CHECK(f.backend.plan(p, f.dense_in.dense(), ws.data(), need / 2, &pl) ==
        StatusCode::kWorkspaceTooSmall);
  CHECK(f.backend.plan(p, f.paged_in.paged(), nullptr, 0, &pl) == StatusCode::kWorkspaceTooSmall);
  CHECK(pl.items == nullptr);
  // Exactly enough is enough, at any alignment of the buffer.
  std::vector<std::byte> big(need + 63);
  for (const std::size_t off : {std::size_t{0}, std::size_t{1}, std::size_t{17}, std::size_t{63}}) {
    INFO("offset " << off);
    CHECK(f.backend.plan(p, f.paged_in.paged(), big.data() + off, need, &pl) == kOk);
  }
  // The size does not depend on the lengths: a plan for much longer
  // sequences fits in the same workspace.
  DecodeCase c = Fixture::make(hattn_test::ViewKind::kPaged);
  c.lens = {5000, 3};
  std::mt19937_64 rng = hattn_test::make_rng("errors/ws");
  const DecodeInputs longer(c, rng);
  CHECK(DenseDecode::workspace_size(longer.problem()) == need);
  CHECK(f.backend.plan(longer.problem(), longer.paged(), ws.data(), need, &pl) == kOk);
}

TEST_CASE("views whose shape differs from the problem are invalid arguments", "[errors]") {
  Fixture f;
  const DecodeProblem p = f.problem();
  const PagedKvView kv = f.paged_in.paged();
  const hattn::QueryView q = f.paged_in.query();
  const DecodePlan plan = f.good_plan(kv);
  OutputBuffer buf(p, false);
  const hattn::PartialView out = buf.view();
  hattn::ref::Result r;

  SECTION("query") {
    std::vector<hattn::QueryView> bad(6, q);
    bad[0].batch_size = 1;
    bad[1].num_heads = 2;
    bad[2].head_dim = 128;
    bad[3].dtype = DType::kBF16;
    bad[4].stride_head = -1;
    bad[5].stride_batch = -5;
    for (std::size_t i = 0; i < bad.size(); ++i) {
      INFO("query mutation " << i);
      expect_run_fails(f, plan, bad[i], kv, out, buf, kInvalid);
      CHECK(hattn::ref::decode(p, bad[i], kv, &r) == kInvalid);
    }
  }
  SECTION("output") {
    std::vector<hattn::PartialView> bad(11, out);
    bad[0].batch_size = 3;
    bad[1].num_heads = 2;
    bad[2].head_dim = 128;
    bad[3].dtype = DType::kF16;
    bad[4].stride_batch = -1;
    bad[5].stride_head = -1;
    bad[6].lse_stride_batch = -1;
    // Strides that map two (batch, head) rows onto the same memory.
    bad[7].stride_head = 0;
    bad[8].stride_head = p.head_dim - 1;
    bad[9].stride_batch = out.stride_head;  // batch 1 = head 1 of batch 0
    bad[10].lse_stride_batch = p.num_q_heads - 1;
    for (std::size_t i = 0; i < bad.size(); ++i) {
      INFO("output mutation " << i);
      expect_run_fails(f, plan, q, kv, bad[i], buf, kInvalid);
      CHECK(hattn::ref::decode(p, q, kv, bad[i]) == kInvalid);
    }
  }
  SECTION("an output with heads outside batches is fine") {
    hattn::PartialView t = out;  // same extent, transposed: [head][batch][D]
    t.stride_batch = p.head_dim;
    t.stride_head = std::int64_t{p.batch_size} * p.head_dim;
    CHECK(f.backend.run(plan, q, kv, t, hattn_test::shared_executor()) == kOk);
  }
  SECTION("KV view") {
    std::vector<PagedKvView> bad(4, kv);
    bad[0].batch_size = 1;
    bad[1].num_kv_heads = 4;
    bad[2].head_dim = 128;
    bad[3].dtype = DType::kF32;
    for (std::size_t i = 0; i < bad.size(); ++i) {
      INFO("KV mutation " << i);
      DecodePlan pl;
      CHECK(f.plan(p, bad[i], &pl) == kInvalid);
      expect_run_fails(f, plan, q, bad[i], out, buf, kInvalid);
      CHECK(hattn::ref::decode(p, q, bad[i], &r) == kInvalid);
    }
    hattn::DenseKvView dense = f.dense_in.dense();
    dense.num_kv_heads = 1;
    DecodePlan pl;
    CHECK(f.plan(p, dense, &pl) == kInvalid);
  }
}

TEST_CASE("run with a plan that does not fit the inputs is an invalid argument", "[errors]") {
  Fixture f;
  const DecodeProblem p = f.problem();
  OutputBuffer buf(p, false);
  SECTION("default-constructed plan") {
    const DecodePlan none;
    expect_run_fails(f, none, f.paged_in.query(), f.paged_in.paged(), buf.view(), buf, kInvalid);
    expect_run_fails(f, none, f.dense_in.query(), f.dense_in.dense(), buf.view(), buf, kInvalid);
  }
  SECTION("paged lengths differ from the plan's") {
    const PagedKvView kv = f.paged_in.paged();
    const DecodePlan plan = f.good_plan(kv);
    std::vector<std::int32_t> last(kv.last_page_len, kv.last_page_len + 2);
    PagedKvView grown = kv;
    grown.last_page_len = last.data();
    last[1] += 1;  // 5 -> 6 tokens: a valid view, not the planned one
    expect_run_fails(f, plan, f.paged_in.query(), grown, buf.view(), buf, kInvalid);
    last[1] -= 2;  // 4 tokens
    expect_run_fails(f, plan, f.paged_in.query(), grown, buf.view(), buf, kInvalid);
  }
  SECTION("dense lengths differ from the plan's") {
    const hattn::DenseKvView kv = f.dense_in.dense();
    const DecodePlan plan = f.good_plan(kv);
    std::vector<std::int32_t> lens(kv.seq_lens, kv.seq_lens + 2);
    hattn::DenseKvView changed = kv;
    changed.seq_lens = lens.data();
    lens[0] -= 1;
    expect_run_fails(f, plan, f.dense_in.query(), changed, buf.view(), buf, kInvalid);
    lens[0] = 0;
    expect_run_fails(f, plan, f.dense_in.query(), changed, buf.view(), buf, kInvalid);
  }
  SECTION("a plan whose workspace a later plan reused") {
    const PagedKvView kv = f.paged_in.paged();
    std::vector<std::byte> ws(DenseDecode::workspace_size(p));
    DecodePlan older, newer;
    REQUIRE(f.backend.plan(p, kv, ws.data(), ws.size(), &older) == kOk);
    REQUIRE(f.backend.plan(p, kv, ws.data(), ws.size(), &newer) == kOk);
    expect_run_fails(f, older, f.paged_in.query(), kv, buf.view(), buf, kInvalid);
    CHECK(f.backend.run(newer, f.paged_in.query(), kv, buf.view(), hattn_test::shared_executor()) ==
          kOk);
    const DecodePlan copy = newer;  // a copy of the newest plan is still that plan
    CHECK(f.backend.run(copy, f.paged_in.query(), kv, buf.view(), hattn_test::shared_executor()) ==
          kOk);
    // Plans of the two view types share one sequence of stamps.
    DecodePlan dense;
    REQUIRE(f.backend.plan(p, f.dense_in.dense(), ws.data(), ws.size(), &dense) == kOk);
    expect_run_fails(f, newer, f.paged_in.query(), kv, buf.view(), buf, kInvalid);
    REQUIRE(f.backend.plan(p, kv, ws.data(), ws.size(), &newer) == kOk);
    expect_run_fails(f, dense, f.dense_in.query(), f.dense_in.dense(), buf.view(), buf, kInvalid);
  }
  SECTION("a plan for another problem") {
    // Planned for 4 query heads; run with views of 8 query heads.
    DecodeCase c = Fixture::make(hattn_test::ViewKind::kPaged);
    c.group = 4;
    std::mt19937_64 rng = hattn_test::make_rng("errors/other");
    const DecodeInputs other(c, rng);
    const DecodePlan plan = f.good_plan(f.paged_in.paged());
    OutputBuffer other_buf(other.problem(), false);
    expect_run_fails(f, plan, other.query(), other.paged(), other_buf.view(), other_buf, kInvalid);
  }
}

TEST_CASE("every status code has a distinct name and errors carry a message", "[errors][status]") {
  std::set<std::string> names;
  for (int i = 0; i <= static_cast<int>(StatusCode::kInternal); ++i)
    names.insert(std::string(hattn::to_string(static_cast<StatusCode>(i))));
  CHECK(names.size() == static_cast<std::size_t>(StatusCode::kInternal) + 1);
  CHECK(names.count("unknown status") == 0);
  CHECK(Status::ok().is_ok());
  CHECK(static_cast<bool>(Status::ok()));
  DecodeProblem p;
  p.num_q_heads = 3;
  p.num_kv_heads = 2;
  p.head_dim = 64;
  const Status s = DenseDecode::can_implement(p);
  CHECK_FALSE(s.is_ok());
  CHECK(std::string(s.message()).size() > 0);
}
