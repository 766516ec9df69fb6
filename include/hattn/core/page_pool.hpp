#pragma once
// HostPagePool: an owner of paged KV memory on the host. Allocates fixed-size
// pages from one pool, appends tokens to sequences, releases sequences, and
// builds the CSR page table a batch of sequences needs. Move-only.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "hattn/core/dtype.hpp"
#include "hattn/core/kv_view.hpp"
#include "hattn/core/status.hpp"

namespace hattn {

struct PagePoolOptions {
  DType dtype = DType::kBF16;
  std::int32_t num_kv_heads = 0;
  std::int32_t head_dim = 0;
  std::int32_t page_size = 16;
  std::int64_t num_pages = 0;
  KvLayout layout = KvLayout::kHND;
  // Touch every page at construction, so no decode step pays the page faults
  // (a huge page first touched mid-decode costs milliseconds: zeroing, and
  // compaction when the kernel must assemble one). Memory is then committed
  // up front, as a preallocated KV cache is.
  bool prefault = false;
};

// The host-side page table of one batch, in the layout PagedKvView reads.
struct PageTable {
  std::vector<std::int32_t> indptr;
  std::vector<std::int32_t> indices;
  std::vector<std::int32_t> last_page_len;
};

class HostPagePool {
 public:
  using SeqId = std::int32_t;

  // Throws std::invalid_argument for a bad shape, std::length_error when the
  // pool's size overflows size_t, std::bad_alloc when the memory cannot be had.
  explicit HostPagePool(const PagePoolOptions& options);
  ~HostPagePool();
  HostPagePool(HostPagePool&&) noexcept;
  HostPagePool& operator=(HostPagePool&&) noexcept;
  HostPagePool(const HostPagePool&) = delete;
  HostPagePool& operator=(const HostPagePool&) = delete;

  const PagePoolOptions& options() const noexcept { return opt_; }
  std::int64_t free_pages() const noexcept { return static_cast<std::int64_t>(free_.size()); }
  std::size_t page_bytes() const noexcept;  // bytes of one page of K (same for V)

  // A new empty sequence.
  Status create_sequence(SeqId* id);
  // Append n tokens. k and v are [n][num_kv_heads][head_dim] in the pool's
  // dtype, with `src_token_stride` elements between tokens (0 = packed; else
  // at least num_kv_heads * head_dim). All or nothing: when the pool lacks
  // pages, nothing changes (kOutOfMemory).
  Status append(SeqId id, const void* k, const void* v, std::int64_t n,
                std::int64_t src_token_stride = 0);
  // Drop the tokens from `len` on (0 <= len <= seq_len), returning the
  // pages no longer used. Cannot fail for a live sequence and a valid len:
  // undoes an append when a caller's later step fails.
  Status truncate(SeqId id, std::int64_t len) noexcept;
  // Return the sequence's pages to the pool (never allocates).
  Status release(SeqId id) noexcept;
  // Length of a live sequence, or -1 for an unknown id.
  std::int64_t seq_len(SeqId id) const noexcept;

  // Page table of a batch, and the view that reads it (valid while both live
  // and the sequences are not modified).
  Status build_page_table(std::span<const SeqId> seqs, PageTable* table) const;
  PagedKvView view(const PageTable& table) const noexcept;

  // Raw pool memory (page-major), for filling benchmarks quickly.
  void* k_data() noexcept { return k_.get(); }
  void* v_data() noexcept { return v_.get(); }

 private:
  struct Seq {
    std::vector<std::int32_t> pages;
    std::int64_t len = 0;
    bool live = false;
  };
  struct FreeDeleter {
    void operator()(std::byte* p) const noexcept;
  };
  PagePoolOptions opt_;
  KvStrides strides_{};
  std::unique_ptr<std::byte[], FreeDeleter> k_;
  std::unique_ptr<std::byte[], FreeDeleter> v_;
  std::vector<std::int32_t> free_;  // stack of free pages
  std::vector<Seq> seqs_;
};

}  // namespace hattn
