#pragma once
// The split-KV decode kernel, templated on (KV storage type, head dim, group
// width W, 16-byte aligned rows). Included by one .cu file per KV dtype.
//
// One CTA = (sequence b, KV head hk, pass over up to W of its query heads,
// chunk c of the sequence's tokens); 128 threads = 4 warps.
//
// A row (one token's head_dim elements of K or V) is read by L lanes, each
// owning E consecutive elements loaded as 16-byte vectors (8 bf16/f16, 4 f32):
//   bf16/f16: D = 64 -> L = 8, 128 -> 16, 256 -> 32;  f32: 64 -> 16, 128/256 -> 32.
// So a warp holds 32 / L "row groups" and the CTA NG = 4 * 32 / L of them.
// Each iteration a row group loads R rows of K and of V (R tokens, all loads
// issued before any is used), then for each of its W query heads, whose
// q slices sit in registers, forms the partial dot products over its E
// elements and sums them over the L lanes with xor-shuffles (every lane ends
// with the same bits), and runs the online softmax in base 2 once per R tokens
// (one rescale of the accumulators per R tokens, only when the max grows); then
// accumulates p * V into its E-element slice of W accumulators. Every K/V
// element is loaded once and used by all W query heads of the pass: the GQA
// sharing.
//
// Where the rows come from:
// - 16-byte aligned rows (the common case): cp.async copies global -> shared,
//   kPipeStages - 1 iterations ahead of the one being computed, 64 bytes per
//   lane per tensor per stage (32 at width 8), about 48 KiB per CTA in
//   flight. Each lane reads back only the vectors it copied itself, so the
//   pipeline needs no barrier, only cp.async.wait_group.
// - otherwise: element loads into registers, R = 8, 4, 2 rows of 16 bytes per
//   lane per tensor for W <= 2, 4, 8, all issued before any is used; one
//   iteration in flight.
// On an H100 (bench_cuda_dense, bf16, kv:32768 bs:8) register loads of whole
// rows read 2.29 TB/s, the cp.async pipeline 2.44-2.48 (docs/cuda-dense.md).
//
// At the end the NG row groups' states (m, l, acc) are merged through shared
// memory, and the CTA writes either the final (o, lse2) (one chunk) or its
// chunk partial in f32 (several chunks; merge_chunks combines them).

#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <cstdint>

#include "cuda/device_common.cuh"
#include "cuda/params.hpp"
#include "hattn/core/dispatch.hpp"
#include "hattn/core/supported.hpp"
#include "hattn/cuda/dense_decode.hpp"
#include "hattn/cuda/detail/merge_math.hpp"
#include "hattn/cuda/plan.hpp"

namespace hattn::cuda::detail {

template <class T, int D>
struct RowShape {
  static constexpr int kRowBytes = D * static_cast<int>(sizeof(T));
  static constexpr int kLanes = kRowBytes / 16 < 32 ? kRowBytes / 16 : 32;  // per row
  static constexpr int kElems = D / kLanes;                                 // per lane
  static constexpr int kLaneBytes = kElems * static_cast<int>(sizeof(T));
  static constexpr int kVecs = kLaneBytes / 16;  // 16-byte loads per lane per row
  static constexpr int kWords = kLaneBytes / 4;
  static constexpr int kGroupsPerWarp = 32 / kLanes;
  static_assert(kLanes * kElems == D && kLaneBytes % 16 == 0 && 32 % kLanes == 0);
};

// Rows per row group per iteration: a budget of bytes per lane per tensor.
template <class T, int D, int W>
inline constexpr int kRowsPerIteration =
    (W <= 2 ? 128 : (W == 4 ? 64 : 32)) / RowShape<T, D>::kLaneBytes > 0
        ? (W <= 2 ? 128 : (W == 4 ? 64 : 32)) / RowShape<T, D>::kLaneBytes
        : 1;

// The cp.async pipeline (aligned rows): bytes per lane per tensor per stage
// (at most 64, so a stage is 16 KiB per CTA, 8 KiB at width 8), rows per row
// group per stage, and stages (about 48 KiB of the CTA's shared memory).
template <int W>
inline constexpr int kPipeLaneBytes = W <= 4 ? 64 : 32;
template <class T, int D, int W>
inline constexpr int kPipeRows = kPipeLaneBytes<W> / RowShape<T, D>::kLaneBytes > 0
                                     ? kPipeLaneBytes<W> / RowShape<T, D>::kLaneBytes
                                     : 1;
template <class T, int D, int W>
constexpr int pipe_stage_bytes() {
  constexpr int kLaneBytes = RowShape<T, D>::kLaneBytes, kRows = kPipeRows<T, D, W>;
  return kThreadsPerCta * 2 * kLaneBytes * kRows;
}
template <class T, int D, int W>
inline constexpr int kPipeStageBytes = pipe_stage_bytes<T, D, W>();
template <class T, int D, int W>
inline constexpr int kPipeStages =
    48 * 1024 / kPipeStageBytes<T, D, W> > 2 ? 48 * 1024 / kPipeStageBytes<T, D, W> : 2;
// Dynamic shared memory of a kernel: the pipeline's stages (aligned), or
// only the row groups' accumulators for the final merge, which reuse the
// pipeline's memory once it has drained.
template <class T, int D, int W, bool kAligned>
constexpr int decode_smem_bytes() {
  constexpr int kAcc = kThreadsPerCta / 32 * RowShape<T, D>::kGroupsPerWarp * W * D * 4;
  constexpr int kPipe = kAligned ? kPipeStages<T, D, W> * kPipeStageBytes<T, D, W> : 0;
  return kAcc > kPipe ? kAcc : kPipe;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const auto s = static_cast<std::uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// CTAs of 128 threads each SM should hold (caps registers at 65536 / (128 *
// this)); plan.hpp's resident_ctas_per_sm() must agree. Widths up to 4 fit
// 128 registers without spilling (ptxas, sm_90): 4 CTAs. Width 8 keeps 8 q
// and 8 accumulator slices per lane (about 220 registers): 2 CTAs; capping it
// at 168 registers (3 CTAs) spills 108-156 bytes per thread, untried on a GPU.
template <int W>
inline constexpr int kMinCtasPerSm = W <= 4 ? 4 : 2;

// Length of sequence b from the device page table or lengths, checked: a bad
// entry makes the sequence empty and is recorded (once, by CTA thread 0).
__device__ __forceinline__ std::int64_t sequence_length(const DecodeParams& p, int b,
                                                        std::int32_t* page_begin) {
  std::uint32_t err = 0;
  std::int64_t len = 0;
  *page_begin = 0;
  if (p.paged) {
    const std::int32_t i0 = p.indptr[b], i1 = p.indptr[b + 1];
    if (i0 < 0 || i1 < i0) {
      err = kErrorIndptr;
    } else if (i1 > i0) {
      const std::int32_t last = p.last_page_len[b];
      if (last < 1 || last > p.page_size) {
        err = kErrorLastPageLen;
      } else {
        len = std::int64_t{i1 - i0 - 1} * p.page_size + last;
        *page_begin = i0;
      }
    }
  } else {
    len = p.seq_lens[b];
    if (len < 0 || len > p.max_seq_len) err = kErrorSeqLen;
  }
  if (err == 0 && len >= kMaxSeqLen) err = kErrorSeqLen;
  if (err != 0) {
    if (threadIdx.x == 0) atomicOr(p.error_flags, err);
    len = 0;
  }
  return len;
}

// Element offsets of token t's K and V rows (head 0); false when its page
// index is unusable (recorded).
__device__ __forceinline__ bool token_offsets(const DecodeParams& p, int b, std::int32_t page_begin,
                                              std::uint32_t t, std::int64_t* koff,
                                              std::int64_t* voff) {
  if (!p.paged) {
    *koff = std::int64_t{b} * p.k_outer + std::int64_t{t} * p.k_token;
    *voff = std::int64_t{b} * p.v_outer + std::int64_t{t} * p.v_token;
    return true;
  }
  if (p.indices == nullptr) {
    atomicOr(p.error_flags, kErrorNullIndices);
    return false;
  }
  std::uint32_t slot, off;
  p.page_div.divmod(t, slot, off);
  const std::int64_t page = __ldg(p.indices + page_begin + slot);
  if (page < 0 || page >= p.num_pages) {
    atomicOr(p.error_flags, kErrorPageIndex);
    return false;
  }
  *koff = page * p.k_outer + std::int64_t{off} * p.k_token;
  *voff = page * p.v_outer + std::int64_t{off} * p.v_token;
  return true;
}

// This lane's E elements of one row as packed words. Streaming loads
// (evict-first): the KV is read once per step.
template <class T, int D, bool kAligned>
__device__ __forceinline__ void load_row(const KvBits<T>* row,
                                         std::uint32_t (&w)[RowShape<T, D>::kWords]) {
  using S = RowShape<T, D>;
  if constexpr (kAligned) {
    const uint4* v = reinterpret_cast<const uint4*>(row);
#pragma unroll
    for (int j = 0; j < S::kVecs; ++j) {
      const uint4 x = __ldcs(v + j);
      w[4 * j] = x.x;
      w[4 * j + 1] = x.y;
      w[4 * j + 2] = x.z;
      w[4 * j + 3] = x.w;
    }
  } else if constexpr (sizeof(T) == 2) {
#pragma unroll
    for (int j = 0; j < S::kWords; ++j)
      w[j] =
          std::uint32_t{__ldcs(reinterpret_cast<const unsigned short*>(row) + 2 * j)} |
          (std::uint32_t{__ldcs(reinterpret_cast<const unsigned short*>(row) + 2 * j + 1)} << 16);
  } else {
#pragma unroll
    for (int j = 0; j < S::kWords; ++j)
      w[j] = __ldcs(reinterpret_cast<const unsigned int*>(row) + j);
  }
}

// Row words a lane copied into the pipeline (its kVecs uint4, kThreadsPerCta
// apart), or zeros for a masked row.
template <class Shape>
__device__ __forceinline__ void read_stage(const uint4* first, bool ok,
                                           std::uint32_t (&w)[Shape::kWords]) {
#pragma unroll
  for (int j = 0; j < Shape::kVecs; ++j) {
    const uint4 x = ok ? first[j * kThreadsPerCta] : make_uint4(0u, 0u, 0u, 0u);
    w[4 * j] = x.x;
    w[4 * j + 1] = x.y;
    w[4 * j + 2] = x.z;
    w[4 * j + 3] = x.w;
  }
}

template <class T, int D, int W, bool kAligned>
__global__ void __launch_bounds__(kThreadsPerCta, kMinCtasPerSm<W>)
    decode_kernel(const DecodeParams p) {
  using Shape = RowShape<T, D>;
  using Bits = KvBits<T>;
  constexpr int L = Shape::kLanes, E = Shape::kElems, NW = Shape::kWords;
  constexpr int kWarps = kThreadsPerCta / 32;
  constexpr int NG = kWarps * Shape::kGroupsPerWarp;  // row groups per CTA
  constexpr int R = kAligned ? kPipeRows<T, D, W> : kRowsPerIteration<T, D, W>;
  constexpr int kStep = NG * R;  // tokens per CTA iteration
  static_assert(kChunkAlign % kStep == 0 || kStep % kChunkAlign == 0);

  extern __shared__ __align__(16) unsigned char smem[];  // decode_smem_bytes()
  float* const s_acc = reinterpret_cast<float*>(smem);   // [NG][W][D], after the loop
  __shared__ float s_m[NG * W], s_l[NG * W], s_w[NG * W];
  __shared__ float s_inv[W], s_lse[W];

  // Which work: blockIdx.x = ((b * kv_heads + hk) * passes + pass) * chunks + c.
  std::int64_t cta = blockIdx.x;
  const int c = static_cast<int>(cta % p.num_chunks);
  cta /= p.num_chunks;
  const int pass = static_cast<int>(cta % p.num_passes);
  cta /= p.num_passes;
  const int hk = static_cast<int>(cta % p.kv_heads);
  const int b = static_cast<int>(cta / p.kv_heads);
  const int g0 = pass * p.heads_per_pass;
  const int ng = min(p.heads_per_pass, p.group - g0);  // heads this CTA writes, <= W

  const int tid = threadIdx.x, lane = tid % 32;
  const int grp = (tid / 32) * Shape::kGroupsPerWarp + lane / L;
  const int e0 = (lane % L) * E;

  std::int32_t page_begin = 0;
  const std::int64_t len = sequence_length(p, b, &page_begin);
  const TokenRange range = chunk_range(c, p.num_chunks, p.chunk_tokens, len);
  const int t_begin = static_cast<int>(range.begin), t_end = static_cast<int>(range.end);

  // This lane's slice of the pass's query rows, pre-scaled to base-2 scores.
  float q[W][E];
#pragma unroll
  for (int g = 0; g < W; ++g) {
    const std::int64_t at = std::int64_t{b} * p.q_stride_batch +
                            std::int64_t{hk * p.group + g0 + g} * p.q_stride_head + e0;
#pragma unroll
    for (int e = 0; e < E; ++e)
      q[g][e] = g < ng ? load_as_f32(p.q, p.q_dtype, at + e) * p.q_scale : 0.0f;
  }

  float m[W], l[W], acc[W][E];
#pragma unroll
  for (int g = 0; g < W; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[g][e] = 0.0f;
  }

  const Bits* kbase = static_cast<const Bits*>(p.k) + std::int64_t{hk} * p.k_head + e0;
  const Bits* vbase = static_cast<const Bits*>(p.v) + std::int64_t{hk} * p.v_head + e0;

  // One iteration's R rows of K and V (k_row(u, w) / v_row(u, w) give row u's
  // words; bit u of ok: row u exists): scores s[u][g] = q_g . k_u in base 2,
  // summed over the row's L lanes, online softmax once per R tokens (s
  // becomes the weights p), then acc_g += p_ug * v_u over this lane's elements.
  const auto attend_rows = [&](auto&& k_row, auto&& v_row, std::uint32_t ok) {
    float s[R][W];
#pragma unroll
    for (int u = 0; u < R; ++u) {
      std::uint32_t kw[NW];
      k_row(u, kw);
      float kf[E];
      widen<T>(kw, kf);
#pragma unroll
      for (int g = 0; g < W; ++g) {
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < E; ++e) dot = fmaf(q[g][e], kf[e], dot);
        s[u][g] = dot;
      }
    }
#pragma unroll
    for (int off = L / 2; off > 0; off /= 2)
#pragma unroll
      for (int u = 0; u < R; ++u)
#pragma unroll
        for (int g = 0; g < W; ++g) s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], off);

#pragma unroll
    for (int g = 0; g < W; ++g) {
      float mt = -INFINITY;
#pragma unroll
      for (int u = 0; u < R; ++u) {
        if (!(ok >> u & 1u)) s[u][g] = -INFINITY;
        mt = fmaxf(mt, s[u][g]);
      }
      const float mn = fmaxf(m[g], mt);
      if (mn == -INFINITY) {  // nothing seen yet by this row group
#pragma unroll
        for (int u = 0; u < R; ++u) s[u][g] = 0.0f;
        continue;
      }
      const float scale = exp2f(m[g] - mn);  // 0 when m was -inf
      float sum = 0.0f;
#pragma unroll
      for (int u = 0; u < R; ++u) {
        s[u][g] = exp2f(s[u][g] - mn);  // 0 for masked tokens
        sum += s[u][g];
      }
      l[g] = fmaf(l[g], scale, sum);
      if (mn > m[g]) {
#pragma unroll
        for (int e = 0; e < E; ++e) acc[g][e] *= scale;
        m[g] = mn;
      }
    }

#pragma unroll
    for (int u = 0; u < R; ++u) {
      std::uint32_t vw[NW];
      v_row(u, vw);
      float vf[E];
      widen<T>(vw, vf);
#pragma unroll
      for (int g = 0; g < W; ++g)
#pragma unroll
        for (int e = 0; e < E; ++e) acc[g][e] = fmaf(s[u][g], vf[e], acc[g][e]);
    }
  };

  // Trip count is the same for every thread: the shuffles in attend_rows see
  // all lanes.
  const int iters = t_end > t_begin ? (t_end - t_begin + kStep - 1) / kStep : 0;
  // f(u, k_row, v_row) for each row u of iteration it that exists and whose
  // page is usable; returns those rows as bits.
  const auto for_each_row = [&](int it, auto&& f) {
    std::uint32_t ok = 0;
#pragma unroll
    for (int u = 0; u < R; ++u) {
      const int t = t_begin + it * kStep + u * NG + grp;
      std::int64_t koff = 0, voff = 0;
      if (t < t_end &&
          token_offsets(p, b, page_begin, static_cast<std::uint32_t>(t), &koff, &voff)) {
        f(u, kbase + koff, vbase + voff);
        ok |= 1u << u;
      }
    }
    return ok;
  };
  if constexpr (kAligned) {
    // Stage st holds, per (row u, tensor, vector j), one uint4 per thread.
    constexpr int NS = kPipeStages<T, D, W>;
    uint4* const pipe = reinterpret_cast<uint4*>(smem);
    const auto at = [&](int st, int u, int tensor, int j) {
      return pipe + (((st * R + u) * 2 + tensor) * Shape::kVecs + j) * kThreadsPerCta + tid;
    };
    // Bit st * R + u: row u of stage st was copied (else it is masked).
    static_assert(NS * R <= 32);
    std::uint32_t ok_bits = 0;
    const auto issue = [&](int it) {
      const int st = it % NS;
      const auto copy = [&](int u, const Bits* kr, const Bits* vr) {
#pragma unroll
        for (int j = 0; j < Shape::kVecs; ++j) {
          cp_async16(at(st, u, 0, j), reinterpret_cast<const uint4*>(kr) + j);
          cp_async16(at(st, u, 1, j), reinterpret_cast<const uint4*>(vr) + j);
        }
      };
      const std::uint32_t bits = it < iters ? for_each_row(it, copy) : 0u;
      constexpr std::uint32_t kMask = (1u << R) - 1u;
      ok_bits = (ok_bits & ~(kMask << (st * R))) | (bits << (st * R));
      cp_async_commit();  // empty groups too: wait_group counts stay uniform
    };
#pragma unroll
    for (int it = 0; it < NS - 1; ++it) issue(it);
    for (int it = 0; it < iters; ++it) {
      issue(it + NS - 1);
      cp_async_wait<NS - 1>();  // iteration it's group has landed
      const int st = it % NS;
      const std::uint32_t ok = ok_bits >> (st * R);
      const auto k_row = [&](int u, std::uint32_t(&w)[NW]) {
        read_stage<Shape>(at(st, u, 0, 0), ok >> u & 1u, w);
      };
      const auto v_row = [&](int u, std::uint32_t(&w)[NW]) {
        read_stage<Shape>(at(st, u, 1, 0), ok >> u & 1u, w);
      };
      attend_rows(k_row, v_row, ok);
    }
    cp_async_wait<0>();
    __syncthreads();  // the accumulators below reuse the pipeline's memory
  } else {
    for (int it = 0; it < iters; ++it) {
      std::uint32_t kw[R][NW] = {}, vw[R][NW] = {};  // zeros for missing rows
      const std::uint32_t ok = for_each_row(it, [&](int u, const Bits* kr, const Bits* vr) {
        load_row<T, D, kAligned>(kr, kw[u]);
        load_row<T, D, kAligned>(vr, vw[u]);
      });
      const auto k_row = [&](int u, std::uint32_t(&w)[NW]) {
#pragma unroll
        for (int j = 0; j < NW; ++j) w[j] = kw[u][j];
      };
      const auto v_row = [&](int u, std::uint32_t(&w)[NW]) {
#pragma unroll
        for (int j = 0; j < NW; ++j) w[j] = vw[u][j];
      };
      attend_rows(k_row, v_row, ok);
    }
  }

  // Merge the NG row groups of the CTA.
#pragma unroll
  for (int g = 0; g < W; ++g) {
    const int slot = grp * W + g;
    if (lane % L == 0) {
      s_m[slot] = m[g];
      s_l[slot] = l[g];
    }
    float4* dst = reinterpret_cast<float4*>(s_acc + slot * D + e0);
#pragma unroll
    for (int j = 0; j < E / 4; ++j)
      dst[j] = make_float4(acc[g][4 * j], acc[g][4 * j + 1], acc[g][4 * j + 2], acc[g][4 * j + 3]);
  }
  __syncthreads();
  if (tid < W) {
    const int g = tid;
    float mx = -INFINITY;
    for (int i = 0; i < NG; ++i) mx = fmaxf(mx, s_m[i * W + g]);
    float sum = 0.0f;
    for (int i = 0; i < NG; ++i) {
      const float w = chunk_weight(s_m[i * W + g], mx);
      s_w[i * W + g] = w;
      sum = fmaf(s_l[i * W + g], w, sum);
    }
    s_inv[g] = sum > 0.0f ? 1.0f / sum : 0.0f;
    s_lse[g] = merged_lse(mx, sum);
  }
  __syncthreads();

  const bool split = p.num_chunks > 1;
  const std::int64_t part_row = (std::int64_t{b} * p.num_chunks + c) * p.q_heads;
  for (int i = tid; i < ng * D; i += kThreadsPerCta) {
    const int g = i / D, d = i % D;
    float o = 0.0f;
#pragma unroll 4
    for (int r = 0; r < NG; ++r) {
      const float w = s_w[r * W + g];
      if (w != 0.0f) o = fmaf(w, s_acc[(r * W + g) * D + d], o);
    }
    o *= s_inv[g];
    const int qh = hk * p.group + g0 + g;
    if (split)
      p.partial_o[(part_row + qh) * D + d] = o;
    else
      store_from_f32(p.o, p.o_dtype,
                     std::int64_t{b} * p.o_stride_batch + std::int64_t{qh} * p.o_stride_head + d,
                     o);
  }
  if (tid < ng) {
    const int qh = hk * p.group + g0 + tid;
    if (split)
      p.partial_lse[part_row + qh] = s_lse[tid];
    else
      p.lse2[std::int64_t{b} * p.lse_stride_batch + qh] = s_lse[tid];
  }
}

template <class T, int D, int W, bool kAligned>
cudaError_t launch_decode(const DecodeParams& p, std::int64_t num_ctas, cudaStream_t stream) {
  // The launch's own status (not cudaGetLastError(), which would also report
  // an error some earlier, unrelated call left pending).
  constexpr int kSmem = decode_smem_bytes<T, D, W, kAligned>();
  const void* kernel = reinterpret_cast<const void*>(&decode_kernel<T, D, W, kAligned>);
  // With its static shared memory the kernel may pass the 48 KiB a kernel
  // gets without opting in; the opt-in is per device, done once for each.
  static std::atomic<std::uint64_t> opted_in{0};  // bit d: device d (d < 64)
  int device = 0;
  if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) {
    (void)cudaGetLastError();
    return e;
  }
  const std::uint64_t bit = device < 64 ? std::uint64_t{1} << device : 0;
  if ((opted_in.load(std::memory_order_relaxed) & bit) == 0 || bit == 0) {
    if (const cudaError_t e =
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
        e != cudaSuccess) {
      (void)cudaGetLastError();
      return e;
    }
    opted_in.fetch_or(bit, std::memory_order_relaxed);
  }
  void* args[] = {const_cast<DecodeParams*>(&p)};
  const cudaError_t e =
      cudaLaunchKernel(kernel, dim3(static_cast<unsigned int>(num_ctas)), dim3(kThreadsPerCta),
                       args, static_cast<std::size_t>(kSmem), stream);
  if (e != cudaSuccess) (void)cudaGetLastError();
  return e;
}

// The launcher of every (head dim, width, alignment) of the supported lists
// for KV type T: taking their addresses instantiates the kernels.
template <class T>
DecodeLaunchFn find_decode_launcher(int head_dim, int width, bool aligned) noexcept {
  DecodeLaunchFn fn = nullptr;
  for_each_value<SupportedHeadDims>([&](auto d) {
    for_each_value<GroupWidths>([&](auto w) {
      constexpr int kD = d.value, kW = w.value;
      if (kD == head_dim && kW == width)
        fn = aligned ? &launch_decode<T, kD, kW, true> : &launch_decode<T, kD, kW, false>;
    });
  });
  return fn;
}

}  // namespace hattn::cuda::detail
