#pragma once
// The hash tables of one (sequence, KV head): for each of L tables a CSR over
// the 2^K buckets, offsets[2^K + 1] and the indexed positions sorted by bucket
// (and by position within a bucket). Positions are relative (0 = the first
// indexed token) and stored as uint16 while fewer than 65536 are indexed,
// else uint32: at L = 150 this keeps the index well below the bf16 KV it
// indexes (the MagicPIG reference always uses int32 and is larger than it).
//
// Positions added after the build go to a small sorted side table per table
// (code, position); retrieval walks both. When the side tables grow past an
// eighth of the main ones they are folded in by a per-bucket concatenation,
// O(n + 2^K) per table, which yields exactly the tables a full rebuild would.

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "hattn/detail/huge_alloc.hpp"

namespace hattn::cpu {

class LshTables {
 public:
  LshTables() = default;
  // K in 1..16, L >= 1 (std::invalid_argument otherwise). Every code given
  // to build() and insert() must be below 2^K.
  LshTables(std::int32_t K, std::int32_t L);

  std::int32_t K() const noexcept { return K_; }
  std::int32_t L() const noexcept { return L_; }
  // Positions indexed (main + side).
  std::int64_t size() const noexcept { return main_size_ + side_size_; }
  std::int64_t side_size() const noexcept { return side_size_; }
  bool wide() const noexcept { return wide_; }  // uint32 positions

  // Replace everything with positions 0..n-1 whose codes are codes[i * L + l].
  void build(const std::uint16_t* codes, std::int64_t n);
  // Add positions size()..size()+n-1. Strong guarantee: if it throws
  // (std::bad_alloc), the tables are unchanged.
  void insert(const std::uint16_t* codes, std::int64_t n);
  // insert() in two phases, for callers that change several tables at once:
  // prepare_insert() allocates everything and may throw; commit() cannot
  // fail. A Pending is valid only for the tables that made it, unchanged
  // since. commit() does not compact; insert() does when the side is large.
  class Pending;
  Pending prepare_insert(const std::uint16_t* codes, std::int64_t n) const;
  void commit(Pending&& p) noexcept;
  // Fold the side tables into the main ones. Strong guarantee, like insert().
  void compact();
  // compact() once the side tables have grown enough to slow retrieval; a
  // failure to allocate for it leaves them as they are (it is only for speed).
  void compact_if_large() noexcept;

  // f(position) for every position in bucket `code` of table l, main table
  // first, ascending within each.
  template <class F>
  void for_each_in_bucket(std::int32_t l, std::uint32_t code, F&& f) const {
    if (main_size_ == 0) {
      for_each_in_side(l, code, f);
      return;
    }
    const std::size_t ob = static_cast<std::size_t>(l) * (bucket_count() + 1);
    const std::uint32_t b = offsets_[ob + code], e = offsets_[ob + code + 1];
    const std::size_t base = static_cast<std::size_t>(l) * static_cast<std::size_t>(main_size_);
    if (wide_) {
      for (std::uint32_t i = b; i < e; ++i) f(static_cast<std::uint32_t>(idx32_[base + i]));
    } else {
      for (std::uint32_t i = b; i < e; ++i) f(static_cast<std::uint32_t>(idx16_[base + i]));
    }
    for_each_in_side(l, code, f);
  }

  // Raw access for batched walks (retrieval prefetches buckets of many tables
  // before walking them). Valid while main_size() > 0.
  const std::uint32_t* bucket_offsets(std::int32_t l, std::uint32_t code) const noexcept {
    return offsets_.data() + static_cast<std::size_t>(l) * (bucket_count() + 1) + code;
  }
  const std::uint16_t* positions16(std::int32_t l) const noexcept {
    return idx16_.data() + static_cast<std::size_t>(l) * static_cast<std::size_t>(main_size_);
  }
  const std::uint32_t* positions32(std::int32_t l) const noexcept {
    return idx32_.data() + static_cast<std::size_t>(l) * static_cast<std::size_t>(main_size_);
  }
  // f(position) for the side-table entries of bucket `code` of table l.
  template <class F>
  void for_each_in_side(std::int32_t l, std::uint32_t code, F&& f) const {
    if (side_size_ == 0) return;
    const std::uint64_t* s = side_.data() + static_cast<std::size_t>(l) * side_size_;
    const std::uint64_t* end = s + side_size_;
    const std::uint64_t key = std::uint64_t{code} << 32;
    // First entry with this code (entries sort by code, then position).
    std::size_t lo = 0, hi = static_cast<std::size_t>(side_size_);
    while (lo < hi) {
      const std::size_t mid = (lo + hi) / 2;
      if (s[mid] < key)
        lo = mid + 1;
      else
        hi = mid;
    }
    for (const std::uint64_t* p = s + lo; p < end && (*p >> 32) == code; ++p)
      f(static_cast<std::uint32_t>(*p));
  }

  // Main-table views (after compact() they hold everything).
  std::span<const std::uint32_t> offsets(std::int32_t l) const noexcept {
    return {offsets_.data() + static_cast<std::size_t>(l) * (bucket_count() + 1),
            bucket_count() + 1};
  }
  // Position at slot i of main table l.
  std::uint32_t position(std::int32_t l, std::int64_t i) const noexcept {
    const std::size_t at = static_cast<std::size_t>(l) * static_cast<std::size_t>(main_size_) +
                           static_cast<std::size_t>(i);
    return wide_ ? idx32_[at] : idx16_[at];
  }
  std::int64_t main_size() const noexcept { return main_size_; }

  // Bytes held (offsets + positions + side tables).
  std::size_t bytes() const noexcept;

 private:
  template <class T>
  using Vec = std::vector<T, ::hattn::detail::HugePageAllocator<T>>;
  // Main tables over positions 0..n-1, built aside.
  struct Main {
    Vec<std::uint32_t> offsets;
    Vec<std::uint16_t> idx16;
    Vec<std::uint32_t> idx32;
    bool wide = false;
    std::int64_t n = 0;
  };

  std::size_t bucket_count() const noexcept { return std::size_t{1} << K_; }
  Main make_main(const std::uint16_t* codes, std::int64_t n) const;
  void set_main(Main&& m) noexcept;

  std::int32_t K_ = 0, L_ = 0;
  bool wide_ = false;
  std::int64_t main_size_ = 0;
  std::int64_t side_size_ = 0;
  Vec<std::uint32_t> offsets_;  // [L][2^K + 1]
  Vec<std::uint16_t> idx16_;    // [L][main_size_]
  Vec<std::uint32_t> idx32_;
  Vec<std::uint64_t> side_;  // [L][side_size_]: code << 32 | position, sorted
};

// What LshTables::insert() needs, allocated: new main tables (the first
// insert into empty tables) or the merged side tables.
class LshTables::Pending {
 public:
  Pending() = default;

 private:
  friend class LshTables;
  bool main = false;
  Main m;
  Vec<std::uint64_t> side;
  std::int64_t side_size = -1;  // -1: nothing to commit (an empty insert, or default-made)
};

}  // namespace hattn::cpu
