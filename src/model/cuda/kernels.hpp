#pragma once
// Kernels of CudaLlamaModel and CudaDenseDecoder (kernels.cu). Each launcher
// enqueues on `stream` and returns the launch's own status.

#include <cuda_runtime_api.h>

#include <cstdint>

#include "hattn/core/dtype.hpp"
#include "hattn/core/status.hpp"

namespace hattn::model::detail {

// A failed CUDA call named by `what` (a literal), kOutOfMemory for an
// allocation; the CUDA error is cleared so a later, unrelated check does not
// report it again.
inline Status cuda_check(cudaError_t e, const char* what) noexcept {
  if (e == cudaSuccess) return Status::ok();
  (void)cudaGetLastError();
  if (e == cudaErrorMemoryAllocation) return {StatusCode::kOutOfMemory, what};
  return {StatusCode::kCudaError, what};
}

// Bit set in the model's error word by embed for an id outside [0, vocab).
inline constexpr std::uint32_t kErrorTokenId = 1u << 0;

// x[t][:] = table[tokens[t]][:] widened to f32 (a zero row and kErrorTokenId
// for a bad id).
cudaError_t launch_embed(const std::int32_t* tokens, std::int64_t num_tokens, const void* table,
                         DType table_dtype, std::int32_t vocab, std::int64_t hidden, float* x,
                         std::uint32_t* error_word, cudaStream_t stream);

// y[r][i] = w[i] * (x[r][i] / sqrt(mean(x[r]^2) + eps)), stored in y_dtype.
cudaError_t launch_rms_norm(const float* x, std::int64_t rows, std::int64_t n, const float* w,
                            float eps, void* y, DType y_dtype, cudaStream_t stream);

// From qkv f32 [T][(Hq + 2 Hkv) D]: q f32 [T][Hq][D] and k [T][Hkv][D] with
// RoPE at positions[t] (HF rotate-half; angles in f64 from f64 inv_freq, as
// LlamaModel::apply_rope), v copied; k, v stored in kv_dtype.
cudaError_t launch_rope_split(const float* qkv, std::int64_t num_tokens,
                              const std::int64_t* positions, const double* inv_freq,
                              std::int32_t num_q_heads, std::int32_t num_kv_heads,
                              std::int32_t head_dim, float* q, void* k, void* v, DType kv_dtype,
                              cudaStream_t stream);

// act[t][j] = silu(gu[t][j]) * gu[t][inter + j], stored in act_dtype.
cudaError_t launch_silu_mul(const float* gu, std::int64_t num_tokens, std::int64_t inter, void* act,
                            DType act_dtype, cudaStream_t stream);

// y[i] = x[i] stored in y_dtype.
cudaError_t launch_cast(const float* x, std::int64_t n, void* y, DType y_dtype,
                        cudaStream_t stream);

// Copies packed k, v [T][Hkv][D] (kv_dtype) to HND pages [page][Hkv][P][D]:
// token t goes to global slot slots[t] = page * P + offset.
cudaError_t launch_append_paged(const void* k, const void* v, std::int64_t num_tokens,
                                const std::int64_t* slots, std::int32_t num_kv_heads,
                                std::int32_t head_dim, std::int32_t page_size, void* k_pages,
                                void* v_pages, DType kv_dtype, cudaStream_t stream);

// Fills tokens [begin, begin + count) of the sequence whose pages start at
// `first_page` (contiguous pages) with values uniform in [-1, 1), a hash of
// (seed, tensor, token, head, dim).
cudaError_t launch_fill_uniform_paged(void* k_pages, void* v_pages, DType kv_dtype,
                                      std::int64_t first_page, std::int64_t begin,
                                      std::int64_t count, std::int32_t num_kv_heads,
                                      std::int32_t head_dim, std::int32_t page_size,
                                      std::uint64_t seed, cudaStream_t stream);

}  // namespace hattn::model::detail
