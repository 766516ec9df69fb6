#include "hattn/cpu/lsh_index.hpp"

#include <algorithm>
#include <new>
#include <stdexcept>
#include <utility>

namespace hattn::cpu {

namespace {

constexpr std::int64_t kSideMin = 1024;  // side entries per table before a fold is considered

}  // namespace

LshTables::LshTables(std::int32_t K, std::int32_t L) : K_(K), L_(L) {
  if (K < 1 || K > 16 || L < 1) throw std::invalid_argument("LshTables: K must be 1..16, L >= 1");
}

LshTables::Main LshTables::make_main(const std::uint16_t* codes, std::int64_t n) const {
  const std::size_t nb = bucket_count(), L = static_cast<std::size_t>(L_);
  Main m;
  m.n = n;
  m.wide = n >= 65536;
  m.offsets.assign(L * (nb + 1), 0u);
  if (m.wide)
    m.idx32.resize(L * static_cast<std::size_t>(n));
  else
    m.idx16.resize(L * static_cast<std::size_t>(n));
  std::vector<std::uint32_t> cursor(nb);
  for (std::size_t l = 0; l < L; ++l) {
    std::uint32_t* off = m.offsets.data() + l * (nb + 1);
    for (std::int64_t i = 0; i < n; ++i) ++off[codes[i * L_ + l] + 1];
    for (std::size_t c = 0; c < nb; ++c) off[c + 1] += off[c];
    std::copy(off, off + nb, cursor.begin());
    const std::size_t base = l * static_cast<std::size_t>(n);
    // Positions in ascending order: each bucket comes out sorted (stable).
    if (m.wide) {
      for (std::int64_t i = 0; i < n; ++i)
        m.idx32[base + cursor[codes[i * L_ + l]]++] = static_cast<std::uint32_t>(i);
    } else {
      for (std::int64_t i = 0; i < n; ++i)
        m.idx16[base + cursor[codes[i * L_ + l]]++] = static_cast<std::uint16_t>(i);
    }
  }
  return m;
}

void LshTables::set_main(Main&& m) noexcept {
  offsets_ = std::move(m.offsets);
  idx16_ = std::move(m.idx16);
  idx32_ = std::move(m.idx32);
  wide_ = m.wide;
  main_size_ = m.n;
}

void LshTables::build(const std::uint16_t* codes, std::int64_t n) {
  Main m = make_main(codes, n);  // may throw: nothing has changed yet
  set_main(std::move(m));
  side_.clear();
  side_.shrink_to_fit();
  side_size_ = 0;
}

LshTables::Pending LshTables::prepare_insert(const std::uint16_t* codes, std::int64_t n) const {
  Pending p;  // side_size -1: nothing to commit
  if (n <= 0) return p;
  if (main_size_ == 0 && side_size_ == 0) {
    p.main = true;
    p.m = make_main(codes, n);
    return p;
  }
  const std::int64_t first = size();
  const std::int64_t ns = side_size_ + n;
  p.side.resize(static_cast<std::size_t>(L_) * static_cast<std::size_t>(ns));
  std::vector<std::uint64_t> batch(static_cast<std::size_t>(n));
  for (std::int32_t l = 0; l < L_; ++l) {
    for (std::int64_t i = 0; i < n; ++i)
      batch[i] = (std::uint64_t{codes[i * L_ + l]} << 32) | static_cast<std::uint64_t>(first + i);
    std::sort(batch.begin(), batch.end());
    const std::uint64_t* old = side_.data() + static_cast<std::size_t>(l) * side_size_;
    std::merge(old, old + side_size_, batch.begin(), batch.end(),
               p.side.begin() + static_cast<std::ptrdiff_t>(l) * ns);
  }
  p.side_size = ns;
  return p;
}

void LshTables::commit(Pending&& p) noexcept {
  if (p.main) {
    set_main(std::move(p.m));
  } else if (p.side_size >= 0) {
    side_ = std::move(p.side);
    side_size_ = p.side_size;
  }
}

void LshTables::compact_if_large() noexcept {
  if (side_size_ <= std::max(kSideMin, main_size_ / 8)) return;
  try {
    compact();
  } catch (const std::bad_alloc&) {
  }
}

void LshTables::insert(const std::uint16_t* codes, std::int64_t n) {
  commit(prepare_insert(codes, n));
  compact_if_large();
}

void LshTables::compact() {
  if (side_size_ == 0) return;
  const std::size_t nb = bucket_count(), L = static_cast<std::size_t>(L_);
  const std::int64_t n = main_size_ + side_size_;
  const bool wide = n >= 65536;
  Vec<std::uint32_t> offsets(L * (nb + 1));
  Vec<std::uint16_t> idx16;
  Vec<std::uint32_t> idx32;
  if (wide)
    idx32.resize(L * static_cast<std::size_t>(n));
  else
    idx16.resize(L * static_cast<std::size_t>(n));
  for (std::size_t l = 0; l < L; ++l) {
    const std::uint32_t* off = offsets_.data() + l * (nb + 1);
    const std::uint64_t* s = side_.data() + l * static_cast<std::size_t>(side_size_);
    const std::uint64_t* send = s + side_size_;
    std::uint32_t* noff = offsets.data() + l * (nb + 1);
    const std::size_t src = l * static_cast<std::size_t>(main_size_);
    const std::size_t dst = l * static_cast<std::size_t>(n);
    std::uint32_t at = 0;
    noff[0] = 0;
    for (std::size_t c = 0; c < nb; ++c) {
      // Main positions of the bucket, then the (later) side ones: still ascending.
      for (std::uint32_t i = off[c]; i < off[c + 1]; ++i) {
        const std::uint32_t p = wide_ ? idx32_[src + i] : idx16_[src + i];
        if (wide)
          idx32[dst + at++] = p;
        else
          idx16[dst + at++] = static_cast<std::uint16_t>(p);
      }
      for (; s < send && (*s >> 32) == c; ++s) {
        const auto p = static_cast<std::uint32_t>(*s);
        if (wide)
          idx32[dst + at++] = p;
        else
          idx16[dst + at++] = static_cast<std::uint16_t>(p);
      }
      noff[c + 1] = at;
    }
  }
  offsets_ = std::move(offsets);
  idx16_ = std::move(idx16);
  idx32_ = std::move(idx32);
  wide_ = wide;
  main_size_ = n;
  side_.clear();
  side_.shrink_to_fit();
  side_size_ = 0;
}

std::size_t LshTables::bytes() const noexcept {
  return offsets_.size() * sizeof(std::uint32_t) + idx16_.size() * sizeof(std::uint16_t) +
         idx32_.size() * sizeof(std::uint32_t) + side_.size() * sizeof(std::uint64_t);
}

}  // namespace hattn::cpu
