// cuda::DenseDecode against ref::decode over the CPU suite's sweep
// (tests/test_dense_decode.cpp): every dtype combination, every kernel
// (head dim x KV dtype x group), layouts, views, page sizes and padded
// strides, ragged batches, long split sequences, peaky scores, empty
// sequences, many heads, and random configurations. check_cuda_case runs each
// with three SM counts, so unsplit and split plans (and the chunk merge) see
// every case.

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
#include "cuda/cuda_fixture.hpp"
#include "hattn/cuda/plan.hpp"

using hattn::DType;
using hattn::KvLayout;
using hattn_test::check_cuda_case;
using hattn_test::DecodeCase;
using hattn_test::list_values;
using hattn_test::ViewKind;

namespace {

// Groups: every kernel width (1, 2, 4, 8), widths with masked heads (3, 5, 6),
// and several passes (12, 20).
const std::vector<int> kGroups = {1, 2, 3, 4, 5, 6, 8, 12, 20};
const std::vector<int> kPageSizes = {1, 7, 16};

std::string tag(const char* test, std::size_t i) {
  return std::string("cuda-") + test + "#" + std::to_string(i);
}

std::vector<std::int64_t> around_page(std::int64_t P, std::size_t r, std::int64_t longer) {
  std::vector<std::int64_t> v = {P - 1, P, P + 1, longer};
  std::rotate(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(r % v.size()), v.end());
  return v;
}

}  // namespace

TEST_CASE("cuda decode matches ref for every dtype combination", "[cuda][decode][dtype]") {
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
        check_cuda_case(dc, tag("dtypes", i));
      }
}

TEST_CASE("cuda decode matches ref for every kernel: head dim x KV dtype x width x alignment",
          "[cuda][decode][kernel]") {
  // Each compiled kernel: (KV dtype, head dim, group width) x (16-byte aligned
  // rows: packed; element-aligned rows: padded), the width reached through
  // groups that fill it and groups that leave heads masked.
  const auto kv_types = list_values<hattn::SupportedKvDTypes>();
  const auto dims = list_values<hattn::SupportedHeadDims>();
  const auto qo_types = list_values<hattn::SupportedQueryDTypes>();
  std::size_t i = 0;
  for (const int dim : dims)
    for (const DType kv : kv_types)
      for (const int group : {1, 2, 3, 4, 7, 8})
        for (const bool padded : {false, true}) {
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
          dc.padded = padded;
          const auto n = static_cast<std::int64_t>(i);
          dc.lens = {1, 17 + n, 700 + 13 * n};
          check_cuda_case(dc, tag("kernels", i));
          ++i;
        }
}

TEST_CASE("cuda decode matches ref for every layout, view, page size and stride",
          "[cuda][decode][layout]") {
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
        check_cuda_case(dc, tag("layouts", i));
      }
}

TEST_CASE("cuda decode matches ref for batches 1, 3 and 16 with ragged lengths",
          "[cuda][decode][batch]") {
  std::mt19937_64 rng = hattn_test::make_rng("cuda-batches");
  std::uniform_int_distribution<std::int64_t> len(2, 3000);
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
      if (batch >= 3) {
        dc.lens[1] = 0;
        dc.lens[static_cast<std::size_t>(batch) - 1] = 1;
      }
      check_cuda_case(dc, tag("batch", i));
      ++i;
    }
}

TEST_CASE("cuda decode matches ref for long sequences split into KV chunks",
          "[cuda][decode][long]") {
  std::vector<DecodeCase> cases(5);
  cases[0].kv = DType::kBF16;
  cases[0].head_dim = 128;
  cases[0].group = 4;
  cases[0].num_kv_heads = 2;
  cases[0].lens = {4097, 1000, 17};
  cases[1].kv = DType::kF16;
  cases[1].q = DType::kBF16;
  cases[1].o = DType::kF16;
  cases[1].head_dim = 256;
  cases[1].group = 20;
  cases[1].num_kv_heads = 1;
  cases[1].view = ViewKind::kDense;
  cases[1].layout = KvLayout::kHND;
  cases[1].lens = {4097};
  cases[2].kv = DType::kBF16;
  cases[2].o = DType::kBF16;
  cases[2].head_dim = 128;
  cases[2].group = 8;
  cases[2].num_kv_heads = 1;
  cases[2].layout = KvLayout::kHND;
  cases[2].lens = {33000};
  cases[3].kv = DType::kF32;
  cases[3].q = DType::kF16;
  cases[3].head_dim = 64;
  cases[3].group = 4;
  cases[3].num_kv_heads = 2;
  cases[3].view = ViewKind::kDense;
  cases[3].padded = true;
  cases[3].q_scale = 8.0f;
  cases[3].lens = {33000, 0};
  cases[4].kv = DType::kF16;
  cases[4].o = DType::kF16;
  cases[4].head_dim = 256;
  cases[4].group = 1;
  cases[4].num_kv_heads = 2;
  cases[4].page_size = 1;
  cases[4].padded = true;
  cases[4].lens = {4097, 33000};
  for (std::size_t i = 0; i < cases.size(); ++i) check_cuda_case(cases[i], tag("long", i));
}

TEST_CASE("cuda decode matches ref with peaky scores and a custom sm_scale",
          "[cuda][decode][scale]") {
  struct Variant {
    float q_scale;
    std::optional<float> sm_scale;
  };
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
    dc.lens = {3000, 1, dc.page_size + 1L};
    check_cuda_case(dc, tag("scale", i));
    ++i;
  }
}

TEST_CASE("cuda decode gives o = 0 and lse2 = -inf for zero-length sequences",
          "[cuda][decode][empty]") {
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
      check_cuda_case(dc, tag("empty", i++));
      dc.lens = {0, 0, 0};
      check_cuda_case(dc, tag("empty", i++));
    }
}

TEST_CASE("cuda decode handles many KV heads and groups over several passes",
          "[cuda][decode][heads]") {
  struct Shape {
    int group, kv_heads;
  };
  const Shape shapes[] = {{1, 70}, {3, 25}, {2, 40}, {5, 13}, {16, 5}, {17, 2}, {33, 1}};
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
    check_cuda_case(dc, tag("heads", i++));
  }
}

TEST_CASE("cuda decode matches ref on random configurations", "[cuda][decode][random]") {
  std::mt19937_64 rng = hattn_test::make_rng("cuda-random-configs");
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
                                    : uniform(1, 5000));
    }
    if (uniform(0, 4) == 0) dc.q_scale = 8.0f;
    if (uniform(0, 4) == 0) dc.sm_scale = std::uniform_real_distribution<float>(-0.5f, 0.5f)(rng);
    check_cuda_case(dc, tag("random", i));
  }
}
