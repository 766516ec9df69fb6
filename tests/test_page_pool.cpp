// HostPagePool: appends across pages read back exactly through the view it
// builds; release returns pages; a failed append changes nothing.

#include <catch2/catch.hpp>

#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <utility>
#include <vector>

#include "common/catch_print.hpp"
#include "common/check.hpp"
#include "common/decode_fixture.hpp"
#include "common/seed.hpp"
#include "hattn/core/page_pool.hpp"
#include "hattn/cpu/dense_decode.hpp"
#include "hattn/ref/decode.hpp"

using hattn::DType;
using hattn::HostPagePool;
using hattn::KvLayout;
using hattn::PagePoolOptions;
using hattn::StatusCode;

namespace {

constexpr StatusCode kOk = StatusCode::kSuccess;

// Random tokens [n][H][D] of one dtype, with `stride` elements per token.
std::vector<std::byte> random_tokens(std::mt19937_64& rng, DType t, std::int64_t n,
                                     std::int64_t stride) {
  std::vector<std::byte> r(hattn::size_of(t) * static_cast<std::size_t>(n * stride));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (std::int64_t i = 0; i < n * stride; ++i)
    hattn::store_from_float(r.data(), t, i, normal(rng));
  return r;
}

// Element (token t, head h, dim d) of sequence b read through the view, by
// its own address arithmetic (not the library's row helpers).
const std::byte* elem(const hattn::PagedKvView& v, const void* base, const hattn::KvStrides& s,
                      std::int32_t b, std::int64_t t, std::int32_t h, std::int32_t d) {
  const std::int64_t page = v.indices[v.indptr[b] + t / v.page_size];
  const std::int64_t off = page * s.outer + t % v.page_size * s.token + h * s.head + d;
  return static_cast<const std::byte*>(base) +
         off * static_cast<std::int64_t>(hattn::size_of(v.dtype));
}

// What a test appended to one sequence, packed [len][H][D].
struct Expected {
  std::vector<std::byte> k, v;
};

void append_expected(Expected& e, const std::vector<std::byte>& k, const std::vector<std::byte>& v,
                     std::int64_t n, std::int64_t stride, std::int64_t row_elems, DType t) {
  const std::size_t es = hattn::size_of(t);
  for (std::int64_t i = 0; i < n; ++i) {
    const auto at = static_cast<std::size_t>(i * stride) * es;
    const auto len = static_cast<std::size_t>(row_elems) * es;
    e.k.insert(e.k.end(), k.begin() + static_cast<std::ptrdiff_t>(at),
               k.begin() + static_cast<std::ptrdiff_t>(at + len));
    e.v.insert(e.v.end(), v.begin() + static_cast<std::ptrdiff_t>(at),
               v.begin() + static_cast<std::ptrdiff_t>(at + len));
  }
}

// Every element of every sequence reads back through the view as appended.
void check_readback(const HostPagePool& pool, const std::vector<HostPagePool::SeqId>& ids,
                    const std::vector<Expected>& expected) {
  hattn::PageTable table;
  REQUIRE(pool.build_page_table(ids, &table) == kOk);
  const hattn::PagedKvView view = pool.view(table);
  const PagePoolOptions& o = pool.options();
  REQUIRE(view.batch_size == static_cast<std::int32_t>(ids.size()));
  REQUIRE(view.page_size == o.page_size);
  REQUIRE(view.num_pages == o.num_pages);
  REQUIRE(view.dtype == o.dtype);
  hattn::DecodeProblem p;
  p.batch_size = view.batch_size;
  p.num_kv_heads = p.num_q_heads = o.num_kv_heads;
  p.head_dim = o.head_dim;
  p.kv_dtype = o.dtype;
  REQUIRE(hattn::validate(p, view) == kOk);
  const std::size_t es = hattn::size_of(o.dtype);
  for (std::size_t b = 0; b < ids.size(); ++b) {
    const std::int64_t n = pool.seq_len(ids[b]);
    REQUIRE(n * o.num_kv_heads * o.head_dim * static_cast<std::int64_t>(es) ==
            static_cast<std::int64_t>(expected[b].k.size()));
    REQUIRE(view.seq_len(static_cast<std::int32_t>(b)) == n);
    std::int64_t mismatches = 0;
    for (std::int64_t t = 0; t < n; ++t)
      for (std::int32_t h = 0; h < o.num_kv_heads; ++h) {
        const std::size_t at = static_cast<std::size_t>((t * o.num_kv_heads + h) * o.head_dim) * es;
        const auto bb = static_cast<std::int32_t>(b);
        if (std::memcmp(elem(view, view.k, view.k_strides, bb, t, h, 0), expected[b].k.data() + at,
                        static_cast<std::size_t>(o.head_dim) * es) != 0)
          ++mismatches;
        if (std::memcmp(elem(view, view.v, view.v_strides, bb, t, h, 0), expected[b].v.data() + at,
                        static_cast<std::size_t>(o.head_dim) * es) != 0)
          ++mismatches;
      }
    INFO("sequence " << b << " of length " << n);
    CHECK(mismatches == 0);
  }
}

}  // namespace

TEST_CASE("HostPagePool appends across pages and reads back through its view", "[pool]") {
  std::mt19937_64 rng = hattn_test::make_rng("pool/append");
  for (const KvLayout layout : {KvLayout::kNHD, KvLayout::kHND})
    for (const DType t : {DType::kBF16, DType::kF16, DType::kF32}) {
      INFO((layout == KvLayout::kNHD ? "NHD " : "HND ")
           << hattn::to_string(t) << "; " << hattn_test::seed_note());
      PagePoolOptions opt;
      opt.dtype = t;
      opt.num_kv_heads = 2;
      opt.head_dim = 64;
      opt.page_size = 16;
      opt.num_pages = 12;
      opt.layout = layout;
      HostPagePool pool(opt);
      CHECK(pool.free_pages() == 12);
      CHECK(pool.page_bytes() == 16u * 2 * 64 * hattn::size_of(t));
      const std::int64_t row = std::int64_t{opt.num_kv_heads} * opt.head_dim;

      std::vector<HostPagePool::SeqId> ids(3);
      for (auto& id : ids) REQUIRE(pool.create_sequence(&id) == kOk);
      CHECK(ids[0] != ids[1]);
      std::vector<Expected> expected(3);
      // Interleaved appends, so the sequences' pages interleave in the pool;
      // sizes cross page boundaries (5 + 20 = 25, + 11 = 36 = 2P + 4), land
      // exactly on one (16), and one append uses a padded source stride.
      const std::int64_t plan[][3] = {{0, 5, 0},        {1, 16, 0}, {0, 20, 0},      {2, 1, 0},
                                      {0, 11, row + 7}, {1, 0, 0},  {2, 33, row + 1}};
      for (const auto& step : plan) {
        const auto s = static_cast<std::size_t>(step[0]);
        const std::int64_t n = step[1], stride = step[2] == 0 ? row : step[2];
        const auto k = random_tokens(rng, t, n, stride), v = random_tokens(rng, t, n, stride);
        REQUIRE(pool.append(ids[s], n ? k.data() : nullptr, n ? v.data() : nullptr, n, step[2]) ==
                kOk);
        append_expected(expected[s], k, v, n, stride, row, t);
      }
      CHECK(pool.seq_len(ids[0]) == 36);
      CHECK(pool.seq_len(ids[1]) == 16);
      CHECK(pool.seq_len(ids[2]) == 34);
      CHECK(pool.free_pages() == 12 - (3 + 1 + 3));
      check_readback(pool, ids, expected);

      // The pool's view feeds the backend like any other (checked against
      // ref on one ISA: the decode sweeps cover the rest).
      hattn::PageTable table;
      REQUIRE(pool.build_page_table(ids, &table) == kOk);
      const hattn::PagedKvView view = pool.view(table);
      CHECK(table.last_page_len == std::vector<std::int32_t>{4, 16, 2});
      hattn::DecodeProblem p;
      p.batch_size = 3;
      p.num_kv_heads = 2;
      p.num_q_heads = 4;
      p.head_dim = 64;
      p.kv_dtype = t;
      std::vector<float> q(3 * 4 * 64);
      std::normal_distribution<float> normal(0.0f, 1.0f);
      for (float& x : q) x = normal(rng);
      const hattn::QueryView qv = hattn::make_query_view(q.data(), DType::kF32, 3, 4, 64);
      std::vector<float> o(q.size()), lse(12);
      const hattn::PartialView out =
          hattn::make_partial_view(o.data(), DType::kF32, lse.data(), 3, 4, 64);
      const hattn::cpu::DenseDecode backend;
      std::vector<std::byte> ws(hattn::cpu::DenseDecode::workspace_size(p));
      hattn::cpu::DecodePlan dplan;
      REQUIRE(backend.plan(p, view, ws.data(), ws.size(), &dplan) == kOk);
      REQUIRE(backend.run(dplan, qv, view, out, hattn_test::shared_executor()) == kOk);
      hattn::ref::Result r;
      REQUIRE(hattn::ref::decode(p, qv, view, &r) == kOk);
      CHECK(hattn_test::compare("o", std::vector<double>(o.begin(), o.end()), r.o,
                                hattn_test::kF32OutTolerance, "pool decode") == "");
    }
}

TEST_CASE("HostPagePool release returns pages for reuse", "[pool]") {
  std::mt19937_64 rng = hattn_test::make_rng("pool/release");
  PagePoolOptions opt;
  opt.dtype = DType::kF16;
  opt.num_kv_heads = 1;
  opt.head_dim = 128;
  opt.page_size = 7;
  opt.num_pages = 6;
  HostPagePool pool(opt);
  HostPagePool::SeqId a = -1, b = -1;
  REQUIRE(pool.create_sequence(&a) == kOk);
  REQUIRE(pool.create_sequence(&b) == kOk);
  const auto ka = random_tokens(rng, opt.dtype, 15, 128),
             va = random_tokens(rng, opt.dtype, 15, 128);
  REQUIRE(pool.append(a, ka.data(), va.data(), 15) == kOk);  // 3 pages
  CHECK(pool.free_pages() == 3);
  REQUIRE(pool.release(a) == kOk);
  CHECK(pool.free_pages() == 6);
  CHECK(pool.seq_len(a) == -1);
  CHECK(pool.release(a) == StatusCode::kInvalidArgument);  // already gone
  // All six pages can now go to b, and b reads back what it got.
  const auto kb = random_tokens(rng, opt.dtype, 42, 128),
             vb = random_tokens(rng, opt.dtype, 42, 128);
  REQUIRE(pool.append(b, kb.data(), vb.data(), 42) == kOk);
  CHECK(pool.free_pages() == 0);
  Expected e;
  append_expected(e, kb, vb, 42, 128, 128, opt.dtype);
  check_readback(pool, {b}, {e});
  // A released id may be handed out again, as a new empty sequence.
  REQUIRE(pool.release(b) == kOk);
  HostPagePool::SeqId c = -1;
  REQUIRE(pool.create_sequence(&c) == kOk);
  CHECK(pool.seq_len(c) == 0);
  CHECK(pool.free_pages() == 6);
}

TEST_CASE("HostPagePool append without enough pages is kOutOfMemory and changes nothing",
          "[pool]") {
  std::mt19937_64 rng = hattn_test::make_rng("pool/oom");
  PagePoolOptions opt;
  opt.dtype = DType::kBF16;
  opt.num_kv_heads = 2;
  opt.head_dim = 64;
  opt.page_size = 16;
  opt.num_pages = 4;
  opt.layout = KvLayout::kNHD;
  HostPagePool pool(opt);
  HostPagePool::SeqId a = -1, b = -1;
  REQUIRE(pool.create_sequence(&a) == kOk);
  REQUIRE(pool.create_sequence(&b) == kOk);
  const std::int64_t row = 128;
  Expected ea, eb;
  auto k = random_tokens(rng, opt.dtype, 40, row), v = random_tokens(rng, opt.dtype, 40, row);
  REQUIRE(pool.append(a, k.data(), v.data(), 40) == kOk);  // 3 pages, 8 free slots left
  append_expected(ea, k, v, 40, row, row, opt.dtype);
  CHECK(pool.free_pages() == 1);
  // 8 fit in a's last page, 16 more would take the last free page; 25 more
  // (8 + 17) need two: refused, nothing changes.
  k = random_tokens(rng, opt.dtype, 64, row);
  v = random_tokens(rng, opt.dtype, 64, row);
  for (const std::int64_t n : {std::int64_t{25}, std::int64_t{64}}) {
    INFO("append " << n << " tokens to a");
    CHECK(pool.append(a, k.data(), v.data(), n) == StatusCode::kOutOfMemory);
    CHECK(pool.seq_len(a) == 40);
    CHECK(pool.free_pages() == 1);
  }
  CHECK(pool.append(b, k.data(), v.data(), 17) == StatusCode::kOutOfMemory);
  CHECK(pool.seq_len(b) == 0);
  CHECK(pool.free_pages() == 1);
  check_readback(pool, {a, b}, {ea, eb});
  // What does fit, fits exactly.
  REQUIRE(pool.append(a, k.data(), v.data(), 24) == kOk);
  append_expected(ea, k, v, 24, row, row, opt.dtype);
  CHECK(pool.free_pages() == 0);
  CHECK(pool.append(a, k.data(), v.data(), 1) == StatusCode::kOutOfMemory);
  CHECK(pool.seq_len(a) == 64);
  check_readback(pool, {a, b}, {ea, eb});
}

TEST_CASE("HostPagePool rejects unknown sequences and bad arguments", "[pool][errors]") {
  PagePoolOptions opt;
  opt.dtype = DType::kF32;
  opt.num_kv_heads = 1;
  opt.head_dim = 64;
  opt.num_pages = 2;
  HostPagePool pool(opt);
  std::vector<float> k(64), v(64);
  hattn::PageTable table;
  for (const HostPagePool::SeqId id : {0, 1, 42, -1}) {
    INFO("sequence id " << id);
    CHECK(pool.seq_len(id) == -1);
    CHECK(pool.append(id, k.data(), v.data(), 1) == StatusCode::kInvalidArgument);
    CHECK(pool.release(id) == StatusCode::kInvalidArgument);
    const HostPagePool::SeqId ids[] = {id};
    CHECK(pool.build_page_table(ids, &table) == StatusCode::kInvalidArgument);
  }
  HostPagePool::SeqId s = -1;
  CHECK(pool.create_sequence(nullptr) == StatusCode::kInvalidArgument);
  REQUIRE(pool.create_sequence(&s) == kOk);
  CHECK(pool.append(s, k.data(), v.data(), -1) == StatusCode::kInvalidArgument);
  CHECK(pool.append(s, nullptr, v.data(), 1) == StatusCode::kInvalidArgument);
  CHECK(pool.append(s, k.data(), nullptr, 1) == StatusCode::kInvalidArgument);
  // Token strides: negative, or shorter than a token's num_kv_heads * head_dim.
  CHECK(pool.append(s, k.data(), v.data(), 1, -64) == StatusCode::kInvalidArgument);
  CHECK(pool.append(s, k.data(), v.data(), 1, 63) == StatusCode::kInvalidArgument);
  // A count near INT64_MAX is more than the pool holds, not an overflow.
  CHECK(pool.append(s, k.data(), v.data(), INT64_MAX - 3) == StatusCode::kOutOfMemory);
  CHECK(pool.append(s, k.data(), v.data(), INT64_MAX) == StatusCode::kOutOfMemory);
  CHECK(pool.seq_len(s) == 0);
  CHECK(pool.free_pages() == 2);
  REQUIRE(pool.append(s, k.data(), v.data(), 1, 64) == kOk);  // the smallest stride is fine
  CHECK(pool.append(s, k.data(), v.data(), INT64_MAX - 1) == StatusCode::kOutOfMemory);
  CHECK(pool.seq_len(s) == 1);
  CHECK(pool.free_pages() == 1);
  REQUIRE(pool.release(s) == kOk);
  REQUIRE(pool.create_sequence(&s) == kOk);
  const HostPagePool::SeqId ids[] = {s};
  CHECK(pool.build_page_table(ids, nullptr) == StatusCode::kInvalidArgument);
  // An empty sequence has an empty page table row.
  REQUIRE(pool.build_page_table(ids, &table) == kOk);
  CHECK(table.indptr == std::vector<std::int32_t>{0, 0});
  CHECK(pool.view(table).seq_len(0) == 0);

  PagePoolOptions bad = opt;
  bad.head_dim = 0;
  CHECK_THROWS_AS(HostPagePool(bad), std::invalid_argument);
  bad = opt;
  bad.page_size = 0;
  CHECK_THROWS_AS(HostPagePool(bad), std::invalid_argument);
  bad = opt;
  bad.num_pages = -1;
  CHECK_THROWS_AS(HostPagePool(bad), std::invalid_argument);
  // A size that wraps size_t (2^30-token pages of 64 x 128 bf16, 2^20 of
  // them: 2^64 bytes) is refused, not allocated as a sliver.
  bad.dtype = DType::kBF16;
  bad.num_kv_heads = 64;
  bad.head_dim = 128;
  bad.page_size = 1 << 30;
  bad.num_pages = 1 << 20;
  CHECK_THROWS_AS(HostPagePool(bad), std::length_error);
}

TEST_CASE("HostPagePool moves keep the sequences and memory", "[pool]") {
  std::mt19937_64 rng = hattn_test::make_rng("pool/move");
  PagePoolOptions opt;
  opt.dtype = DType::kBF16;
  opt.num_kv_heads = 2;
  opt.head_dim = 128;
  opt.page_size = 16;
  opt.num_pages = 3;
  HostPagePool pool(opt);
  HostPagePool::SeqId s = -1;
  REQUIRE(pool.create_sequence(&s) == kOk);
  const auto k = random_tokens(rng, opt.dtype, 20, 256), v = random_tokens(rng, opt.dtype, 20, 256);
  REQUIRE(pool.append(s, k.data(), v.data(), 20) == kOk);
  Expected e;
  append_expected(e, k, v, 20, 256, 256, opt.dtype);
  HostPagePool moved(std::move(pool));
  CHECK(moved.seq_len(s) == 20);
  CHECK(moved.free_pages() == 1);
  check_readback(moved, {s}, {e});
  HostPagePool assigned(opt);
  assigned = std::move(moved);
  check_readback(assigned, {s}, {e});
}
