#pragma once
// Addressing of K/V rows (the head_dim elements of one token and head) through
// a KV view: random access for the reference, a cursor that walks a sequence
// without a division per token for the kernels, and a locator for scattered
// tokens of one (sequence, head) (the LSH-sampled rows).

#include <bit>
#include <cstddef>
#include <cstdint>

#include "hattn/core/kv_view.hpp"

namespace hattn::detail {

struct RowPtrs {
  const std::byte* k;
  const std::byte* v;
};

inline RowPtrs row_at(const PagedKvView& kv, std::int32_t b, std::int32_t h,
                      std::int64_t t) noexcept {
  const std::int64_t page = kv.indices[kv.indptr[b] + t / kv.page_size];
  const std::int64_t off = t % kv.page_size;
  const std::size_t es = size_of(kv.dtype);
  const auto* k = static_cast<const std::byte*>(kv.k);
  const auto* v = static_cast<const std::byte*>(kv.v);
  return {k + (page * kv.k_strides.outer + off * kv.k_strides.token + h * kv.k_strides.head) * es,
          v + (page * kv.v_strides.outer + off * kv.v_strides.token + h * kv.v_strides.head) * es};
}

inline RowPtrs row_at(const DenseKvView& kv, std::int32_t b, std::int32_t h,
                      std::int64_t t) noexcept {
  const std::size_t es = size_of(kv.dtype);
  const auto* k = static_cast<const std::byte*>(kv.k);
  const auto* v = static_cast<const std::byte*>(kv.v);
  return {k + (b * kv.k_strides.outer + t * kv.k_strides.token + h * kv.k_strides.head) * es,
          v + (b * kv.v_strides.outer + t * kv.v_strides.token + h * kv.v_strides.head) * es};
}

// Walks the rows of (sequence b, head h) from token t0 onwards.
template <class View>
class RowCursor;

// Byte addressing of one head's rows in a paged view: row (page, offset).
class PagedHeadRows {
 public:
  PagedHeadRows(const PagedKvView& kv, std::int32_t h) noexcept {
    const auto es = static_cast<std::int64_t>(size_of(kv.dtype));
    k_ = static_cast<const std::byte*>(kv.k) + h * kv.k_strides.head * es;
    v_ = static_cast<const std::byte*>(kv.v) + h * kv.v_strides.head * es;
    k_page_ = kv.k_strides.outer * es;
    v_page_ = kv.v_strides.outer * es;
    k_tok_ = kv.k_strides.token * es;
    v_tok_ = kv.v_strides.token * es;
  }
  RowPtrs at(std::int64_t page, std::int64_t off) const noexcept {
    return {k_ + page * k_page_ + off * k_tok_, v_ + page * v_page_ + off * v_tok_};
  }

 private:
  const std::byte* k_;
  const std::byte* v_;
  std::int64_t k_page_, v_page_, k_tok_, v_tok_;
};

template <>
class RowCursor<PagedKvView> {
 public:
  RowCursor(const PagedKvView& kv, std::int32_t b, std::int32_t h, std::int64_t t0) noexcept
      : rows_(kv, h),
        pages_(kv.indices + kv.indptr[b] + t0 / kv.page_size),
        page_size_(kv.page_size),
        off_(t0 % kv.page_size) {}
  // Fill n consecutive rows and advance past them.
  void next(std::int32_t n, const std::byte** k, const std::byte** v) noexcept {
    for (std::int32_t i = 0; i < n; ++i) {
      const RowPtrs r = rows_.at(*pages_, off_);
      k[i] = r.k;
      v[i] = r.v;
      if (++off_ == page_size_) {
        off_ = 0;
        ++pages_;
      }
    }
  }

 private:
  PagedHeadRows rows_;
  const std::int32_t* pages_;
  std::int32_t page_size_;
  std::int64_t off_;
};

// Rows of (sequence b, head h) at token offset + p, in any order; no
// division when the page size is a power of two.
class PagedRowLocator {
 public:
  PagedRowLocator(const PagedKvView& kv, std::int32_t b, std::int32_t h,
                  std::int64_t offset) noexcept
      : rows_(kv, h),
        pages_(kv.indices + kv.indptr[b]),
        page_size_(kv.page_size),
        shift_(std::has_single_bit(static_cast<std::uint64_t>(kv.page_size))
                   ? std::countr_zero(static_cast<std::uint64_t>(kv.page_size))
                   : -1),
        offset_(offset) {}
  RowPtrs operator()(std::int64_t p) const noexcept {
    const std::int64_t t = offset_ + p;
    const std::int64_t page = shift_ >= 0 ? t >> shift_ : t / page_size_;
    const std::int64_t off = shift_ >= 0 ? t & (page_size_ - 1) : t % page_size_;
    return rows_.at(pages_[page], off);
  }

 private:
  PagedHeadRows rows_;
  const std::int32_t* pages_;
  std::int64_t page_size_;
  int shift_;
  std::int64_t offset_;
};

template <>
class RowCursor<DenseKvView> {
 public:
  RowCursor(const DenseKvView& kv, std::int32_t b, std::int32_t h, std::int64_t t0) noexcept {
    const RowPtrs r = row_at(kv, b, h, t0);
    k_ = r.k;
    v_ = r.v;
    k_tok_ = kv.k_strides.token * static_cast<std::int64_t>(size_of(kv.dtype));
    v_tok_ = kv.v_strides.token * static_cast<std::int64_t>(size_of(kv.dtype));
  }
  void next(std::int32_t n, const std::byte** k, const std::byte** v) noexcept {
    for (std::int32_t i = 0; i < n; ++i) {
      k[i] = k_;
      v[i] = v_;
      k_ += k_tok_;
      v_ += v_tok_;
    }
  }

 private:
  const std::byte* k_;
  const std::byte* v_;
  std::int64_t k_tok_, v_tok_;
};

}  // namespace hattn::detail
