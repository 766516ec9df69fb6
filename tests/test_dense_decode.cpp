// DenseDecode against ref::decode (double). The axes are kv length, batch,
// GQA group, head dim, the three dtypes, layout, page size, strides, view and
// ISA. Rather than their cartesian product (tens of thousands of runs), each
// TEST_CASE below crosses the pairs that matter for one part of the backend
// and rotates the other axes, so every value of every axis appears; every
// case runs on every ISA the host has (check_decode_case loops over them), and
// the long lengths (4097, 33000) appear in a few small-batch cases only.
// On CPUs with AVX512_BF16, every case with bf16 KV also runs the opt-in
// bf16-product kernel (DenseDecode::Precision::kBf16Products).

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstddef>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "common/catch_print.hpp"
#include "common/decode_fixture.hpp"
#include "common/lists.hpp"
#include "common/seed.hpp"
#include "hattn/cpu/dense_decode.hpp"

using hattn::DType;
using hattn::KvLayout;
using hattn_test::check_decode_case;
using hattn_test::DecodeCase;
using hattn_test::list_values;
using hattn_test::ViewKind;

namespace {

// GQA groups: 1 (MHA), typical 4 and 8, exactly one pass of
// kMaxGroupPerPass = 16, and 20 (a full pass plus a partial one).
const std::vector<int> kGroups = {1, 4, 8, hattn::kMaxGroupPerPass, 20};
// Page sizes: single-token pages, an odd size, the usual 16.
const std::vector<int> kPageSizes = {1, 7, 16};

std::string tag(const char* test, std::size_t i) {
  return std::string(test) + "#" + std::to_string(i);
}

// Sequence lengths around a page boundary for page size P, rotated by r so
// each position of the batch sees each length.
std::vector<std::int64_t> around_page(std::int64_t P, std::size_t r, std::int64_t longer) {
  std::vector<std::int64_t> v = {P - 1, P, P + 1, longer};
  std::rotate(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(r % v.size()), v.end());
  return v;
}

}  // namespace

TEST_CASE("decode matches ref for every dtype combination", "[decode][dtype]") {
  // All 27 (KV, query, output) dtype combinations; head dim chosen so each
  // dtype of each role meets each head dim.
  const auto kv_types = list_values<hattn::SupportedKvDTypes>();
  const auto q_types = list_values<hattn::SupportedQueryDTypes>();
  const auto o_types = list_values<hattn::SupportedOutDTypes>();
  const auto dims = list_values<hattn::SupportedHeadDims>();
  std::size_t i = 0;
  for (std::size_t a = 0; a < kv_types.size(); ++a)
    for (std::size_t b = 0; b < q_types.size(); ++b)
      for (std::size_t c = 0; c < o_types.size(); ++c, ++i) {
        DecodeCase dc;
        dc.kv = kv_types[a];
        dc.q = q_types[b];
        dc.o = o_types[c];
        dc.head_dim = dims[(a + b + c) % dims.size()];
        dc.group = kGroups[i % kGroups.size()];
        dc.num_kv_heads = 2;
        dc.layout = i % 2 ? KvLayout::kHND : KvLayout::kNHD;
        dc.view = i % 3 == 2 ? ViewKind::kDense : ViewKind::kPaged;
        dc.page_size = kPageSizes[(i / 2) % kPageSizes.size()];
        dc.padded = (i / 3) % 2 == 1;
        dc.lens = around_page(dc.page_size, i, 1000);
        check_decode_case(dc, tag("dtypes", i));
      }
}

TEST_CASE("decode matches ref for every kernel: head dim x KV dtype x group", "[decode][kernel]") {
  // A kernel is (ISA, head dim, KV dtype); the group decides its head tiling
  // and passes. Crossed fully (ISAs inside check_decode_case); lengths vary so
  // the tails modulo the SIMD width (8, 16) and the 256-row calls differ.
  const auto kv_types = list_values<hattn::SupportedKvDTypes>();
  const auto dims = list_values<hattn::SupportedHeadDims>();
  const auto qo_types = list_values<hattn::SupportedQueryDTypes>();
  std::size_t i = 0;
  for (const int dim : dims)
    for (const DType kv : kv_types)
      for (const int group : kGroups) {
        DecodeCase dc;
        dc.kv = kv;
        dc.head_dim = dim;
        dc.group = group;
        dc.q = qo_types[i % qo_types.size()];
        dc.o = qo_types[(i / 3 + 1) % qo_types.size()];
        dc.num_kv_heads = 1 + static_cast<int>(i % 2);
        dc.layout = (i / 2) % 2 ? KvLayout::kHND : KvLayout::kNHD;
        dc.view = i % 4 == 3 ? ViewKind::kDense : ViewKind::kPaged;
        dc.page_size = 16;
        dc.padded = i % 3 == 1;
        const auto n = static_cast<std::int64_t>(i);
        dc.lens = {1, 17 + n, 700 + 13 * n};
        check_decode_case(dc, tag("kernels", i));
        ++i;
      }
}

TEST_CASE("decode matches ref for every layout, view, page size and stride", "[decode][layout]") {
  // Layout x (paged with each page size, or dense) x (packed, or K and V
  // interleaved in one padded pool with padded q/o strides), each with
  // lengths 0, 1, P-1, P, P+1, 2P+1 and a longer one in one batch.
  const auto dtypes = list_values<hattn::SupportedKvDTypes>();
  const auto dims = list_values<hattn::SupportedHeadDims>();
  std::size_t i = 0;
  for (const KvLayout layout : {KvLayout::kNHD, KvLayout::kHND})
    for (const bool padded : {false, true})
      for (std::size_t v = 0; v <= kPageSizes.size(); ++v, ++i) {
        DecodeCase dc;
        dc.layout = layout;
        dc.padded = padded;
        dc.view = v < kPageSizes.size() ? ViewKind::kPaged : ViewKind::kDense;
        dc.page_size = v < kPageSizes.size() ? kPageSizes[v] : 16;
        dc.kv = dtypes[i % 3];
        dc.q = dtypes[(i + 1) % 3];
        dc.o = dtypes[(i / 3 + 2) % 3];
        dc.head_dim = dims[(i / 2) % 3];
        dc.group = kGroups[i % kGroups.size()];
        dc.num_kv_heads = 2;
        const std::int64_t P = dc.page_size;
        dc.lens = {0, 1, P - 1, P, P + 1, 2 * P + 1, 333};
        check_decode_case(dc, tag("layouts", i));
      }
}

TEST_CASE("decode matches ref for batches 1, 3 and 16 with ragged lengths", "[decode][batch]") {
  std::mt19937_64 rng = hattn_test::make_rng("batches");
  std::uniform_int_distribution<std::int64_t> len(2, 700);
  std::size_t i = 0;
  for (const int batch : {1, 3, 16})
    for (const ViewKind view : {ViewKind::kPaged, ViewKind::kDense}) {
      DecodeCase dc;
      dc.view = view;
      dc.kv = i % 2 ? DType::kF16 : DType::kBF16;
      dc.q = i % 3 ? DType::kBF16 : DType::kF32;
      dc.o = i % 2 ? DType::kBF16 : DType::kF32;
      dc.head_dim = i % 3 == 2 ? 64 : 128;
      dc.group = kGroups[(i + 1) % kGroups.size()];
      dc.num_kv_heads = i % 2 ? 2 : 4;
      dc.layout = i % 2 ? KvLayout::kNHD : KvLayout::kHND;
      dc.page_size = kPageSizes[i % kPageSizes.size()];
      dc.padded = i >= 3;
      for (int b = 0; b < batch; ++b) dc.lens.push_back(len(rng));
      if (batch >= 3) {  // an empty and a one-token sequence among the others
        dc.lens[1] = 0;
        dc.lens[static_cast<std::size_t>(batch) - 1] = 1;
      }
      check_decode_case(dc, tag("batch", i));
      ++i;
    }
}

TEST_CASE("decode matches ref for long sequences split into KV chunks", "[decode][long]") {
  std::vector<DecodeCase> cases(5);
  // 4097: a few 512-token chunks per sequence, merged; beside short ones.
  cases[0].kv = DType::kBF16;
  cases[0].head_dim = 128;
  cases[0].group = 4;
  cases[0].num_kv_heads = 2;
  cases[0].lens = {4097, 1000, 17};
  // 4097 with a group of 20 (two passes per chunk) and f16 everywhere.
  cases[1].kv = DType::kF16;
  cases[1].q = DType::kBF16;
  cases[1].o = DType::kF16;
  cases[1].head_dim = 256;
  cases[1].group = 20;
  cases[1].num_kv_heads = 1;
  cases[1].view = ViewKind::kDense;
  cases[1].layout = KvLayout::kHND;
  cases[1].lens = {4097};
  // 33000: about 65 chunks of one sequence.
  cases[2].kv = DType::kBF16;
  cases[2].o = DType::kBF16;
  cases[2].head_dim = 128;
  cases[2].group = 8;
  cases[2].num_kv_heads = 1;
  cases[2].layout = KvLayout::kHND;
  cases[2].lens = {33000};
  // 33000 dense, interleaved and padded, peaky scores, f32 KV, beside an
  // empty sequence.
  cases[3].kv = DType::kF32;
  cases[3].q = DType::kF16;
  cases[3].head_dim = 64;
  cases[3].group = 4;
  cases[3].num_kv_heads = 2;
  cases[3].view = ViewKind::kDense;
  cases[3].padded = true;
  cases[3].q_scale = 8.0f;
  cases[3].lens = {33000, 0};
  // 33000 single-token pages (a page table of 37000 entries), MHA, beside a
  // 4097 one.
  cases[4].kv = DType::kF16;
  cases[4].o = DType::kF16;
  cases[4].head_dim = 256;
  cases[4].group = 1;
  cases[4].num_kv_heads = 2;
  cases[4].page_size = 1;
  cases[4].padded = true;
  cases[4].lens = {4097, 33000};
  for (std::size_t i = 0; i < cases.size(); ++i) check_decode_case(cases[i], tag("long", i));
}

TEST_CASE("decode matches ref with peaky scores and a custom sm_scale", "[decode][scale]") {
  // q scaled x8: scores ~8x larger, so a few keys dominate the softmax and
  // the online max rescaling matters. sm_scale: a few explicit values,
  // including one far from 1/sqrt(D).
  struct Variant {
    float q_scale;
    std::optional<float> sm_scale;
  };
  // sm_scale = 0: every score 0, o is the plain mean of V.
  const Variant variants[] = {{8.0f, std::nullopt}, {1.0f, 0.3f},    {1.0f, 1.0f}, {8.0f, 0.02f},
                              {4.0f, 0.5f},         {1.0f, -0.125f}, {1.0f, 0.0f}};
  const auto dtypes = list_values<hattn::SupportedKvDTypes>();
  const auto dims = list_values<hattn::SupportedHeadDims>();
  std::size_t i = 0;
  for (const Variant& v : variants) {
    DecodeCase dc;
    dc.q_scale = v.q_scale;
    dc.sm_scale = v.sm_scale;
    dc.kv = dtypes[i % 3];
    dc.q = dtypes[(i + 2) % 3];
    dc.o = dtypes[(i + 1) % 3];
    dc.head_dim = dims[i % 3];
    dc.group = kGroups[(i + 2) % kGroups.size()];
    dc.num_kv_heads = 2;
    dc.layout = i % 2 ? KvLayout::kHND : KvLayout::kNHD;
    dc.view = i % 3 == 1 ? ViewKind::kDense : ViewKind::kPaged;
    dc.page_size = kPageSizes[i % 3];
    dc.lens = {1000, 1, dc.page_size + 1L};
    check_decode_case(dc, tag("scale", i));
    ++i;
  }
}

TEST_CASE("decode gives o = 0 and lse2 = -inf for zero-length sequences", "[decode][empty]") {
  // check_decode_case checks empty sequences exactly (o == 0, lse2 == -inf).
  std::size_t i = 0;
  for (const ViewKind view : {ViewKind::kPaged, ViewKind::kDense})
    for (const bool padded : {false, true}) {
      DecodeCase dc;
      dc.view = view;
      dc.padded = padded;
      dc.kv = padded ? DType::kF16 : DType::kBF16;
      dc.o = padded ? DType::kBF16 : DType::kF32;
      dc.head_dim = 64;
      dc.lens = {0, 5, 0, 1000, 0};
      check_decode_case(dc, tag("empty", i++));
      dc.lens = {0, 0, 0};  // nothing at all to attend to
      check_decode_case(dc, tag("empty", i++));
    }
}

TEST_CASE("decode handles groups over several passes of kMaxGroupPerPass", "[decode][group]") {
  std::size_t i = 0;
  for (const int group : {2, 15, 17, 32, 33}) {
    DecodeCase dc;
    dc.group = group;
    dc.num_kv_heads = 1 + static_cast<int>(i % 2);
    dc.head_dim = 64;
    dc.kv = i % 2 ? DType::kF16 : DType::kBF16;
    dc.layout = i % 2 ? KvLayout::kHND : KvLayout::kNHD;
    dc.lens = {40, 600};
    check_decode_case(dc, tag("group", i++));
  }
}

TEST_CASE("decode matches ref on random configurations", "[decode][random]") {
  // Beyond the designed sweeps: configurations drawn from the run's seed,
  // every axis at random, so successive runs visit more of the product.
  std::mt19937_64 rng = hattn_test::make_rng("random-configs");
  const auto kv_types = list_values<hattn::SupportedKvDTypes>();
  const auto q_types = list_values<hattn::SupportedQueryDTypes>();
  const auto o_types = list_values<hattn::SupportedOutDTypes>();
  const auto dims = list_values<hattn::SupportedHeadDims>();
  const std::vector<int> groups = {1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 17, 20, 24, 32};
  const std::vector<int> pages = {1, 2, 3, 5, 7, 8, 16, 31, 32, 64};
  const auto pick = [&](const auto& v) {
    return v[std::uniform_int_distribution<std::size_t>(0, v.size() - 1)(rng)];
  };
  const auto uniform = [&](std::int64_t lo, std::int64_t hi) {
    return std::uniform_int_distribution<std::int64_t>(lo, hi)(rng);
  };
  for (std::size_t i = 0; i < 24; ++i) {
    DecodeCase dc;
    dc.kv = pick(kv_types);
    dc.q = pick(q_types);
    dc.o = pick(o_types);
    dc.head_dim = pick(dims);
    dc.group = pick(groups);
    dc.num_kv_heads = static_cast<int>(uniform(1, std::max(1, 48 / dc.group)));
    dc.layout = uniform(0, 1) ? KvLayout::kHND : KvLayout::kNHD;
    dc.view = uniform(0, 3) == 0 ? ViewKind::kDense : ViewKind::kPaged;
    dc.page_size = pick(pages);
    dc.padded = uniform(0, 1) == 1;
    const std::int64_t batch = uniform(1, 8);
    for (std::int64_t b = 0; b < batch; ++b) {
      const std::int64_t kind = uniform(0, 9);
      const std::int64_t P = dc.page_size;
      dc.lens.push_back(kind == 0   ? 0
                        : kind <= 2 ? std::max<std::int64_t>(1, P * uniform(1, 4) + uniform(-1, 1))
                                    : uniform(1, 1500));
    }
    if (uniform(0, 4) == 0) dc.q_scale = 8.0f;
    if (uniform(0, 4) == 0) dc.sm_scale = std::uniform_real_distribution<float>(-0.5f, 0.5f)(rng);
    check_decode_case(dc, tag("random", i));
  }
}

TEST_CASE("decode handles many KV heads, attended several per pass", "[decode][heads]") {
  // The backend attends several KV heads per pass over a chunk (as many
  // groups as fit in its pass size); head counts that need several passes,
  // with a partial last one, and MHA with many heads.
  struct Shape {
    int group, kv_heads;
  };
  const Shape shapes[] = {{1, 70}, {3, 25}, {2, 40}, {5, 13}, {16, 5}};
  std::size_t i = 0;
  for (const Shape& s : shapes) {
    DecodeCase dc;
    dc.group = s.group;
    dc.num_kv_heads = s.kv_heads;
    dc.head_dim = i % 2 ? 128 : 64;
    dc.kv = i % 2 ? DType::kBF16 : DType::kF16;
    dc.layout = i % 2 ? KvLayout::kNHD : KvLayout::kHND;
    dc.padded = i % 2 == 0;
    dc.view = i == 3 ? ViewKind::kDense : ViewKind::kPaged;
    dc.lens = {300, 0, 1, 2000};
    check_decode_case(dc, tag("heads", i++));
  }
}

TEST_CASE("decode of an empty batch succeeds and writes nothing", "[decode][empty]") {
  hattn::DecodeProblem p;
  p.batch_size = 0;
  p.num_q_heads = 8;
  p.num_kv_heads = 2;
  p.head_dim = 128;
  const float kv_storage[1] = {0.0f};
  const std::int32_t indptr[1] = {0}, last[1] = {1}, lens[1] = {0};
  hattn::PagedKvView paged;
  paged.k = paged.v = kv_storage;
  paged.num_kv_heads = 2;
  paged.head_dim = 128;
  paged.page_size = 16;
  paged.indptr = indptr;
  paged.last_page_len = last;
  hattn::DenseKvView dense;
  dense.k = dense.v = kv_storage;
  dense.num_kv_heads = 2;
  dense.head_dim = 128;
  dense.seq_lens = lens;
  const hattn::QueryView q = hattn::make_query_view(nullptr, DType::kF32, 0, 8, 128);
  const hattn::PartialView out = hattn::make_partial_view(nullptr, DType::kF32, nullptr, 0, 8, 128);
  for (const hattn::CpuIsa isa : hattn_test::available_isas()) {
    const hattn::cpu::DenseDecode backend(isa);
    std::vector<std::byte> ws(hattn::cpu::DenseDecode::workspace_size(p));
    hattn::cpu::DecodePlan plan;
    REQUIRE(backend.plan(p, paged, ws.data(), ws.size(), &plan) == hattn::StatusCode::kSuccess);
    CHECK(plan.num_items == 0);
    CHECK(backend.run(plan, q, paged, out, hattn_test::shared_executor()) ==
          hattn::StatusCode::kSuccess);
    REQUIRE(backend.plan(p, dense, ws.data(), ws.size(), &plan) == hattn::StatusCode::kSuccess);
    CHECK(backend.run(plan, q, dense, out, hattn_test::shared_executor()) ==
          hattn::StatusCode::kSuccess);
  }
}

TEST_CASE("decode matches ref when the kernel walks a whole page per KV head", "[decode][visit]") {
  // HND pages whose size is a multiple of 16 that divides a kernel call (32 ..
  // 256 tokens), and dense views with contiguous rows, are walked one KV head
  // at a time per page (64 rows for dense views); 48-token pages and NHD
  // pages fall back to one 16-row block of every head at a time. Lengths
  // cross pages, kernel calls (256 rows) and chunks (512 rows at least).
  struct Visit {
    ViewKind view;
    KvLayout layout;
    int page;
  };
  const std::vector<Visit> visits = {
      {ViewKind::kPaged, KvLayout::kHND, 32},  {ViewKind::kPaged, KvLayout::kHND, 64},
      {ViewKind::kPaged, KvLayout::kHND, 128}, {ViewKind::kPaged, KvLayout::kHND, 256},
      {ViewKind::kPaged, KvLayout::kHND, 48},  {ViewKind::kPaged, KvLayout::kNHD, 64},
      {ViewKind::kDense, KvLayout::kHND, 16},  {ViewKind::kDense, KvLayout::kNHD, 16}};
  const auto kv_types = list_values<hattn::SupportedKvDTypes>();
  std::size_t i = 0;
  for (const Visit& v : visits) {
    DecodeCase dc;
    dc.view = v.view;
    dc.layout = v.layout;
    dc.page_size = v.page;
    dc.kv = kv_types[i % kv_types.size()];
    dc.head_dim = i % 2 ? 64 : 128;
    dc.group = i % 3 == 0 ? 4 : 8;
    dc.num_kv_heads = 3;
    const std::int64_t P = v.page;
    dc.lens = {2 * P + 5, 1300, 0, P - 1, 8 * P + 17};
    check_decode_case(dc, tag("visit", i++));
  }
}
