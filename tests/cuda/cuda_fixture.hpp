#pragma once
// Mirrors the CPU tests' inputs and outputs (tests/common/decode_fixture) on
// the device, and checks cuda::DenseDecode against ref::decode with the same
// tolerance table, NaN-poisoned outputs and guard bytes.

#include <cstdint>
#include <string>
#include <vector>

#include "common/decode_fixture.hpp"
#include "hattn/core/kv_view.hpp"
#include "hattn/core/problem.hpp"
#include "hattn/cuda/buffer.hpp"

namespace hattn_test {

// Device copies of a DecodeInputs' memory and views over them.
class DeviceInputs {
 public:
  explicit DeviceInputs(const DecodeInputs& in);

  const hattn::QueryView& query() const { return query_; }
  const hattn::PagedKvView& paged() const { return paged_; }
  const hattn::DenseKvView& dense() const { return dense_; }

 private:
  hattn::cuda::DeviceBuffer q_, k_, v_, indptr_, indices_, last_page_len_, seq_lens_;
  hattn::QueryView query_{};
  hattn::PagedKvView paged_{};
  hattn::DenseKvView dense_{};
};

// A device copy of an OutputBuffer's memory (poison, padding and guards
// included) and the view over it; copy_back() brings it home for checking.
class DeviceOutput {
 public:
  explicit DeviceOutput(OutputBuffer& host);
  const hattn::PartialView& view() const { return view_; }
  void copy_back();

 private:
  OutputBuffer* host_;
  hattn::cuda::DeviceBuffer o_, lse_;
  hattn::PartialView view_{};
};

// Copies host bytes to a new device buffer (REQUIREs success).
void upload(hattn::cuda::DeviceBuffer& dst, const void* src, std::size_t bytes);

// Builds the case's inputs from make_rng(tag), runs ref::decode once and
// cuda::DenseDecode with several SM counts (so the same case runs unsplit,
// split as on this device, and split as far as the plan allows), checking
// every element, the guards, empty sequences, and that the kernels recorded
// no page-table error.
void check_cuda_case(const DecodeCase& c, const std::string& tag);

}  // namespace hattn_test
