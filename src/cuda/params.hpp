#pragma once
// What the host half of cuda::DenseDecode hands the kernels: one flat struct
// of views, strides and plan numbers, passed by value as a kernel parameter.
// Compiled by both g++ (dense_decode.cpp) and nvcc (the kernels).

#include <cuda_runtime_api.h>

#include <cstdint>

#include "hattn/core/dtype.hpp"
#include "hattn/cuda/detail/fast_divmod.hpp"

namespace hattn::cuda::detail {

struct DecodeParams {
  // KV: element offsets of token t of sequence b, head h:
  //   paged: page * outer + (t % page_size) * token + h * head, page = indices[indptr[b] + t / P]
  //   dense: b * outer + t * token + h * head
  const void* k = nullptr;
  const void* v = nullptr;
  std::int64_t k_outer = 0, k_token = 0, k_head = 0;
  std::int64_t v_outer = 0, v_token = 0, v_head = 0;
  bool paged = true;
  const std::int32_t* indptr = nullptr;
  const std::int32_t* indices = nullptr;
  const std::int32_t* last_page_len = nullptr;
  const std::int32_t* seq_lens = nullptr;
  std::int64_t num_pages = 0;
  std::int32_t page_size = 1;
  FastDivmod page_div{};
  std::int64_t max_seq_len = 0;  // dense capacity

  const void* q = nullptr;
  DType q_dtype = DType::kF32;
  std::int64_t q_stride_batch = 0, q_stride_head = 0;

  void* o = nullptr;
  DType o_dtype = DType::kF32;
  float* lse2 = nullptr;
  std::int64_t o_stride_batch = 0, o_stride_head = 0, lse_stride_batch = 0;

  float* partial_o = nullptr;    // [batch][chunk][q_head][head_dim]
  float* partial_lse = nullptr;  // [batch][chunk][q_head]
  std::uint32_t* error_flags = nullptr;

  std::int32_t batch = 0, q_heads = 0, kv_heads = 0, group = 0, head_dim = 0;
  std::int32_t heads_per_pass = 0, num_passes = 0, num_chunks = 0;
  std::int64_t chunk_tokens = 0;
  float q_scale = 0.0f;  // sm_scale * log2(e): scores come out in base 2
};

// Launches the decode kernel for one (KV dtype, head dim, group width,
// row alignment) over `num_ctas` CTAs; returns the launch's error.
using DecodeLaunchFn = cudaError_t (*)(const DecodeParams&, std::int64_t num_ctas, cudaStream_t);

// nullptr when the combination is not compiled. One per KV-dtype translation unit.
DecodeLaunchFn decode_launcher_bf16(int head_dim, int group_width, bool aligned) noexcept;
DecodeLaunchFn decode_launcher_f16(int head_dim, int group_width, bool aligned) noexcept;
DecodeLaunchFn decode_launcher_f32(int head_dim, int group_width, bool aligned) noexcept;

// Merges the num_chunks partials of every (sequence, query head) into o, lse2.
cudaError_t launch_merge_chunks(const DecodeParams& p, cudaStream_t stream) noexcept;

}  // namespace hattn::cuda::detail
