// Bitwise determinism: the work decomposition depends only on the lengths and
// chunk partials merge in a fixed order, so any thread count (and a borrowed
// arena) gives the same bits.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstring>
#include <new>
#include <stdexcept>
#include <vector>

#include "common/catch_print.hpp"
#include "common/decode_fixture.hpp"
#include "common/seed.hpp"
#include "hattn/cpu/dense_decode.hpp"

using hattn::StatusCode;
using hattn_test::DecodeCase;
using hattn_test::DecodeInputs;
using hattn_test::OutputBuffer;

namespace {

template <class Kv>
std::vector<std::byte> run_once(const hattn::cpu::DenseDecode& backend,
                                const hattn::cpu::DecodePlan& plan, const DecodeInputs& in,
                                const Kv& kv, const hattn::CpuExecutor& executor, bool padded) {
  OutputBuffer out(in.problem(), padded);
  REQUIRE(backend.run(plan, in.query(), kv, out.view(), executor) == StatusCode::kSuccess);
  const std::string guard = out.check_untouched();
  CHECK(guard == "");
  return out.bits();
}

template <class Kv>
void check_deterministic(const DecodeCase& c, const DecodeInputs& in, const Kv& kv) {
  const hattn::DecodeProblem& p = in.problem();
  tbb::task_arena user_arena(2);
  const hattn::CpuExecutor one(1), two(2), borrowed(user_arena), all;
  REQUIRE(one.concurrency() == 1);
  REQUIRE(two.concurrency() == 2);
  REQUIRE(&borrowed.arena() == &user_arena);
  std::vector<hattn::cpu::DenseDecode> backends;
  for (const hattn::CpuIsa isa : hattn_test::available_isas()) {
    backends.emplace_back(isa);
    const hattn::cpu::DenseDecode bf16dot(isa, hattn::cpu::DenseDecode::Precision::kBf16Products);
    if (bf16dot.uses_bf16_products(c.kv)) backends.push_back(bf16dot);
  }
  for (const hattn::cpu::DenseDecode& backend : backends) {
    INFO("isa=" << hattn::to_string(backend.isa())
                << (backend.uses_bf16_products(c.kv) ? "+bf16-products" : "") << "; "
                << c.describe() << "; " << hattn_test::seed_note());
    std::vector<std::byte> ws(hattn::cpu::DenseDecode::workspace_size(p));
    hattn::cpu::DecodePlan plan;
    REQUIRE(backend.plan(p, kv, ws.data(), ws.size(), &plan) == StatusCode::kSuccess);
    INFO("plan: " << plan.num_items << " items, " << plan.num_merges << " merges, chunk "
                  << plan.chunk_tokens);
    REQUIRE(plan.num_merges > 0);  // the long sequence was split: merge order matters

    const std::vector<std::byte> first = run_once(backend, plan, in, kv, one, c.padded);
    const auto same = [&](const std::vector<std::byte>& other) {
      return other.size() == first.size() &&
             std::memcmp(other.data(), first.data(), first.size()) == 0;
    };
    const std::vector<std::byte> on_two = run_once(backend, plan, in, kv, two, c.padded);
    CHECK(same(on_two));
    const std::vector<std::byte> on_borrowed = run_once(backend, plan, in, kv, borrowed, c.padded);
    CHECK(same(on_borrowed));
    const std::vector<std::byte> on_all = run_once(backend, plan, in, kv, all, c.padded);
    CHECK(same(on_all));
    // Again on the same executor: no state carried between runs.
    const std::vector<std::byte> again = run_once(backend, plan, in, kv, two, c.padded);
    CHECK(same(again));
    // A second plan in another workspace gives the same decomposition.
    std::vector<std::byte> ws2(ws.size() + 3);
    hattn::cpu::DecodePlan plan2;
    REQUIRE(backend.plan(p, kv, ws2.data() + 3, ws.size(), &plan2) == StatusCode::kSuccess);
    CHECK(plan2.num_items == plan.num_items);
    CHECK(plan2.num_merges == plan.num_merges);
    const std::vector<std::byte> replanned = run_once(backend, plan2, in, kv, two, c.padded);
    CHECK(same(replanned));
  }
}

}  // namespace

TEST_CASE("decode is bitwise identical on 1, 2 and all threads and a borrowed arena",
          "[decode][determinism]") {
  DecodeCase c;
  c.kv = hattn::DType::kBF16;
  c.o = hattn::DType::kF32;
  c.head_dim = 128;
  c.num_kv_heads = 2;
  c.group = 4;
  c.lens = {9000, 3001, 0, 700};
  SECTION("paged") {
    c.view = hattn_test::ViewKind::kPaged;
    std::mt19937_64 rng = hattn_test::make_rng("determinism/paged");
    const DecodeInputs in(c, rng);
    check_deterministic(c, in, in.paged());
  }
  SECTION("paged, 64-token HND pages (one KV head per page at a time)") {
    c.view = hattn_test::ViewKind::kPaged;
    c.page_size = 64;
    c.layout = hattn::KvLayout::kHND;
    std::mt19937_64 rng = hattn_test::make_rng("determinism/paged64");
    const DecodeInputs in(c, rng);
    check_deterministic(c, in, in.paged());
  }
  SECTION("dense, padded, f16 output") {
    c.view = hattn_test::ViewKind::kDense;
    c.padded = true;
    c.kv = hattn::DType::kF16;
    c.o = hattn::DType::kF16;
    c.group = 20;
    std::mt19937_64 rng = hattn_test::make_rng("determinism/dense");
    const DecodeInputs in(c, rng);
    check_deterministic(c, in, in.dense());
  }
}

TEST_CASE("CpuExecutor runs every item once; try_parallel_for turns an exception into a Status",
          "[executor][errors]") {
  for (const int threads : {1, 2, 4}) {
    INFO(threads << " threads");
    const hattn::CpuExecutor ex(threads);
    std::vector<int> seen(1000, 0);
    REQUIRE(ex.try_parallel_for(1000, [&](std::int64_t i) { ++seen[i]; }).is_ok());
    CHECK(std::count(seen.begin(), seen.end(), 1) == 1000);
    CHECK(
        ex.try_parallel_for(0, [](std::int64_t) { throw std::runtime_error("none run"); }).is_ok());
    CHECK(ex.try_parallel_for(100, [](std::int64_t i) {
              if (i == 37) throw std::bad_alloc();
            }).code() == hattn::StatusCode::kOutOfMemory);
    CHECK(ex.try_parallel_for(100, [](std::int64_t i) {
              if (i == 99) throw std::runtime_error("item 99");
            }).code() == hattn::StatusCode::kInternal);
    // The executor still works after a failed call.
    std::fill(seen.begin(), seen.end(), 0);
    REQUIRE(ex.try_parallel_for(1000, [&](std::int64_t i) { ++seen[i]; }).is_ok());
    CHECK(std::count(seen.begin(), seen.end(), 1) == 1000);
  }
}
