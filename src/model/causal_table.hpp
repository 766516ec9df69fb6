#pragma once
// Causal prefill as a decode batch (internal): query i of a batch is a
// "sequence" made of the first pages of the real one, cut at its own
// position. The pages are shared, so this costs page-table entries, not
// copies.

#include <cstdint>

#include "hattn/core/page_pool.hpp"

namespace hattn::model::detail {

// `out` gets `count` rows over the pages of `whole` (one sequence, pages of
// `page` tokens): row i sees the first `first_visible + i` tokens.
inline void causal_prefix_table(const PageTable& whole, std::int32_t page,
                                std::int64_t first_visible, std::int32_t count, PageTable* out) {
  out->indptr.assign(1, 0);
  out->indices.clear();
  out->last_page_len.clear();
  for (std::int32_t i = 0; i < count; ++i) {
    const std::int64_t visible = first_visible + i;
    const std::int64_t pages = (visible + page - 1) / page;
    out->indices.insert(out->indices.end(), whole.indices.begin(), whole.indices.begin() + pages);
    out->indptr.push_back(static_cast<std::int32_t>(out->indices.size()));
    out->last_page_len.push_back(static_cast<std::int32_t>(visible - (pages - 1) * page));
  }
}

}  // namespace hattn::model::detail
