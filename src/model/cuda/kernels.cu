// Elementwise and row kernels of the CUDA model: embedding gather, RMSNorm,
// RoPE + q/k/v split, SwiGLU, casts, paged KV append and synthetic KV fill.
// All arithmetic is f32 (RoPE angles f64), as in LlamaModel on the CPU.

#include <cuda_runtime.h>

#include <cstdint>
#include <tuple>
#include <type_traits>

#include "cuda/device_common.cuh"
#include "model/cuda/kernels.hpp"

namespace hattn::model::detail {
namespace {

using cuda::detail::load_as_f32;
using cuda::detail::store_from_f32;

constexpr int kThreads = 256;
constexpr std::int64_t kMaxBlocks = 65535;

unsigned int blocks_for(std::int64_t n) {
  std::int64_t b = (n + kThreads - 1) / kThreads;
  if (b < 1) b = 1;
  if (b > kMaxBlocks) b = kMaxBlocks;
  return static_cast<unsigned int>(b);
}

// Converts the arguments to the kernel's parameter types (so a size or
// signedness mismatch cannot garble the argument buffer) and returns the
// launch's own status, not an unrelated pending error.
template <class... P, class... A>
cudaError_t launch(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t smem,
                   cudaStream_t stream, A... args) {
  static_assert(sizeof...(P) == sizeof...(A), "argument count");
  std::tuple<std::decay_t<P>...> params(static_cast<std::decay_t<P>>(args)...);
  void* ptrs[sizeof...(P)];
  std::apply(
      [&ptrs](auto&... p) {
        int i = 0;
        ((ptrs[i++] = static_cast<void*>(&p)), ...);
      },
      params);
  const cudaError_t e =
      cudaLaunchKernel(reinterpret_cast<const void*>(kernel), grid, block, ptrs, smem, stream);
  if (e != cudaSuccess) (void)cudaGetLastError();
  return e;
}

__global__ void embed_kernel(const std::int32_t* tokens, const void* table, DType table_dtype,
                             std::int32_t vocab, std::int64_t hidden, float* x,
                             std::uint32_t* error_word) {
  const std::int64_t t = blockIdx.x;
  const std::int32_t id = tokens[t];
  float* row = x + t * hidden;
  if (id < 0 || id >= vocab) {
    if (threadIdx.x == 0) atomicOr(error_word, kErrorTokenId);
    for (std::int64_t i = threadIdx.x; i < hidden; i += blockDim.x) row[i] = 0.0f;
    return;
  }
  const std::int64_t base = static_cast<std::int64_t>(id) * hidden;
  for (std::int64_t i = threadIdx.x; i < hidden; i += blockDim.x)
    row[i] = load_as_f32(table, table_dtype, base + i);
}

__device__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  return total;
}

__global__ void __launch_bounds__(kThreads)
    rms_norm_kernel(const float* x, std::int64_t n, const float* w, float eps, void* y,
                    DType y_dtype) {
  const std::int64_t r = blockIdx.x;
  const float* xr = x + r * n;
  float ss = 0.0f;
  for (std::int64_t i = threadIdx.x; i < n; i += kThreads) ss += xr[i] * xr[i];
  ss = block_sum(ss);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(n) + eps);
  for (std::int64_t i = threadIdx.x; i < n; i += kThreads)
    store_from_f32(y, y_dtype, r * n + i, w[i] * (xr[i] * inv));
}

__global__ void rope_split_kernel(const float* qkv, const std::int64_t* positions,
                                  const double* inv_freq, std::int32_t hq, std::int32_t hkv,
                                  std::int32_t d, float* q, void* k, void* v, DType kv_dtype) {
  extern __shared__ float cs[];  // cos [d / 2], then sin [d / 2]
  const std::int64_t t = blockIdx.x;
  const std::int32_t half = d / 2;
  const double pos = static_cast<double>(positions[t]);
  for (std::int32_t i = threadIdx.x; i < half; i += blockDim.x) {
    double s = 0.0, c = 0.0;
    sincos(pos * inv_freq[i], &s, &c);
    cs[i] = static_cast<float>(c);
    cs[half + i] = static_cast<float>(s);
  }
  __syncthreads();
  const std::int64_t row = static_cast<std::int64_t>(hq + 2 * hkv) * d;
  const float* src = qkv + t * row;
  // q heads, then k heads, are contiguous in the row: rotate both.
  const std::int32_t pairs = (hq + hkv) * half;
  for (std::int32_t p = threadIdx.x; p < pairs; p += blockDim.x) {
    const std::int32_t h = p / half, i = p % half;
    const float a = src[h * d + i], b = src[h * d + i + half];
    const float c = cs[i], s = cs[half + i];
    const float lo = a * c - b * s, hi = b * c + a * s;
    if (h < hq) {
      float* dst = q + (t * hq + h) * d;
      dst[i] = lo;
      dst[i + half] = hi;
    } else {
      const std::int64_t off = (t * hkv + (h - hq)) * d;
      store_from_f32(k, kv_dtype, off + i, lo);
      store_from_f32(k, kv_dtype, off + i + half, hi);
    }
  }
  const float* vs = src + static_cast<std::int64_t>(hq + hkv) * d;
  for (std::int32_t j = threadIdx.x; j < hkv * d; j += blockDim.x)
    store_from_f32(v, kv_dtype, t * hkv * d + j, vs[j]);
}

__global__ void silu_mul_kernel(const float* gu, std::int64_t num_tokens, std::int64_t inter,
                                void* act, DType act_dtype) {
  const std::int64_t n = num_tokens * inter;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t t = i / inter, j = i % inter;
    const float g = gu[t * 2 * inter + j], u = gu[t * 2 * inter + inter + j];
    store_from_f32(act, act_dtype, i, g / (1.0f + expf(-g)) * u);
  }
}

__global__ void cast_kernel(const float* x, std::int64_t n, void* y, DType y_dtype) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    store_from_f32(y, y_dtype, i, x[i]);
}

template <class Word>
__global__ void append_paged_kernel(const Word* k, const Word* v, std::int64_t num_tokens,
                                    const std::int64_t* slots, std::int32_t hkv, std::int32_t d,
                                    std::int32_t page_size, Word* k_pages, Word* v_pages) {
  const std::int64_t per_token = static_cast<std::int64_t>(hkv) * d;
  const std::int64_t n = num_tokens * per_token;
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t t = i / per_token, r = i % per_token;
    const std::int64_t h = r / d, e = r % d;
    const std::int64_t slot = slots[t];
    const std::int64_t page = slot / page_size, off = slot % page_size;
    const std::int64_t dst = (page * hkv + h) * page_size * d + off * d + e;
    k_pages[dst] = k[i];
    v_pages[dst] = v[i];
  }
}

__device__ std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

__device__ float uniform_pm1(std::uint64_t h) {
  return static_cast<float>(h >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

__global__ void fill_uniform_paged_kernel(void* k_pages, void* v_pages, DType kv_dtype,
                                          std::int64_t first_page, std::int64_t begin,
                                          std::int64_t count, std::int32_t hkv, std::int32_t d,
                                          std::int32_t page_size, std::uint64_t seed) {
  const std::int64_t per_token = static_cast<std::int64_t>(hkv) * d;
  const std::int64_t n = count * per_token;
  const std::uint64_t k_seed = splitmix64(seed), v_seed = splitmix64(seed ^ 0x5851F42D4C957F2DULL);
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t pos = begin + i / per_token, r = i % per_token;
    const std::int64_t h = r / d, e = r % d;
    const std::int64_t page = first_page + pos / page_size, off = pos % page_size;
    const std::int64_t dst = (page * hkv + h) * page_size * d + off * d + e;
    const auto key = static_cast<std::uint64_t>(pos * per_token + r);
    store_from_f32(k_pages, kv_dtype, dst, uniform_pm1(splitmix64(k_seed + key)));
    store_from_f32(v_pages, kv_dtype, dst, uniform_pm1(splitmix64(v_seed + key)));
  }
}

}  // namespace

cudaError_t launch_embed(const std::int32_t* tokens, std::int64_t num_tokens, const void* table,
                         DType table_dtype, std::int32_t vocab, std::int64_t hidden, float* x,
                         std::uint32_t* error_word, cudaStream_t stream) {
  if (num_tokens <= 0) return cudaSuccess;
  return launch(&embed_kernel, dim3(static_cast<unsigned int>(num_tokens)), dim3(kThreads), 0,
                stream, tokens, table, table_dtype, vocab, hidden, x, error_word);
}

cudaError_t launch_rms_norm(const float* x, std::int64_t rows, std::int64_t n, const float* w,
                            float eps, void* y, DType y_dtype, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  return launch(&rms_norm_kernel, dim3(static_cast<unsigned int>(rows)), dim3(kThreads), 0, stream,
                x, n, w, eps, y, y_dtype);
}

cudaError_t launch_rope_split(const float* qkv, std::int64_t num_tokens,
                              const std::int64_t* positions, const double* inv_freq,
                              std::int32_t num_q_heads, std::int32_t num_kv_heads,
                              std::int32_t head_dim, float* q, void* k, void* v, DType kv_dtype,
                              cudaStream_t stream) {
  if (num_tokens <= 0) return cudaSuccess;
  return launch(&rope_split_kernel, dim3(static_cast<unsigned int>(num_tokens)), dim3(kThreads),
                static_cast<std::size_t>(head_dim) * sizeof(float), stream, qkv, positions,
                inv_freq, num_q_heads, num_kv_heads, head_dim, q, k, v, kv_dtype);
}

cudaError_t launch_silu_mul(const float* gu, std::int64_t num_tokens, std::int64_t inter, void* act,
                            DType act_dtype, cudaStream_t stream) {
  if (num_tokens <= 0) return cudaSuccess;
  return launch(&silu_mul_kernel, dim3(blocks_for(num_tokens * inter)), dim3(kThreads), 0, stream,
                gu, num_tokens, inter, act, act_dtype);
}

cudaError_t launch_cast(const float* x, std::int64_t n, void* y, DType y_dtype,
                        cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  return launch(&cast_kernel, dim3(blocks_for(n)), dim3(kThreads), 0, stream, x, n, y, y_dtype);
}

cudaError_t launch_append_paged(const void* k, const void* v, std::int64_t num_tokens,
                                const std::int64_t* slots, std::int32_t num_kv_heads,
                                std::int32_t head_dim, std::int32_t page_size, void* k_pages,
                                void* v_pages, DType kv_dtype, cudaStream_t stream) {
  if (num_tokens <= 0) return cudaSuccess;
  const dim3 grid(blocks_for(num_tokens * num_kv_heads * head_dim));
  if (kv_dtype == DType::kF32)
    return launch(&append_paged_kernel<std::uint32_t>, grid, dim3(kThreads), 0, stream,
                  static_cast<const std::uint32_t*>(k), static_cast<const std::uint32_t*>(v),
                  num_tokens, slots, num_kv_heads, head_dim, page_size,
                  static_cast<std::uint32_t*>(k_pages), static_cast<std::uint32_t*>(v_pages));
  return launch(&append_paged_kernel<std::uint16_t>, grid, dim3(kThreads), 0, stream,
                static_cast<const std::uint16_t*>(k), static_cast<const std::uint16_t*>(v),
                num_tokens, slots, num_kv_heads, head_dim, page_size,
                static_cast<std::uint16_t*>(k_pages), static_cast<std::uint16_t*>(v_pages));
}

cudaError_t launch_fill_uniform_paged(void* k_pages, void* v_pages, DType kv_dtype,
                                      std::int64_t first_page, std::int64_t begin,
                                      std::int64_t count, std::int32_t num_kv_heads,
                                      std::int32_t head_dim, std::int32_t page_size,
                                      std::uint64_t seed, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  return launch(&fill_uniform_paged_kernel, dim3(blocks_for(count * num_kv_heads * head_dim)),
                dim3(kThreads), 0, stream, k_pages, v_pages, kv_dtype, first_page, begin, count,
                num_kv_heads, head_dim, page_size, seed);
}

}  // namespace hattn::model::detail
