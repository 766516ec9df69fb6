#include "hattn/cpu/dense_decode.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/attend.hpp"
#include "hattn/core/validate.hpp"
#include "hattn/detail/kv_rows.hpp"

namespace hattn::cpu {

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr std::int64_t kRowsPerCall = 256;  // rows handed to a kernel at once
constexpr std::int64_t kRowsAhead = 64;     // further rows it may prefetch

constexpr std::size_t align_up(std::size_t x, std::size_t a) noexcept {
  return (x + a - 1) / a * a;
}

std::int64_t max_items(const DecodeProblem& p) noexcept {
  return std::int64_t{p.batch_size} * p.num_kv_heads + DenseDecode::kTargetItems;
}

// Carves the workspace; with base == nullptr only computes the size.
struct Layout {
  std::size_t items, merges, seq_lens, partial_o, partial_lse, total;
  explicit Layout(const DecodeProblem& p) noexcept {
    const auto n = static_cast<std::size_t>(max_items(p));
    const auto G = static_cast<std::size_t>(p.group_size());
    const auto D = static_cast<std::size_t>(p.head_dim);
    std::size_t off = 0;
    auto take = [&](std::size_t bytes) {
      const std::size_t at = off;
      off = align_up(off + bytes, 64);
      return at;
    };
    items = take(n * sizeof(detail::WorkItem));
    merges =
        take(static_cast<std::size_t>(p.batch_size) * p.num_kv_heads * sizeof(detail::MergeItem));
    seq_lens = take(static_cast<std::size_t>(p.batch_size) * sizeof(std::int64_t));
    partial_o = take(n * G * D * sizeof(float));
    partial_lse = take(n * G * sizeof(float));
    total = off + 64;  // room to align the base
  }
};

}  // namespace

DenseDecode::DenseDecode(CpuIsa isa) noexcept
    : isa_(cpu_isa_available(isa) ? isa : cpu_isa_supported()) {}

Status DenseDecode::can_implement(const DecodeProblem& p) noexcept {
  HATTN_RETURN_IF_ERROR(validate(p));
  if (!contains<SupportedHeadDims>(p.head_dim))
    return {StatusCode::kNotSupported, "head_dim is not supported (64, 128, 256)"};
  if (!contains<SupportedKvDTypes>(p.kv_dtype))
    return {StatusCode::kNotSupported, "KV dtype is not supported"};
  if (!contains<SupportedQueryDTypes>(p.q_dtype))
    return {StatusCode::kNotSupported, "query dtype is not supported"};
  if (!contains<SupportedOutDTypes>(p.o_dtype))
    return {StatusCode::kNotSupported, "output dtype is not supported"};
  return Status::ok();
}

std::size_t DenseDecode::workspace_size(const DecodeProblem& p) noexcept {
  if (!can_implement(p)) return 0;
  return Layout(p).total;
}

template <KvView Kv>
Status DenseDecode::plan(const DecodeProblem& p, const Kv& kv, void* workspace,
                         std::size_t workspace_bytes, DecodePlan* out) const noexcept {
  HATTN_RETURN_IF_ERROR(can_implement(p));
  HATTN_RETURN_IF_ERROR(validate(p, kv));
  if (out == nullptr) return {StatusCode::kInvalidArgument, "plan: output plan is null"};
  const Layout lay(p);
  if (workspace_bytes < lay.total)
    return {StatusCode::kWorkspaceTooSmall, "workspace is smaller than workspace_size()"};
  if (workspace == nullptr) return {StatusCode::kInvalidArgument, "workspace is null"};
  auto* base =
      reinterpret_cast<std::byte*>(align_up(reinterpret_cast<std::uintptr_t>(workspace), 64));

  DecodePlan pl;
  pl.problem = p;
  pl.items = reinterpret_cast<detail::WorkItem*>(base + lay.items);
  pl.merges = reinterpret_cast<detail::MergeItem*>(base + lay.merges);
  pl.seq_lens = reinterpret_cast<std::int64_t*>(base + lay.seq_lens);
  pl.partial_o = reinterpret_cast<float*>(base + lay.partial_o);
  pl.partial_lse = reinterpret_cast<float*>(base + lay.partial_lse);

  const std::int32_t B = p.batch_size, Hk = p.num_kv_heads;
  for (std::int32_t b = 0; b < B; ++b) {
    pl.seq_lens[b] = kv.seq_len(b);
    pl.total_tokens += pl.seq_lens[b];
  }
  // Chunk size from the lengths alone (never the thread count), so the
  // decomposition, and with it every rounding, is the same on any machine.
  const std::int64_t want = (pl.total_tokens * Hk + kTargetItems - 1) / kTargetItems;
  pl.chunk_tokens = std::max<std::int64_t>(kMinChunkTokens, (want + 15) / 16 * 16);

  for (std::int32_t b = 0; b < B; ++b) {
    const std::int64_t len = pl.seq_lens[b];
    std::int64_t nc = std::max<std::int64_t>(1, (len + pl.chunk_tokens - 1) / pl.chunk_tokens);
    const std::int64_t chunk = (((len + nc - 1) / nc) + 15) / 16 * 16;
    if (len > 0) nc = (len + chunk - 1) / chunk;
    for (std::int32_t h = 0; h < Hk; ++h) {
      if (nc > 1) pl.merges[pl.num_merges++] = {b, h, static_cast<std::int32_t>(nc), pl.num_items};
      for (std::int64_t c = 0; c < nc; ++c) {
        const std::int64_t begin = c * chunk;
        pl.items[pl.num_items] = {b,
                                  h,
                                  static_cast<std::int32_t>(c),
                                  static_cast<std::int32_t>(nc),
                                  begin,
                                  std::min(len, begin + chunk),
                                  pl.num_items};
        ++pl.num_items;
      }
    }
  }
  *out = pl;
  return Status::ok();
}

namespace {

template <KvView Kv>
void attend_item(const detail::WorkItem& it, const DecodePlan& pl, const QueryView& q, const Kv& kv,
                 const PartialView& out, const detail::Kernel& kernel) noexcept {
  const DecodeProblem& p = pl.problem;
  const std::int32_t G = p.group_size(), D = p.head_dim;
  const float qscale = p.scale() * kLog2e;
  alignas(64) float qk[kMaxGroupPerPass * 256];
  alignas(64) float acc[kMaxGroupPerPass * 256];
  float m[kMaxGroupPerPass], l[kMaxGroupPerPass];
  const std::byte* krows[kRowsPerCall + kRowsAhead];
  const std::byte* vrows[kRowsPerCall + kRowsAhead];

  for (std::int32_t g0 = 0; g0 < G; g0 += kMaxGroupPerPass) {
    const std::int32_t gp = std::min(kMaxGroupPerPass, G - g0);
    for (std::int32_t h = 0; h < gp; ++h) {
      const std::int64_t qoff =
          it.batch * q.stride_batch + (it.kv_head * G + g0 + h) * q.stride_head;
      for (std::int32_t i = 0; i < D; ++i)
        qk[h * D + i] =
            load_as_float(q.data, q.dtype, qoff + detail::natural_index(i, kernel.perm_block)) *
            qscale;
      m[h] = -std::numeric_limits<float>::infinity();
      l[h] = 0.0f;
    }
    std::memset(acc, 0, sizeof(float) * static_cast<std::size_t>(gp) * D);

    std::int64_t remaining = it.end - it.begin;
    if (remaining > 0) {
      hattn::detail::RowCursor<Kv> cursor(kv, it.batch, it.kv_head, it.begin);
      std::int64_t filled = std::min(remaining, kRowsPerCall + kRowsAhead);
      cursor.next(static_cast<std::int32_t>(filled), krows, vrows);
      while (remaining > 0) {
        const std::int64_t n = std::min(kRowsPerCall, remaining);
        const detail::AttendArgs args{qk,
                                      gp,
                                      krows,
                                      vrows,
                                      static_cast<std::int32_t>(n),
                                      static_cast<std::int32_t>(filled - n),
                                      m,
                                      l,
                                      acc};
        kernel.attend(args);
        remaining -= n;
        filled -= n;
        std::memmove(krows, krows + n, sizeof(krows[0]) * static_cast<std::size_t>(filled));
        std::memmove(vrows, vrows + n, sizeof(vrows[0]) * static_cast<std::size_t>(filled));
        const std::int64_t more = std::min(kRowsPerCall + kRowsAhead - filled, remaining - filled);
        if (more > 0) {
          cursor.next(static_cast<std::int32_t>(more), krows + filled, vrows + filled);
          filled += more;
        }
      }
    }

    for (std::int32_t h = 0; h < gp; ++h) {
      const std::int32_t qh = it.kv_head * G + g0 + h;
      const bool empty = l[h] == 0.0f;
      const float inv = empty ? 0.0f : 1.0f / l[h];
      const float lse = empty ? -std::numeric_limits<float>::infinity() : m[h] + std::log2(l[h]);
      if (it.num_chunks > 1) {
        float* po = pl.partial_o + (it.slot * G + g0 + h) * D;
        for (std::int32_t i = 0; i < D; ++i)
          po[detail::natural_index(i, kernel.perm_block)] = acc[h * D + i] * inv;
        pl.partial_lse[it.slot * G + g0 + h] = lse;
      } else {
        const std::int64_t ooff = it.batch * out.stride_batch + qh * out.stride_head;
        for (std::int32_t i = 0; i < D; ++i)
          store_from_float(out.o, out.dtype, ooff + detail::natural_index(i, kernel.perm_block),
                           acc[h * D + i] * inv);
        out.lse2[it.batch * out.lse_stride_batch + qh] = lse;
      }
    }
  }
}

// Merges a sequence's chunk partials in chunk order (fixed: deterministic).
void merge_item(const detail::MergeItem& mi, const DecodePlan& pl,
                const PartialView& out) noexcept {
  const std::int32_t G = pl.problem.group_size(), D = pl.problem.head_dim;
  float w[DenseDecode::kTargetItems + 1];  // chunks per sequence never exceed this
  for (std::int32_t g = 0; g < G; ++g) {
    const std::int32_t qh = mi.kv_head * G + g;
    float mx = -std::numeric_limits<float>::infinity();
    for (std::int32_t c = 0; c < mi.num_chunks; ++c)
      mx = std::max(mx, pl.partial_lse[(mi.first_slot + c) * G + g]);
    const std::int64_t ooff = mi.batch * out.stride_batch + qh * out.stride_head;
    float sum = 0.0f;
    for (std::int32_t c = 0; c < mi.num_chunks; ++c) {
      w[c] = std::exp2(pl.partial_lse[(mi.first_slot + c) * G + g] - mx);
      sum += w[c];
    }
    const float inv = 1.0f / sum;
    for (std::int32_t d = 0; d < D; ++d) {
      float o = 0.0f;
      for (std::int32_t c = 0; c < mi.num_chunks; ++c)
        o += w[c] * pl.partial_o[((mi.first_slot + c) * G + g) * D + d];
      store_from_float(out.o, out.dtype, ooff + d, o * inv);
    }
    out.lse2[mi.batch * out.lse_stride_batch + qh] = mx + std::log2(sum);
  }
}

}  // namespace

template <KvView Kv>
Status DenseDecode::run(const DecodePlan& pl, const QueryView& q, const Kv& kv,
                        const PartialView& out, const CpuExecutor& executor) const noexcept {
  const DecodeProblem& p = pl.problem;
  if (pl.items == nullptr) return {StatusCode::kInvalidArgument, "run: plan was not made"};
  HATTN_RETURN_IF_ERROR(validate(p, q));
  HATTN_RETURN_IF_ERROR(validate(p, out));
  HATTN_RETURN_IF_ERROR(validate(p, kv));
  for (std::int32_t b = 0; b < p.batch_size; ++b)
    if (kv.seq_len(b) != pl.seq_lens[b])
      return {StatusCode::kInvalidArgument, "run: sequence lengths differ from the plan's"};
  const detail::Kernel kernel = detail::kernel_for(isa_, p.head_dim, p.kv_dtype);
  if (kernel.attend == nullptr) return {StatusCode::kInternal, "no kernel for this configuration"};

  executor.parallel_for(pl.num_items,
                        [&](std::int64_t i) { attend_item(pl.items[i], pl, q, kv, out, kernel); });
  executor.parallel_for(pl.num_merges, [&](std::int64_t i) { merge_item(pl.merges[i], pl, out); });
  return Status::ok();
}

template Status DenseDecode::plan(const DecodeProblem&, const PagedKvView&, void*, std::size_t,
                                  DecodePlan*) const noexcept;
template Status DenseDecode::plan(const DecodeProblem&, const DenseKvView&, void*, std::size_t,
                                  DecodePlan*) const noexcept;
template Status DenseDecode::run(const DecodePlan&, const QueryView&, const PagedKvView&,
                                 const PartialView&, const CpuExecutor&) const noexcept;
template Status DenseDecode::run(const DecodePlan&, const QueryView&, const DenseKvView&,
                                 const PartialView&, const CpuExecutor&) const noexcept;

}  // namespace hattn::cpu
