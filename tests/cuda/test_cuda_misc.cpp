// The rest of the GPU side: device merge vs host merge, a CPU partial merged
// with a GPU partial on the device, bad input -> Status, page-table errors the
// kernels record, empty batches, and the RAII owners.

#include <cuda_runtime_api.h>
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
#include "cuda/cuda_fixture.hpp"
#include "hattn/core/merge.hpp"
#include "hattn/cpu/dense_decode.hpp"
#include "hattn/cuda/buffer.hpp"
#include "hattn/cuda/dense_decode.hpp"
#include "hattn/cuda/merge.hpp"
#include "hattn/cuda/stream.hpp"
#include "hattn/ref/decode.hpp"

using hattn::DType;
using hattn::PartialView;
using hattn::StatusCode;
using hattn::cuda::DeviceBuffer;
using hattn_test::DecodeCase;
using hattn_test::DecodeInputs;
using hattn_test::DeviceInputs;
using hattn_test::DeviceOutput;
using hattn_test::OutputBuffer;

namespace {

constexpr StatusCode kOk = StatusCode::kSuccess;

DecodeCase small_case() {
  DecodeCase c;
  c.head_dim = 64;
  c.num_kv_heads = 2;
  c.group = 2;
  c.page_size = 16;
  c.lens = {20, 5};
  return c;
}

// Random partial of problem p's shape in `buf`: lse2 in [-20, 20] or -inf
// (every fifth row, its o left NaN), o normal.
void fill_partial(OutputBuffer& buf, std::mt19937_64& rng) {
  const PartialView v = buf.view();
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> lse(-20.0f, 20.0f);
  int row = 0;
  for (std::int32_t b = 0; b < v.batch_size; ++b)
    for (std::int32_t h = 0; h < v.num_heads; ++h, ++row) {
      const bool empty = row % 5 == 3;
      v.lse2[b * v.lse_stride_batch + h] = empty ? hattn::kNegInf : lse(rng);
      if (empty) continue;
      for (std::int32_t d = 0; d < v.head_dim; ++d)
        hattn::store_from_float(v.o, v.dtype, b * v.stride_batch + h * v.stride_head + d,
                                normal(rng));
    }
}

}  // namespace

TEST_CASE("cuda merge_partials matches the host merge", "[cuda][merge]") {
  std::mt19937_64 rng = hattn_test::make_rng("cuda-merge");
  std::size_t i = 0;
  for (const DType ta : {DType::kF32, DType::kBF16, DType::kF16})
    for (const DType to : {DType::kF32, DType::kBF16, DType::kF16})
      for (const bool alias : {false, true}) {
        hattn::DecodeProblem p;
        p.batch_size = 3;
        p.num_q_heads = 7;
        p.num_kv_heads = 7;
        p.head_dim = i % 2 ? 128 : 64;
        p.o_dtype = ta;
        OutputBuffer a(p, i % 2 == 0);
        p.o_dtype = alias ? ta : DType::kF16;
        OutputBuffer b(p, i % 3 == 0);
        p.o_dtype = alias ? ta : to;
        OutputBuffer host_out(p, true);
        fill_partial(a, rng);
        fill_partial(b, rng);
        // Host merge into host_out (or into a copy of a when aliasing).
        OutputBuffer expect(p, true);
        const PartialView target = alias ? a.view() : host_out.view();
        DeviceOutput da(a), db(b), dout(alias ? a : host_out);
        REQUIRE(hattn::merge_partials(a.view(), b.view(), target) == kOk);
        const std::vector<double> want_o = alias ? a.o() : host_out.o();
        const std::vector<double> want_lse = alias ? a.lse2() : host_out.lse2();
        const PartialView dev_out = alias ? da.view() : dout.view();
        REQUIRE(hattn::cuda::merge_partials(da.view(), db.view(), dev_out, {}) == kOk);
        REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
        OutputBuffer& got = alias ? a : host_out;
        if (alias)
          da.copy_back();
        else
          dout.copy_back();
        const std::string ctx = "merge#" + std::to_string(i);
        INFO(ctx << " a=" << hattn::to_string(ta) << " out=" << hattn::to_string(p.o_dtype)
                 << " alias=" << alias);
        CHECK(hattn_test::compare("o", got.o(), want_o, hattn_test::output_tolerance(p.o_dtype),
                                  ctx) == "");
        CHECK(hattn_test::compare("lse2", got.lse2(), want_lse, hattn_test::kLse2Tolerance, ctx) ==
              "");
        CHECK(got.check_untouched() == "");
        ++i;
      }
}

TEST_CASE("cuda merges a CPU partial with a GPU partial into the full attention", "[cuda][merge]") {
  // One dense sequence of n tokens: the first n1 attended on the CPU, the rest
  // on the GPU through a view starting at token n1; merged on the device.
  for (const std::int64_t n1 : {1L, 700L, 2500L}) {
    DecodeCase c;
    c.view = hattn_test::ViewKind::kDense;
    c.layout = hattn::KvLayout::kNHD;
    c.head_dim = 128;
    c.num_kv_heads = 2;
    c.group = 4;
    c.lens = {3001};
    std::mt19937_64 rng = hattn_test::make_rng("cuda-cpu-gpu-" + std::to_string(n1));
    const DecodeInputs in(c, rng);
    const hattn::DecodeProblem& p = in.problem();
    hattn::ref::Result ref;
    REQUIRE(hattn::ref::decode(p, in.query(), in.dense(), &ref) == kOk);

    // CPU: tokens [0, n1).
    const std::int32_t len1[1] = {static_cast<std::int32_t>(n1)};
    hattn::DenseKvView head = in.dense();
    head.seq_lens = len1;
    const hattn::cpu::DenseDecode cpu;
    std::vector<std::byte> cws(hattn::cpu::DenseDecode::workspace_size(p));
    hattn::cpu::DecodePlan cplan;
    OutputBuffer cpu_out(p, false);
    REQUIRE(cpu.plan(p, head, cws.data(), cws.size(), &cplan) == kOk);
    REQUIRE(cpu.run(cplan, in.query(), head, cpu_out.view(), hattn_test::shared_executor()) == kOk);

    // GPU: tokens [n1, n) through a view advanced by n1 tokens.
    const DeviceInputs dev(in);
    hattn::DenseKvView tail = dev.dense();
    const std::size_t es = hattn::size_of(tail.dtype);
    tail.k = static_cast<const std::byte*>(tail.k) + n1 * tail.k_strides.token * es;
    tail.v = static_cast<const std::byte*>(tail.v) + n1 * tail.v_strides.token * es;
    tail.max_seq_len -= n1;
    const std::int32_t len2 = static_cast<std::int32_t>(c.lens[0] - n1);
    DeviceBuffer dlen;
    hattn_test::upload(dlen, &len2, sizeof(len2));
    tail.seq_lens = dlen.as<const std::int32_t>();
    hattn::cuda::DenseDecode gpu;
    REQUIRE(hattn::cuda::DenseDecode::for_device(0, &gpu) == kOk);
    DeviceBuffer ws;
    REQUIRE(ws.allocate(hattn::cuda::DenseDecode::workspace_size(p)) == kOk);
    hattn::cuda::DecodePlan gplan;
    const std::int64_t host_len2[1] = {len2};
    REQUIRE(gpu.plan(p, host_len2, ws.data(), ws.size(), &gplan) == kOk);
    OutputBuffer gpu_out(p, false);
    DeviceOutput dgpu(gpu_out), dcpu(cpu_out);
    REQUIRE(gpu.run(gplan, dev.query(), tail, dgpu.view(), {}) == kOk);
    REQUIRE(hattn::cuda::merge_partials(dcpu.view(), dgpu.view(), dgpu.view(), {}) == kOk);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    dgpu.copy_back();
    const std::string ctx = "cpu+gpu n1=" + std::to_string(n1);
    CHECK(hattn_test::compare("o", gpu_out.o(), ref.o, hattn_test::kF32OutTolerance, ctx) == "");
    CHECK(hattn_test::compare("lse2", gpu_out.lse2(), ref.lse2, hattn_test::kLse2Tolerance, ctx) ==
          "");
  }
}

TEST_CASE("cuda decode: bad input returns a Status and writes nothing", "[cuda][errors]") {
  const DecodeCase c = small_case();
  std::mt19937_64 rng = hattn_test::make_rng("cuda-errors");
  const DecodeInputs in(c, rng);
  const DeviceInputs dev(in);
  const hattn::DecodeProblem& p = in.problem();
  const hattn::cuda::DenseDecode backend;
  DeviceBuffer ws;
  REQUIRE(ws.allocate(hattn::cuda::DenseDecode::workspace_size(p)) == kOk);
  REQUIRE(cudaMemset(ws.data(), 0, ws.size()) == cudaSuccess);
  hattn::cuda::DecodePlan plan;
  REQUIRE(backend.plan(p, c.lens, ws.data(), ws.size(), &plan) == kOk);
  OutputBuffer out(p, false);
  DeviceOutput dout(out);

  const auto fails = [&](const hattn::QueryView& q, const hattn::PagedKvView& kv,
                         const PartialView& o, const hattn::cuda::DecodePlan& pl,
                         StatusCode want) { CHECK(backend.run(pl, q, kv, o, {}) == want); };
  hattn::QueryView q = dev.query();
  hattn::PagedKvView kv = dev.paged();
  PartialView o = dout.view();
  fails(q, kv, o, hattn::cuda::DecodePlan{}, StatusCode::kInvalidArgument);  // not planned
  q.head_dim = 128;
  fails(q, kv, o, plan, StatusCode::kInvalidArgument);
  q = dev.query();
  q.data = nullptr;
  fails(q, kv, o, plan, StatusCode::kInvalidArgument);
  q = dev.query();
  kv.dtype = DType::kF16;
  fails(q, kv, o, plan, StatusCode::kInvalidArgument);
  kv = dev.paged();
  kv.indptr = nullptr;
  fails(q, kv, o, plan, StatusCode::kInvalidArgument);
  kv = dev.paged();
  kv.indices = nullptr;
  fails(q, kv, o, plan, StatusCode::kInvalidArgument);
  kv = dev.paged();
  kv.page_size = 0;
  fails(q, kv, o, plan, StatusCode::kInvalidArgument);
  kv = dev.paged();
  o.lse2 = nullptr;
  fails(q, kv, o, plan, StatusCode::kInvalidArgument);
  o = dout.view();
  o.num_heads = 3;
  fails(q, kv, o, plan, StatusCode::kInvalidArgument);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  dout.copy_back();
  CHECK(out.check_untouched() == "");
  for (const double x : out.o()) CHECK(std::isnan(x));  // still the poison: nothing ran

  // Device merge: shapes and pointers.
  PartialView a = dout.view(), b = dout.view();
  b.head_dim = 32;
  CHECK(hattn::cuda::merge_partials(a, b, a, {}) == StatusCode::kInvalidArgument);
  b = a;
  b.o = nullptr;
  CHECK(hattn::cuda::merge_partials(a, b, a, {}) == StatusCode::kInvalidArgument);
}

TEST_CASE("cuda decode: page-table errors on the device are skipped and reported",
          "[cuda][errors]") {
  const DecodeCase c = small_case();
  std::mt19937_64 rng = hattn_test::make_rng("cuda-device-errors");
  const DecodeInputs in(c, rng);
  const hattn::DecodeProblem& p = in.problem();
  const hattn::cuda::DenseDecode backend;
  DeviceBuffer ws;
  REQUIRE(ws.allocate(hattn::cuda::DenseDecode::workspace_size(p)) == kOk);
  REQUIRE(cudaMemset(ws.data(), 0, ws.size()) == cudaSuccess);
  hattn::cuda::DecodePlan plan;
  REQUIRE(backend.plan(p, c.lens, ws.data(), ws.size(), &plan) == kOk);

  struct Corruption {
    const char* what;
    int field;  // 0: indices, 1: last_page_len, 2: indptr
    std::int32_t value;
  };
  const Corruption corruptions[] = {{"page index past the pool", 0, 1 << 20},
                                    {"negative page index", 0, -1},
                                    {"last_page_len 0", 1, 0},
                                    {"last_page_len > page_size", 1, 17},
                                    {"decreasing indptr", 2, -100}};
  for (const Corruption& bad : corruptions) {
    INFO(bad.what);
    const DecodeInputs::Storage s = in.storage();
    std::vector<std::int32_t> indices(s.indices.begin(), s.indices.end());
    std::vector<std::int32_t> last(s.last_page_len.begin(), s.last_page_len.end());
    std::vector<std::int32_t> indptr(s.indptr.begin(), s.indptr.end());
    if (bad.field == 0) indices[0] = bad.value;
    if (bad.field == 1) last[0] = bad.value;
    if (bad.field == 2) indptr[1] = bad.value;
    const DeviceInputs dev(in);
    DeviceBuffer di, dl, dp;
    hattn_test::upload(di, indices.data(), indices.size() * sizeof(std::int32_t));
    hattn_test::upload(dl, last.data(), last.size() * sizeof(std::int32_t));
    hattn_test::upload(dp, indptr.data(), indptr.size() * sizeof(std::int32_t));
    hattn::PagedKvView kv = dev.paged();
    kv.indices = di.as<const std::int32_t>();
    kv.last_page_len = dl.as<const std::int32_t>();
    kv.indptr = dp.as<const std::int32_t>();
    OutputBuffer out(p, false);
    DeviceOutput dout(out);
    REQUIRE(backend.run(plan, dev.query(), kv, dout.view(), {}) == kOk);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);  // no fault
    CHECK(hattn::cuda::DenseDecode::device_errors(plan, {}) == StatusCode::kInvalidArgument);
    CHECK(hattn::cuda::DenseDecode::device_errors(plan, {}) == kOk);  // cleared
    dout.copy_back();
    for (const double x : out.o()) CHECK(!std::isnan(x));  // every element written
    CHECK(out.check_untouched() == "");
  }
}

TEST_CASE("cuda decode of an empty batch succeeds and launches nothing", "[cuda][empty]") {
  hattn::DecodeProblem p;
  p.batch_size = 0;
  p.num_q_heads = 8;
  p.num_kv_heads = 2;
  p.head_dim = 128;
  const hattn::cuda::DenseDecode backend;
  DeviceBuffer ws;
  REQUIRE(ws.allocate(hattn::cuda::DenseDecode::workspace_size(p)) == kOk);
  hattn::cuda::DecodePlan plan;
  REQUIRE(backend.plan(p, {}, ws.data(), ws.size(), &plan) == kOk);
  hattn::PagedKvView kv;
  int dummy = 0;
  kv.k = kv.v = &dummy;
  kv.num_kv_heads = 2;
  kv.head_dim = 128;
  kv.page_size = 16;
  const auto q = hattn::make_query_view(nullptr, DType::kF32, 0, 8, 128);
  const auto out = hattn::make_partial_view(nullptr, DType::kF32, nullptr, 0, 8, 128);
  CHECK(backend.run(plan, q, kv, out, {}) == kOk);
  CHECK(cudaDeviceSynchronize() == cudaSuccess);
}

TEST_CASE("cuda RAII owners: buffers, pinned fallback, streams and events", "[cuda][raii]") {
  DeviceBuffer a;
  REQUIRE(a.allocate(1 << 20) == kOk);
  void* p = a.data();
  DeviceBuffer b = std::move(a);
  CHECK(a.data() == nullptr);
  CHECK(b.data() == p);
  CHECK(b.size() == std::size_t{1} << 20);
  // An impossible allocation fails cleanly and leaves no sticky error.
  DeviceBuffer huge;
  CHECK(huge.allocate(std::size_t{1} << 62) == StatusCode::kOutOfMemory);
  CHECK(huge.data() == nullptr);
  CHECK(cudaGetLastError() == cudaSuccess);

  hattn::cuda::PinnedBuffer pin;
  REQUIRE(pin.allocate(4096) == kOk);
  CHECK(pin.pinned());  // a device is present: pinning works
  CHECK(pin.pin_status() == kOk);
  std::memset(pin.data(), 0x5a, 4096);

  hattn::cuda::Stream s;
  REQUIRE(s.create() == kOk);
  hattn::cuda::Event e0, e1;
  REQUIRE(e0.create(true) == kOk);
  REQUIRE(e1.create(true) == kOk);
  REQUIRE(e0.record(s) == kOk);
  REQUIRE(cudaMemcpyAsync(b.data(), pin.data(), 4096, cudaMemcpyHostToDevice, s.get()) ==
          cudaSuccess);
  REQUIRE(cudaMemcpyAsync(pin.data(), static_cast<std::byte*>(b.data()) + 4096, 4096,
                          cudaMemcpyDeviceToHost, s.get()) == cudaSuccess);
  REQUIRE(e1.record(s) == kOk);
  hattn::cuda::Stream other;
  REQUIRE(other.create() == kOk);
  REQUIRE(e1.wait(other) == kOk);
  REQUIRE(e1.synchronize() == kOk);
  CHECK(e1.done());
  float ms = -1.0f;
  REQUIRE(hattn::cuda::Event::elapsed_ms(e0, e1, &ms) == kOk);
  CHECK(ms >= 0.0f);
  CHECK(hattn::cuda::Event::elapsed_ms(e0, e1, nullptr) == StatusCode::kInvalidArgument);
  REQUIRE(other.synchronize() == kOk);
  hattn::cuda::Stream moved = std::move(s);
  CHECK(s.get() == nullptr);
  CHECK(moved.synchronize() == kOk);
}
