#pragma once
// Input validation shared by every backend and the reference: bad input is a
// Status with a message, never undefined behaviour.

#include <cmath>
#include <cstdint>
#include <utility>

#include "hattn/core/kv_view.hpp"
#include "hattn/core/problem.hpp"
#include "hattn/core/status.hpp"

namespace hattn {

namespace detail {
inline Status invalid(const char* msg) noexcept { return {StatusCode::kInvalidArgument, msg}; }

// Whether a softmax scale is usable: kernels work in base 2, with q scaled by
// sm_scale * log2(e), which must stay a finite f32.
inline bool scale_is_finite_in_base2(float sm_scale) noexcept {
  return std::isfinite(sm_scale) && std::isfinite(sm_scale * 1.4426950408889634f);
}

// Whether runs of `len` elements at i * si + j * sj (0 <= i < ni, 0 <= j < nj;
// strides >= 0) are pairwise disjoint, checked as nested: the smaller stride
// of the dimensions with more than one index steps over whole runs, the
// larger one over the whole inner extent. Every packed or padded layout, in
// either order, passes.
inline bool runs_disjoint(std::int64_t ni, std::int64_t si, std::int64_t nj, std::int64_t sj,
                          std::int64_t len) noexcept {
  if (ni <= 0 || nj <= 0) return true;  // no runs at all
  if (ni <= 1) ni = 1, si = 0;
  if (nj <= 1) nj = 1, sj = 0;
  if (ni == 1 && nj == 1) return true;
  if (ni == 1) return sj >= len;
  if (nj == 1) return si >= len;
  if (si > sj) std::swap(ni, nj), std::swap(si, sj);  // (ni, si) inner
  return si >= len && sj / ni >= si;                  // sj >= ni * si without overflow
}

// The shape and strides of a partial result alone. `written`: the views a
// call writes must not map two (batch, head) rows onto the same memory.
inline Status validate_partial(const PartialView& v, bool written) noexcept {
  if (v.batch_size < 0 || v.num_heads < 0 || v.head_dim < 0)
    return invalid("partial batch_size, num_heads or head_dim is negative");
  if (v.stride_batch < 0 || v.stride_head < 0 || v.lse_stride_batch < 0)
    return invalid("partial strides are negative");
  if (written &&
      !runs_disjoint(v.batch_size, v.stride_batch, v.num_heads, v.stride_head, v.head_dim))
    return invalid("output strides make (batch, head) rows of o overlap");
  if (written && !runs_disjoint(v.batch_size, v.lse_stride_batch, v.num_heads, 1, 1))
    return invalid("output lse_stride_batch makes lse2 rows overlap (needs >= num_heads)");
  return Status::ok();
}
}  // namespace detail

// Shape of the problem alone (not whether a backend supports it).
inline Status validate(const DecodeProblem& p) noexcept {
  using detail::invalid;
  if (p.batch_size < 0) return invalid("batch_size is negative");
  if (p.num_kv_heads <= 0) return invalid("num_kv_heads must be positive");
  if (p.num_q_heads <= 0) return invalid("num_q_heads must be positive");
  if (p.num_q_heads % p.num_kv_heads != 0)
    return invalid("num_q_heads is not a multiple of num_kv_heads");
  if (p.head_dim <= 0) return invalid("head_dim must be positive");
  if (p.sm_scale && !detail::scale_is_finite_in_base2(*p.sm_scale))
    return invalid("sm_scale is not finite, or sm_scale * log2(e) overflows f32");
  return Status::ok();
}

inline Status validate(const DecodeProblem& p, const QueryView& q) noexcept {
  using detail::invalid;
  if (q.batch_size != p.batch_size) return invalid("query batch_size does not match the problem");
  if (q.num_heads != p.num_q_heads) return invalid("query num_heads does not match num_q_heads");
  if (q.head_dim != p.head_dim) return invalid("query head_dim does not match the problem");
  if (q.dtype != p.q_dtype) return invalid("query dtype does not match the problem");
  if (p.batch_size > 0 && q.data == nullptr) return invalid("query data is null");
  if (q.stride_batch < 0 || q.stride_head < 0) return invalid("query strides are negative");
  return Status::ok();
}

inline Status validate(const DecodeProblem& p, const PartialView& out) noexcept {
  using detail::invalid;
  if (out.batch_size != p.batch_size)
    return invalid("output batch_size does not match the problem");
  if (out.num_heads != p.num_q_heads) return invalid("output num_heads does not match num_q_heads");
  if (out.head_dim != p.head_dim) return invalid("output head_dim does not match the problem");
  if (out.dtype != p.o_dtype) return invalid("output dtype does not match the problem");
  if (p.batch_size > 0 && (out.o == nullptr || out.lse2 == nullptr))
    return invalid("output o or lse2 is null");
  return detail::validate_partial(out, true);  // strides: not negative, rows disjoint
}

namespace detail {
inline Status validate_kv_common(const DecodeProblem& p, const void* k, const void* v, DType dtype,
                                 std::int32_t heads, std::int32_t dim, std::int32_t batch,
                                 const KvStrides& ks, const KvStrides& vs) noexcept {
  if (batch != p.batch_size) return invalid("KV batch_size does not match the problem");
  if (heads != p.num_kv_heads) return invalid("KV num_kv_heads does not match the problem");
  if (dim != p.head_dim) return invalid("KV head_dim does not match the problem");
  if (dtype != p.kv_dtype) return invalid("KV dtype does not match the problem");
  if (batch > 0 && (k == nullptr || v == nullptr)) return invalid("K or V data is null");
  if (ks.outer < 0 || ks.token < 0 || ks.head < 0 || vs.outer < 0 || vs.token < 0 || vs.head < 0)
    return invalid("KV strides are negative");
  return Status::ok();
}
}  // namespace detail

// Checks the page table too: O(batch + pages), cheap next to reading the KV.
inline Status validate(const DecodeProblem& p, const PagedKvView& kv) noexcept {
  using detail::invalid;
  HATTN_RETURN_IF_ERROR(detail::validate_kv_common(p, kv.k, kv.v, kv.dtype, kv.num_kv_heads,
                                                   kv.head_dim, kv.batch_size, kv.k_strides,
                                                   kv.v_strides));
  if (kv.page_size < 1) return invalid("page_size must be at least 1");
  if (kv.num_pages < 0) return invalid("num_pages is negative");
  if (kv.batch_size == 0) return Status::ok();  // an empty batch reads nothing
  if (kv.indptr == nullptr || kv.last_page_len == nullptr)
    return invalid("page table indptr or last_page_len is null");
  if (kv.indptr[0] < 0) return invalid("page table indptr[0] is negative");
  for (std::int32_t b = 0; b < kv.batch_size; ++b) {
    const std::int32_t pages = kv.indptr[b + 1] - kv.indptr[b];
    if (pages < 0) return invalid("page table indptr decreases (negative sequence length)");
    if (pages > 0 && (kv.last_page_len[b] < 1 || kv.last_page_len[b] > kv.page_size))
      return invalid("last_page_len is outside 1..page_size");
  }
  const std::int32_t nnz = kv.indptr[kv.batch_size];
  if (nnz > kv.indptr[0] && kv.indices == nullptr) return invalid("page table indices is null");
  for (std::int32_t i = kv.indptr[0]; i < nnz; ++i)
    if (kv.indices[i] < 0 || kv.indices[i] >= kv.num_pages)
      return invalid("page index outside the pool");
  return Status::ok();
}

inline Status validate(const DecodeProblem& p, const DenseKvView& kv) noexcept {
  using detail::invalid;
  HATTN_RETURN_IF_ERROR(detail::validate_kv_common(p, kv.k, kv.v, kv.dtype, kv.num_kv_heads,
                                                   kv.head_dim, kv.batch_size, kv.k_strides,
                                                   kv.v_strides));
  if (p.batch_size > 0 && kv.seq_lens == nullptr) return invalid("seq_lens is null");
  for (std::int32_t b = 0; b < kv.batch_size; ++b) {
    if (kv.seq_lens[b] < 0) return invalid("negative sequence length");
    if (kv.seq_lens[b] > kv.max_seq_len) return invalid("sequence length exceeds max_seq_len");
  }
  return Status::ok();
}

template <class Kv>
Status validate_all(const DecodeProblem& p, const QueryView& q, const Kv& kv,
                    const PartialView& out) noexcept {
  HATTN_RETURN_IF_ERROR(validate(p));
  HATTN_RETURN_IF_ERROR(validate(p, q));
  HATTN_RETURN_IF_ERROR(validate(p, out));
  return validate(p, kv);
}

}  // namespace hattn
