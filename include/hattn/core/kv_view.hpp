#pragma once
// Non-owning views of a KV cache. Trivially copyable, passed by value.
//
// Paged: the layout vLLM and FlashInfer use. A CSR page table per batch:
// sequence b owns pages indices[indptr[b] .. indptr[b+1]), all full except the
// last, which holds last_page_len[b] tokens (1..page_size). Each page holds
// page_size tokens of every KV head, in NHD ([P][H][D]) or HND ([H][P][D])
// order; the strides below say where (in elements), so K and V may live in one
// interleaved pool or two, with any padding. Head-dim elements are contiguous.
//
// Dense: one contiguous [B][max_len][H][D]-like block per tensor with
// per-sequence lengths; the special case for engines without paging.

#include <cstdint>
#include <type_traits>

#include "hattn/core/dtype.hpp"

namespace hattn {

enum class KvLayout : std::uint8_t { kNHD, kHND };

// Element strides of one tensor. `outer` is the page stride (paged) or the
// sequence stride (dense).
struct KvStrides {
  std::int64_t outer = 0;
  std::int64_t token = 0;
  std::int64_t head = 0;
};

// Strides of a densely packed page (or sequence) of `tokens` tokens.
constexpr KvStrides packed_strides(KvLayout layout, std::int64_t tokens, std::int64_t num_heads,
                                   std::int64_t head_dim) noexcept {
  if (layout == KvLayout::kNHD)
    return {tokens * num_heads * head_dim, num_heads * head_dim, head_dim};
  return {tokens * num_heads * head_dim, head_dim, tokens * head_dim};
}

struct PagedKvView {
  const void* k = nullptr;
  const void* v = nullptr;
  DType dtype = DType::kBF16;
  std::int32_t num_kv_heads = 0;
  std::int32_t head_dim = 0;
  std::int32_t page_size = 0;
  std::int64_t num_pages = 0;  // pool capacity: every index must be < num_pages
  KvStrides k_strides{};
  KvStrides v_strides{};
  std::int32_t batch_size = 0;
  const std::int32_t* indptr = nullptr;         // [batch_size + 1]
  const std::int32_t* indices = nullptr;        // [indptr[batch_size]]
  const std::int32_t* last_page_len = nullptr;  // [batch_size]

  // Length of sequence b. Requires a validated view.
  constexpr std::int64_t seq_len(std::int32_t b) const noexcept {
    const std::int64_t pages = indptr[b + 1] - indptr[b];
    return pages == 0 ? 0 : (pages - 1) * page_size + last_page_len[b];
  }
};

struct DenseKvView {
  const void* k = nullptr;
  const void* v = nullptr;
  DType dtype = DType::kBF16;
  std::int32_t num_kv_heads = 0;
  std::int32_t head_dim = 0;
  std::int64_t max_seq_len = 0;  // capacity of each sequence: lengths must not exceed it
  KvStrides k_strides{};         // outer = stride between sequences
  KvStrides v_strides{};
  std::int32_t batch_size = 0;
  const std::int32_t* seq_lens = nullptr;  // [batch_size]

  constexpr std::int64_t seq_len(std::int32_t b) const noexcept { return seq_lens[b]; }
};

static_assert(std::is_trivially_copyable_v<PagedKvView>);
static_assert(std::is_trivially_copyable_v<DenseKvView>);

template <class T>
concept KvView = std::is_same_v<T, PagedKvView> || std::is_same_v<T, DenseKvView>;

}  // namespace hattn
