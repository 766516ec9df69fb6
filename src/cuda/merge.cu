// Merge kernels: the n-way merge of a split sequence's chunk partials (after
// the decode kernel), and the public pairwise merge of two partials (one warp
// per (sequence, query head) row). Lanes stride over head_dim, so loads and
// stores of a row are coalesced.

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/device_common.cuh"
#include "cuda/params.hpp"
#include "hattn/core/dispatch.hpp"
#include "hattn/core/supported.hpp"
#include "hattn/cuda/detail/merge_math.hpp"
#include "hattn/cuda/merge.hpp"
#include "hattn/cuda/plan.hpp"

namespace hattn::cuda {
namespace detail {
namespace {

constexpr int kWarpsPerCta = kThreadsPerCta / 32;

// One CTA per (sequence, query head) row, thread t owning elements t, t + 128,
// ... of head_dim. Chunks go in batches of 32: each thread loads its elements
// of all 32 before using any, then adds them in chunk order, as the CPU merge
// does (bitwise the same order as one chunk at a time). A sequence split in 64
// chunks with a warp per row and 8 chunks per batch still spent 22 us of a
// 90 us step here (kv:32768 bs:1 on an H100: 8 CTAs, a chain of L2 round
// trips); docs/gpu-results.md.
template <int D>
__global__ void __launch_bounds__(kThreadsPerCta) merge_chunks_kernel(const DecodeParams p) {
  constexpr int kPer = (D + kThreadsPerCta - 1) / kThreadsPerCta;
  constexpr int kBatch = 32;  // chunks per batch: one per lane for the weights
  const int tid = threadIdx.x, lane = tid % 32;
  const std::int64_t row = blockIdx.x;
  if (row >= std::int64_t{p.batch} * p.q_heads) return;  // the whole CTA leaves
  const int b = static_cast<int>(row / p.q_heads), h = static_cast<int>(row % p.q_heads);
  const int C = p.num_chunks;
  const float* lse = p.partial_lse + std::int64_t{b} * C * p.q_heads + h;  // chunk c: lse[c * H]

  float mx = -INFINITY;
  for (int c = lane; c < C; c += 32) mx = fmaxf(mx, lse[std::int64_t{c} * p.q_heads]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));

  const float* o_row = p.partial_o + (std::int64_t{b} * C * p.q_heads + h) * D;
  const std::int64_t o_chunk = std::int64_t{p.q_heads} * D;  // floats between chunks
  float acc[kPer] = {};
  float sum = 0.0f;
  for (int c0 = 0; c0 < C; c0 += kBatch) {
    const int n = min(kBatch, C - c0);
    const float my_w = lane < n ? chunk_weight(lse[std::int64_t{c0 + lane} * p.q_heads], mx) : 0.0f;
    float ov[kBatch][kPer];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      // Past the last chunk: chunk C - 1 again, never used (weight 0). Every
      // chunk's partial is written by the decode kernel (an empty one as o = 0,
      // lse2 = -inf), so no load reads uninitialized memory.
      const std::int64_t c = c0 + min(i, n - 1);
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const int d = tid + kThreadsPerCta * j;
        ov[i][j] = d < D ? o_row[c * o_chunk + d] : 0.0f;
      }
    }
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      const float w = __shfl_sync(0xffffffffu, my_w, i);  // 0 for i >= n
      if (w == 0.0f) continue;
      sum += w;
#pragma unroll
      for (int j = 0; j < kPer; ++j) acc[j] = fmaf(w, ov[i][j], acc[j]);
    }
  }
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
  const std::int64_t at = std::int64_t{b} * p.o_stride_batch + std::int64_t{h} * p.o_stride_head;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int d = tid + kThreadsPerCta * j;
    if (d < D) store_from_f32(p.o, p.o_dtype, at + d, acc[j] * inv);
  }
  if (tid == 0) p.lse2[std::int64_t{b} * p.lse_stride_batch + h] = merged_lse(mx, sum);
}

__global__ void __launch_bounds__(kThreadsPerCta)
    merge_pair_kernel(const PartialView a, const PartialView b, const PartialView out) {
  const int lane = threadIdx.x % 32;
  const std::int64_t row = std::int64_t{blockIdx.x} * kWarpsPerCta + threadIdx.x / 32;
  if (row >= std::int64_t{a.batch_size} * a.num_heads) return;
  const std::int64_t bi = row / a.num_heads, h = row % a.num_heads;
  const MergeWeightsF w =
      merge_weights2(a.lse2[bi * a.lse_stride_batch + h], b.lse2[bi * b.lse_stride_batch + h]);
  const std::int64_t oa = bi * a.stride_batch + h * a.stride_head;
  const std::int64_t ob = bi * b.stride_batch + h * b.stride_head;
  const std::int64_t oo = bi * out.stride_batch + h * out.stride_head;
  for (int d = lane; d < a.head_dim; d += 32) {
    const float xa = w.wa != 0.0f ? load_as_f32(a.o, a.dtype, oa + d) : 0.0f;
    const float xb = w.wb != 0.0f ? load_as_f32(b.o, b.dtype, ob + d) : 0.0f;
    store_from_f32(out.o, out.dtype, oo + d, merge_value(w, xa, xb));
  }
  // Every lane has read lse2 before lane 0 overwrites it (out may alias a or b).
  __syncwarp();
  if (lane == 0) out.lse2[bi * out.lse_stride_batch + h] = w.lse;
}

}  // namespace

cudaError_t launch_merge_chunks(const DecodeParams& p, cudaStream_t stream) noexcept {
  const auto ctas = static_cast<unsigned int>(std::int64_t{p.batch} * p.q_heads);
  cudaError_t err = cudaErrorInvalidValue;
  for_each_value<SupportedHeadDims>([&](auto d) {
    if (d.value == p.head_dim) {
      void* args[] = {const_cast<DecodeParams*>(&p)};
      err = cudaLaunchKernel(reinterpret_cast<const void*>(&merge_chunks_kernel<d.value>),
                             dim3(ctas), dim3(kThreadsPerCta), args, 0, stream);
      if (err != cudaSuccess) (void)cudaGetLastError();
    }
  });
  return err;
}

}  // namespace detail

Status merge_partials(const PartialView& a, const PartialView& b, const PartialView& out,
                      StreamRef stream) noexcept {
  auto same = [](const PartialView& x, const PartialView& y) {
    return x.batch_size == y.batch_size && x.num_heads == y.num_heads && x.head_dim == y.head_dim;
  };
  if (!same(a, b) || !same(a, out))
    return {StatusCode::kInvalidArgument, "merge_partials: partials have different shapes"};
  if (a.batch_size < 0 || a.num_heads < 0 || a.head_dim < 0)
    return {StatusCode::kInvalidArgument, "merge_partials: negative shape"};
  const std::int64_t rows = std::int64_t{a.batch_size} * a.num_heads;
  if (rows == 0 || a.head_dim == 0) return Status::ok();
  if (!a.o || !b.o || !out.o || !a.lse2 || !b.lse2 || !out.lse2)
    return {StatusCode::kInvalidArgument, "merge_partials: null pointer"};
  for (const PartialView* v : {&a, &b, &out})
    if (v->stride_batch < 0 || v->stride_head < 0 || v->lse_stride_batch < 0)
      return {StatusCode::kInvalidArgument, "merge_partials: negative stride"};
  const std::int64_t ctas = (rows + detail::kWarpsPerCta - 1) / detail::kWarpsPerCta;
  if (ctas > 0x7fffffff) return {StatusCode::kNotSupported, "merge_partials: too many rows"};
  PartialView pa = a, pb = b, po = out;
  void* args[] = {&pa, &pb, &po};
  return cuda_status(cudaLaunchKernel(reinterpret_cast<const void*>(&detail::merge_pair_kernel),
                                      dim3(static_cast<unsigned int>(ctas)), dim3(kThreadsPerCta),
                                      args, 0, stream.get()));
}

}  // namespace hattn::cuda
