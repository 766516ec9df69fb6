#include "hattn/core/page_pool.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace hattn {

void HostPagePool::FreeDeleter::operator()(std::byte* p) const noexcept { std::free(p); }

namespace {
std::byte* alloc_pool(std::size_t bytes, bool prefault) {
  constexpr std::size_t kAlign = 2u << 20;  // 2 MiB: lets the kernel back it with huge pages
  if (bytes > SIZE_MAX - kAlign) throw std::bad_alloc();
  const std::size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
  void* p = std::aligned_alloc(kAlign, rounded == 0 ? kAlign : rounded);
  if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // Streaming the KV touches every byte once per step: fewer TLB misses help.
  (void)madvise(p, rounded, MADV_HUGEPAGE);
#endif
  if (prefault) std::memset(p, 0, rounded);
  return static_cast<std::byte*>(p);
}
}  // namespace

HostPagePool::HostPagePool(const PagePoolOptions& o) : opt_(o) {
  if (o.num_kv_heads <= 0 || o.head_dim <= 0 || o.page_size <= 0 || o.num_pages < 0)
    throw std::invalid_argument("HostPagePool: heads, head_dim and page_size must be positive");
  if (o.num_pages > INT32_MAX) throw std::invalid_argument("HostPagePool: too many pages");
  strides_ = packed_strides(o.layout, o.page_size, o.num_kv_heads, o.head_dim);
  // The pool's bytes, checked: a product that wraps would allocate a sliver
  // and hand out pages past its end.
  std::size_t bytes = size_of(o.dtype);
  for (const std::size_t f :
       {static_cast<std::size_t>(o.page_size), static_cast<std::size_t>(o.num_kv_heads),
        static_cast<std::size_t>(o.head_dim), static_cast<std::size_t>(o.num_pages)})
    if (__builtin_mul_overflow(bytes, f, &bytes))
      throw std::length_error("HostPagePool: the pool's size overflows");
  k_.reset(alloc_pool(bytes, o.prefault));
  v_.reset(alloc_pool(bytes, o.prefault));
  free_.resize(static_cast<std::size_t>(o.num_pages));
  // Hand out low page numbers first.
  for (std::int64_t i = 0; i < o.num_pages; ++i)
    free_[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(o.num_pages - 1 - i);
}

HostPagePool::~HostPagePool() = default;
HostPagePool::HostPagePool(HostPagePool&&) noexcept = default;
HostPagePool& HostPagePool::operator=(HostPagePool&&) noexcept = default;

std::size_t HostPagePool::page_bytes() const noexcept {
  return static_cast<std::size_t>(opt_.page_size) * opt_.num_kv_heads * opt_.head_dim *
         size_of(opt_.dtype);
}

Status HostPagePool::create_sequence(SeqId* id) {
  if (id == nullptr) return {StatusCode::kInvalidArgument, "create_sequence: id is null"};
  for (std::size_t i = 0; i < seqs_.size(); ++i)
    if (!seqs_[i].live) {
      seqs_[i] = Seq{{}, 0, true};
      *id = static_cast<SeqId>(i);
      return Status::ok();
    }
  try {
    seqs_.push_back(Seq{{}, 0, true});
  } catch (const std::bad_alloc&) {
    return {StatusCode::kOutOfMemory, "create_sequence: out of memory"};
  }
  *id = static_cast<SeqId>(seqs_.size() - 1);
  return Status::ok();
}

std::int64_t HostPagePool::seq_len(SeqId id) const noexcept {
  if (id < 0 || static_cast<std::size_t>(id) >= seqs_.size() || !seqs_[id].live) return -1;
  return seqs_[id].len;
}

Status HostPagePool::append(SeqId id, const void* k, const void* v, std::int64_t n,
                            std::int64_t src_token_stride) {
  if (seq_len(id) < 0) return {StatusCode::kInvalidArgument, "append: unknown sequence"};
  if (n < 0) return {StatusCode::kInvalidArgument, "append: negative token count"};
  if (n == 0) return Status::ok();
  if (k == nullptr || v == nullptr) return {StatusCode::kInvalidArgument, "append: k or v is null"};
  const std::int32_t H = opt_.num_kv_heads, D = opt_.head_dim;
  if (src_token_stride < 0 || (src_token_stride > 0 && src_token_stride < std::int64_t{H} * D))
    return {StatusCode::kInvalidArgument,
            "append: src_token_stride must be 0 (packed) or at least num_kv_heads * head_dim"};
  Seq& s = seqs_[id];
  const std::int64_t P = opt_.page_size;
  const std::int64_t have = static_cast<std::int64_t>(s.pages.size()) * P;
  // Room left, before any sum with n (which may be near INT64_MAX).
  if (n > (have - s.len) + free_pages() * P)
    return {StatusCode::kOutOfMemory, "append: the page pool has too few free pages"};
  const std::int64_t need_pages = (s.len + n - have + P - 1) / P;  // <= free_pages()
  try {
    s.pages.reserve(s.pages.size() +
                    static_cast<std::size_t>(std::max<std::int64_t>(need_pages, 0)));
  } catch (const std::bad_alloc&) {
    return {StatusCode::kOutOfMemory, "append: out of memory for the page list"};
  }
  for (std::int64_t i = 0; i < need_pages; ++i) {
    s.pages.push_back(free_.back());
    free_.pop_back();
  }
  const std::size_t es = size_of(opt_.dtype);
  const std::int64_t src_stride = src_token_stride == 0 ? std::int64_t{H} * D : src_token_stride;
  const auto* ks = static_cast<const std::byte*>(k);
  const auto* vs = static_cast<const std::byte*>(v);
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t t = s.len + i;
    const std::int64_t page = s.pages[static_cast<std::size_t>(t / P)];
    const std::int64_t off = t % P;
    for (std::int32_t h = 0; h < H; ++h) {
      const std::int64_t dst = page * strides_.outer + off * strides_.token + h * strides_.head;
      const std::int64_t src = i * src_stride + std::int64_t{h} * D;
      std::memcpy(k_.get() + dst * es, ks + src * es, D * es);
      std::memcpy(v_.get() + dst * es, vs + src * es, D * es);
    }
  }
  s.len += n;
  return Status::ok();
}

Status HostPagePool::truncate(SeqId id, std::int64_t len) noexcept {
  if (seq_len(id) < 0) return {StatusCode::kInvalidArgument, "truncate: unknown sequence"};
  Seq& s = seqs_[id];
  if (len < 0 || len > s.len)
    return {StatusCode::kInvalidArgument, "truncate: length outside 0..seq_len"};
  const std::int64_t P = opt_.page_size;
  const auto keep = static_cast<std::size_t>((len + P - 1) / P);
  // free_ was sized for every page at construction, so these push_backs
  // stay within its capacity and cannot throw.
  while (s.pages.size() > keep) {
    free_.push_back(s.pages.back());
    s.pages.pop_back();
  }
  s.len = len;
  return Status::ok();
}

Status HostPagePool::release(SeqId id) noexcept {
  if (seq_len(id) < 0) return {StatusCode::kInvalidArgument, "release: unknown sequence"};
  Seq& s = seqs_[id];
  // free_ has room for every page (see truncate).
  for (auto it = s.pages.rbegin(); it != s.pages.rend(); ++it) free_.push_back(*it);
  s = Seq{};
  return Status::ok();
}

Status HostPagePool::build_page_table(std::span<const SeqId> seqs, PageTable* table) const {
  if (table == nullptr) return {StatusCode::kInvalidArgument, "build_page_table: table is null"};
  for (SeqId id : seqs)
    if (seq_len(id) < 0)
      return {StatusCode::kInvalidArgument, "build_page_table: unknown sequence"};
  table->indptr.assign(1, 0);
  table->indices.clear();
  table->last_page_len.clear();
  for (SeqId id : seqs) {
    const Seq& s = seqs_[id];
    const std::int64_t used = (s.len + opt_.page_size - 1) / opt_.page_size;
    table->indices.insert(table->indices.end(), s.pages.begin(), s.pages.begin() + used);
    table->indptr.push_back(static_cast<std::int32_t>(table->indices.size()));
    table->last_page_len.push_back(
        s.len == 0 ? 0 : static_cast<std::int32_t>(s.len - (used - 1) * opt_.page_size));
  }
  return Status::ok();
}

PagedKvView HostPagePool::view(const PageTable& t) const noexcept {
  PagedKvView v;
  v.k = k_.get();
  v.v = v_.get();
  v.dtype = opt_.dtype;
  v.num_kv_heads = opt_.num_kv_heads;
  v.head_dim = opt_.head_dim;
  v.page_size = opt_.page_size;
  v.num_pages = opt_.num_pages;
  v.k_strides = strides_;
  v.v_strides = strides_;
  v.batch_size = static_cast<std::int32_t>(t.last_page_len.size());
  v.indptr = t.indptr.data();
  v.indices = t.indices.data();
  v.last_page_len = t.last_page_len.data();
  return v;
}

}  // namespace hattn
