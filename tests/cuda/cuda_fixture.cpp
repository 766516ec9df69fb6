#include "cuda/cuda_fixture.hpp"

#include <cuda_runtime_api.h>
#include <catch2/catch.hpp>

#include <cmath>
#include <cstddef>
#include <limits>

#include "common/catch_print.hpp"
#include "common/check.hpp"
#include "common/seed.hpp"
#include "hattn/cuda/dense_decode.hpp"
#include "hattn/ref/decode.hpp"

namespace hattn_test {

namespace {

// Where host pointer p (inside [base, base + bytes)) lands in the device copy.
template <class T>
T* rebase(T* p, const void* host_base, std::size_t bytes, void* device_base) {
  if (p == nullptr) return nullptr;
  const auto off = reinterpret_cast<const std::byte*>(p) - static_cast<const std::byte*>(host_base);
  REQUIRE(off >= 0);
  REQUIRE(static_cast<std::size_t>(off) <= bytes);
  return reinterpret_cast<T*>(static_cast<std::byte*>(device_base) + off);
}

template <class T>
bool inside(const void* p, std::span<T> s) {
  const auto* b = reinterpret_cast<const std::byte*>(s.data());
  const auto* x = static_cast<const std::byte*>(p);
  return !s.empty() && x >= b && x < b + s.size_bytes();
}

}  // namespace

void upload(hattn::cuda::DeviceBuffer& dst, const void* src, std::size_t bytes) {
  REQUIRE(dst.allocate(bytes) == hattn::StatusCode::kSuccess);
  if (bytes > 0) REQUIRE(cudaMemcpy(dst.data(), src, bytes, cudaMemcpyHostToDevice) == cudaSuccess);
}

DeviceInputs::DeviceInputs(const DecodeInputs& in) {
  const DecodeInputs::Storage s = in.storage();
  upload(q_, s.q.data(), s.q.size_bytes());
  upload(k_, s.k.data(), s.k.size_bytes());
  upload(v_, s.v.data(), s.v.size_bytes());
  upload(indptr_, s.indptr.data(), s.indptr.size_bytes());
  upload(indices_, s.indices.data(), s.indices.size_bytes());
  upload(last_page_len_, s.last_page_len.data(), s.last_page_len.size_bytes());
  upload(seq_lens_, s.seq_lens.data(), s.seq_lens.size_bytes());

  query_ = in.query();
  query_.data = rebase(query_.data, s.q.data(), s.q.size_bytes(), q_.data());
  auto kv_ptr = [&](const void* p) -> const void* {
    if (p == nullptr) return nullptr;
    if (inside(p, s.k)) return rebase(p, s.k.data(), s.k.size_bytes(), k_.data());
    REQUIRE(inside(p, s.v));
    return rebase(p, s.v.data(), s.v.size_bytes(), v_.data());
  };
  paged_ = in.paged();
  paged_.k = kv_ptr(paged_.k);
  paged_.v = kv_ptr(paged_.v);
  paged_.indptr = indptr_.as<const std::int32_t>();
  paged_.indices = indices_.as<const std::int32_t>();
  paged_.last_page_len = last_page_len_.as<const std::int32_t>();
  dense_ = in.dense();
  dense_.k = kv_ptr(dense_.k);
  dense_.v = kv_ptr(dense_.v);
  dense_.seq_lens = seq_lens_.as<const std::int32_t>();
}

DeviceOutput::DeviceOutput(OutputBuffer& host) : host_(&host) {
  upload(o_, host.o_memory().data(), host.o_memory().size());
  upload(lse_, host.lse_memory().data(), host.lse_memory().size());
  view_ = host.view();
  view_.o = o_.data();
  view_.lse2 = lse_.as<float>();
}

void DeviceOutput::copy_back() {
  REQUIRE(cudaMemcpy(host_->o_memory().data(), o_.data(), o_.size(), cudaMemcpyDeviceToHost) ==
          cudaSuccess);
  REQUIRE(cudaMemcpy(host_->lse_memory().data(), lse_.data(), lse_.size(),
                     cudaMemcpyDeviceToHost) == cudaSuccess);
}

void check_cuda_case(const DecodeCase& c, const std::string& tag) {
  std::mt19937_64 rng = make_rng(tag);
  const DecodeInputs in(c, rng);
  const hattn::DecodeProblem& p = in.problem();
  const std::string desc = c.describe();
  INFO(tag << ": " << desc << "; " << seed_note());

  hattn::ref::Result ref;
  if (c.view == ViewKind::kPaged)
    REQUIRE(hattn::ref::decode(p, in.query(), in.paged(), &ref) == hattn::StatusCode::kSuccess);
  else
    REQUIRE(hattn::ref::decode(p, in.query(), in.dense(), &ref) == hattn::StatusCode::kSuccess);

  const DeviceInputs dev(in);
  REQUIRE(hattn::cuda::DenseDecode::can_implement(p) == hattn::StatusCode::kSuccess);
  hattn::cuda::DeviceBuffer ws;
  REQUIRE(ws.allocate(hattn::cuda::DenseDecode::workspace_size(p)) == hattn::StatusCode::kSuccess);
  REQUIRE(cudaMemset(ws.data(), 0, ws.size()) == cudaSuccess);

  const std::int64_t H = p.num_q_heads, D = p.head_dim;
  const auto o_index = [&](std::size_t i) {
    const auto n = static_cast<std::int64_t>(i);
    return "o[b=" + std::to_string(n / (H * D)) + "][h=" + std::to_string(n / D % H) +
           "][d=" + std::to_string(n % D) + "]";
  };
  const auto lse_index = [&](std::size_t i) {
    const auto n = static_cast<std::int64_t>(i);
    return "lse2[b=" + std::to_string(n / H) + "][h=" + std::to_string(n % H) + "]";
  };
  const double kappa = std::abs(static_cast<double>(p.scale())) * c.q_scale * std::sqrt(D);

  hattn::cuda::DenseDecode device_backend;
  REQUIRE(hattn::cuda::DenseDecode::for_device(0, &device_backend) == hattn::StatusCode::kSuccess);
  for (const std::int32_t sms : {1, device_backend.sm_count(), 100000}) {
    const hattn::cuda::DenseDecode backend(sms);
    hattn::cuda::DecodePlan plan;
    REQUIRE(backend.plan(p, c.lens, ws.data(), ws.size(), &plan) == hattn::StatusCode::kSuccess);
    const std::string context = tag + ": " + desc + " sms=" + std::to_string(sms) +
                                " chunks=" + std::to_string(plan.num_chunks) +
                                " passes=" + std::to_string(plan.num_passes);
    INFO(context);
    OutputBuffer out(p, c.padded);
    DeviceOutput dout(out);
    if (c.view == ViewKind::kPaged)
      REQUIRE(backend.run(plan, dev.query(), dev.paged(), dout.view(), {}) ==
              hattn::StatusCode::kSuccess);
    else
      REQUIRE(backend.run(plan, dev.query(), dev.dense(), dout.view(), {}) ==
              hattn::StatusCode::kSuccess);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    CHECK(hattn::cuda::DenseDecode::device_errors(plan, {}) == hattn::StatusCode::kSuccess);
    dout.copy_back();

    const std::vector<double> o = out.o(), lse = out.lse2();
    const std::string o_err =
        compare("o", o, ref.o, scale_for_scores(output_tolerance(c.o), kappa), context, o_index);
    CHECK(o_err == "");
    const std::string lse_err =
        compare("lse2", lse, ref.lse2, scale_for_scores(kLse2Tolerance, kappa), context, lse_index);
    CHECK(lse_err == "");
    const std::string guard_err = out.check_untouched();
    CHECK(guard_err == "");
    for (std::size_t b = 0; b < c.lens.size(); ++b) {
      if (c.lens[b] != 0) continue;
      bool exact = true;
      for (std::int64_t i = 0; i < H * D; ++i)
        exact =
            exact && o[b * static_cast<std::size_t>(H * D) + static_cast<std::size_t>(i)] == 0.0;
      for (std::int64_t h = 0; h < H; ++h)
        exact = exact && lse[b * static_cast<std::size_t>(H) + static_cast<std::size_t>(h)] ==
                             -std::numeric_limits<double>::infinity();
      INFO("empty sequence b=" << b);
      CHECK(exact);
    }
  }
}

}  // namespace hattn_test
