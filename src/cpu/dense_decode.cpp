#include "hattn/cpu/dense_decode.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "cpu/attend.hpp"
#include "hattn/core/validate.hpp"
#include "hattn/detail/kv_rows.hpp"

namespace hattn::cpu {

namespace {

constexpr float kLog2e = 1.4426950408889634f;
// Largest supported head dim: sizes the per-item stack buffers.
constexpr std::int32_t kMaxHeadDim = [] {
  std::int32_t m = 0;
  for_each_value<SupportedHeadDims>([&](auto d) { m = std::max<std::int32_t>(m, d.value); });
  return m;
}();
constexpr std::int64_t kRowsPerCall = 256;  // rows handed to a kernel at once
constexpr std::int64_t kDenseVisit = 64;    // visit of a dense view with contiguous rows

// Rows of one KV head the kernel walks before the next head
// (detail::AttendArgs::visit): a whole page when each head's rows are
// contiguous within it (HND pages of 16..256 tokens, a multiple of 16 that
// divides a kernel call), 64 rows of a dense view whose rows are contiguous;
// otherwise 0: one block of every head at a time. Chunks start at multiples
// of it, so visits start at page boundaries. (docs/cpu-dense.md: with 64-token
// pages, before the kernels prefetched, one thread read 13.9 GB/s this way
// against 8.0 block by block. A 16-token page is one AVX-512 block, so there
// it changes nothing; AVX2's 8-row blocks read it in two visits of each head
// otherwise, which reloads every head's state twice: one thread on Zen 3,
// from memory, 95.5 -> 73.2 ns per KV head-row.)
template <KvView Kv>
std::int32_t visit_rows(const Kv& kv) noexcept {
  const bool contiguous = kv.k_strides.token == kv.head_dim && kv.v_strides.token == kv.head_dim;
  std::int64_t run = kDenseVisit;
  if constexpr (std::is_same_v<Kv, PagedKvView>) run = kv.page_size;
  if (!contiguous || run < 16 || run % 16 != 0 || kRowsPerCall % run != 0) return 0;
  return static_cast<std::int32_t>(run);
}

constexpr std::size_t align_up(std::size_t x, std::size_t a) noexcept {
  return (x + a - 1) / a * a;
}

std::int64_t max_items(const DecodeProblem& p) noexcept {
  return std::int64_t{p.batch_size} + DenseDecode::kTargetItems;
}

// Plan stamps, one counter for every view type (plan() is a template).
std::atomic<std::uint64_t> g_next_stamp{1};

// Carves the workspace.
struct Layout {
  std::size_t stamp, items, merges, seq_lens, slot_o, slot_m, slot_l, total;
  bool overflow = false;  // the sizes do not fit a size_t: no workspace can hold them
  explicit Layout(const DecodeProblem& p) noexcept {
    const auto n = static_cast<std::size_t>(max_items(p));
    const auto B = static_cast<std::size_t>(p.batch_size);
    const auto H = static_cast<std::size_t>(p.num_q_heads);
    const auto D = static_cast<std::size_t>(p.head_dim);
    // Each array below 2^56 bytes, so the sums of offsets cannot wrap.
    constexpr std::size_t kMaxBytes = std::size_t{1} << 56;
    auto bytes = [&](std::initializer_list<std::size_t> factors) {
      std::size_t r = 1;
      for (const std::size_t f : factors)
        if (__builtin_mul_overflow(r, f, &r) || r > kMaxBytes) {
          overflow = true;
          return std::size_t{0};
        }
      return r;
    };
    std::size_t off = 0;
    auto take = [&](std::size_t size) {
      const std::size_t at = off;
      off = align_up(off + size, 64);
      return at;
    };
    stamp = take(sizeof(std::uint64_t));
    items = take(bytes({n, sizeof(detail::WorkItem)}));
    merges = take(bytes({B, static_cast<std::size_t>(p.num_kv_heads), sizeof(detail::MergeItem)}));
    seq_lens = take(bytes({B, sizeof(std::int64_t)}));
    slot_o = take(bytes({n, H, D, sizeof(float)}));
    slot_m = take(bytes({n, H, sizeof(float)}));
    slot_l = take(bytes({n, H, sizeof(float)}));
    total = off + 64;  // room to align the base
  }
};

}  // namespace

DenseDecode::DenseDecode(CpuIsa isa, Precision precision) noexcept
    : isa_(cpu_isa_available(isa) ? isa : cpu_isa_supported()), precision_(precision) {}

bool DenseDecode::uses_bf16_products(DType kv_dtype) const noexcept {
  return precision_ == Precision::kBf16Products && kv_dtype == DType::kBF16 &&
         isa_ == CpuIsa::kAvx512 && cpu_has_avx512_bf16();
}

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
  if (Layout(p).overflow)
    return {StatusCode::kNotSupported, "problem too large: its workspace size overflows"};
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
  // A plan made later in the same workspace overwrites this one's arrays:
  // the stamp lets run() refuse the older plan.
  pl.stamp = g_next_stamp.fetch_add(1, std::memory_order_relaxed);
  pl.stamp_at = reinterpret_cast<std::uint64_t*>(base + lay.stamp);
  *pl.stamp_at = pl.stamp;
  pl.items = reinterpret_cast<detail::WorkItem*>(base + lay.items);
  pl.merges = reinterpret_cast<detail::MergeItem*>(base + lay.merges);
  pl.seq_lens = reinterpret_cast<std::int64_t*>(base + lay.seq_lens);
  pl.slot_o = reinterpret_cast<float*>(base + lay.slot_o);
  pl.slot_m = reinterpret_cast<float*>(base + lay.slot_m);
  pl.slot_l = reinterpret_cast<float*>(base + lay.slot_l);

  const std::int32_t B = p.batch_size, Hk = p.num_kv_heads;
  for (std::int32_t b = 0; b < B; ++b) {
    pl.seq_lens[b] = kv.seq_len(b);
    pl.total_tokens += pl.seq_lens[b];
  }
  // Chunk size from the lengths alone (never the thread count), so the
  // decomposition, and with it every rounding, is the same on any machine.
  const std::int64_t want = (pl.total_tokens + kTargetItems - 1) / kTargetItems;
  const std::int64_t align = std::max<std::int64_t>(16, visit_rows(kv));  // divides 512
  pl.chunk_tokens = std::max<std::int64_t>(kMinChunkTokens, (want + align - 1) / align * align);

  for (std::int32_t b = 0; b < B; ++b) {
    const std::int64_t len = pl.seq_lens[b];
    std::int64_t nc = std::max<std::int64_t>(1, (len + pl.chunk_tokens - 1) / pl.chunk_tokens);
    const std::int64_t chunk = (((len + nc - 1) / nc) + align - 1) / align * align;
    if (len > 0) nc = (len + chunk - 1) / chunk;
    if (nc > 1)
      for (std::int32_t h = 0; h < Hk; ++h)
        pl.merges[pl.num_merges++] = {b, h, static_cast<std::int32_t>(nc), pl.num_items};
    for (std::int64_t c = 0; c < nc; ++c) {
      const std::int64_t begin = c * chunk;
      pl.items[pl.num_items] = {b, static_cast<std::int32_t>(nc), begin,
                                std::min(len, begin + chunk), pl.num_items};
      ++pl.num_items;
    }
  }
  *out = pl;
  return Status::ok();
}

namespace {

// Row conversions with the dtype switch out of the element loop.
template <class F>
void visit_dtype(DType t, F&& f) {
  switch (t) {
    case DType::kF32: f(float{}); break;
    case DType::kF16: f(f16{}); break;
    case DType::kBF16: f(bf16{}); break;
  }
}

// dst[i] = base[off + idx[i]] * scale, i < n.
void gather_row(const void* base, DType t, std::int64_t off, const std::int32_t* idx, float scale,
                float* dst, std::int32_t n) noexcept {
  visit_dtype(t, [&](auto tag) {
    const auto* p = static_cast<const decltype(tag)*>(base) + off;
    for (std::int32_t i = 0; i < n; ++i) dst[i] = to_float(p[idx[i]]) * scale;
  });
}

// base[off + i] = src[i], i < n, rounded to the dtype.
void store_row(void* base, DType t, std::int64_t off, const float* src, std::int32_t n) noexcept {
  visit_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    auto* p = static_cast<T*>(base) + off;
    for (std::int32_t i = 0; i < n; ++i) p[i] = from_float<T>(src[i]);
  });
}

// What every work item of a run() shares.
struct RunContext {
  const DecodePlan* plan;
  const QueryView* q;
  const PartialView* out;
  detail::Kernel kernel;
  std::int32_t natural[kMaxHeadDim];    // natural index of each kernel-order accumulator element
  std::int32_t q_natural[kMaxHeadDim];  // the same for q
};

template <KvView Kv>
void attend_item(const detail::WorkItem& it, const RunContext& ctx, const Kv& kv) noexcept {
  const DecodePlan& pl = *ctx.plan;
  const QueryView& q = *ctx.q;
  const PartialView& out = *ctx.out;
  const std::int32_t* natural = ctx.natural;
  const DecodeProblem& p = pl.problem;
  const std::int32_t G = p.group_size(), D = p.head_dim, Hk = p.num_kv_heads;
  const float qscale = p.scale() * kLog2e;
  const std::size_t es = size_of(p.kv_dtype);
  float* slot_o = pl.slot_o + it.slot * p.num_q_heads * D;
  float* slot_m = pl.slot_m + it.slot * p.num_q_heads;
  float* slot_l = pl.slot_l + it.slot * p.num_q_heads;
  alignas(64) float qk[detail::kMaxHeadsPerPass * kMaxHeadDim];
  const std::byte* krows[kRowsPerCall];
  const std::byte* vrows[kRowsPerCall];

  // Passes: groups of up to 16 query heads, as many KV heads as fit in 64.
  const std::int32_t gp_max = std::min(G, kMaxGroupPerPass);
  const std::int32_t nh_max = G <= kMaxGroupPerPass ? std::max(1, detail::kMaxHeadsPerPass / G) : 1;
  for (std::int32_t h0 = 0; h0 < Hk; h0 += nh_max) {
    const std::int32_t nh = std::min(nh_max, Hk - h0);
    for (std::int32_t g0 = 0; g0 < G; g0 += gp_max) {
      const std::int32_t gp = std::min(gp_max, G - g0);
      // With nh > 1 the pass covers whole groups (gp == G): heads are contiguous.
      const std::int32_t first = h0 * G + g0;
      for (std::int32_t j = 0; j < nh; ++j)
        for (std::int32_t g = 0; g < gp; ++g) {
          const std::int32_t qh = (h0 + j) * G + g0 + g;
          const std::int64_t qoff = it.batch * q.stride_batch + qh * q.stride_head;
          gather_row(q.data, q.dtype, qoff, ctx.q_natural, qscale, qk + (j * gp + g) * D, D);
        }
      std::fill_n(slot_m + first, nh * gp, -std::numeric_limits<float>::infinity());
      std::fill_n(slot_l + first, nh * gp, 0.0f);
      std::fill_n(slot_o + std::int64_t{first} * D, std::int64_t{nh} * gp * D, 0.0f);

      std::int64_t remaining = it.end - it.begin;
      if (remaining == 0) continue;
      hattn::detail::RowCursor<Kv> cursor(kv, it.batch, h0, it.begin);
      detail::AttendArgs args{qk,
                              slot_o + std::int64_t{first} * D,
                              slot_m + first,
                              slot_l + first,
                              nh,
                              gp,
                              krows,
                              vrows,
                              static_cast<std::ptrdiff_t>(kv.k_strides.head * es),
                              static_cast<std::ptrdiff_t>(kv.v_strides.head * es),
                              0};
      args.visit = visit_rows(kv);
      while (remaining > 0) {
        const std::int64_t n = std::min(kRowsPerCall, remaining);
        cursor.next(static_cast<std::int32_t>(n), krows, vrows);
        args.n = static_cast<std::int32_t>(n);
        ctx.kernel.attend(args);
        remaining -= n;
      }
    }
  }

  // Normalize. A split sequence keeps (o in natural order, lse2) in its slot
  // for the merge; an unsplit one writes the output directly.
  float tmp[kMaxHeadDim];
  for (std::int32_t qh = 0; qh < p.num_q_heads; ++qh) {
    const float l = slot_l[qh];
    const bool empty = l == 0.0f;
    const float inv = empty ? 0.0f : 1.0f / l;
    const float lse = empty ? -std::numeric_limits<float>::infinity() : slot_m[qh] + std::log2(l);
    float* acc = slot_o + std::int64_t{qh} * D;
    for (std::int32_t i = 0; i < D; ++i) tmp[natural[i]] = acc[i] * inv;
    if (it.num_chunks > 1) {
      std::copy_n(tmp, D, acc);
      slot_m[qh] = lse;  // the merge reads lse2 from here
    } else {
      const std::int64_t ooff = it.batch * out.stride_batch + qh * out.stride_head;
      store_row(out.o, out.dtype, ooff, tmp, D);
      out.lse2[it.batch * out.lse_stride_batch + qh] = lse;
    }
  }
}

// Merges the chunk partials of one (sequence, KV head) in chunk order (fixed:
// deterministic).
void merge_item(const detail::MergeItem& mi, const DecodePlan& pl,
                const PartialView& out) noexcept {
  const std::int32_t G = pl.problem.group_size(), D = pl.problem.head_dim;
  const std::int64_t H = pl.problem.num_q_heads;
  float w[DenseDecode::kTargetItems + 1];  // chunks per sequence never exceed this
  float o[kMaxHeadDim];
  for (std::int32_t g = 0; g < G; ++g) {
    const std::int32_t qh = mi.kv_head * G + g;
    auto lse_of = [&](std::int32_t c) { return pl.slot_m[(mi.first_slot + c) * H + qh]; };
    float mx = -std::numeric_limits<float>::infinity();
    for (std::int32_t c = 0; c < mi.num_chunks; ++c) mx = std::max(mx, lse_of(c));
    float sum = 0.0f;
    for (std::int32_t c = 0; c < mi.num_chunks; ++c) {
      w[c] = std::exp2(lse_of(c) - mx);
      sum += w[c];
    }
    const float inv = 1.0f / sum;
    std::fill_n(o, D, 0.0f);
    for (std::int32_t c = 0; c < mi.num_chunks; ++c) {
      const float* part = pl.slot_o + ((mi.first_slot + c) * H + qh) * D;
      for (std::int32_t d = 0; d < D; ++d) o[d] += w[c] * part[d];
    }
    for (std::int32_t d = 0; d < D; ++d) o[d] *= inv;
    store_row(out.o, out.dtype, mi.batch * out.stride_batch + qh * out.stride_head, o, D);
    out.lse2[mi.batch * out.lse_stride_batch + qh] = mx + std::log2(sum);
  }
}

}  // namespace

template <KvView Kv>
Status DenseDecode::run(const DecodePlan& pl, const QueryView& q, const Kv& kv,
                        const PartialView& out, const CpuExecutor& executor) const noexcept {
  const DecodeProblem& p = pl.problem;
  if (pl.items == nullptr || pl.stamp_at == nullptr)
    return {StatusCode::kInvalidArgument, "run: plan was not made"};
  if (*pl.stamp_at != pl.stamp)
    return {StatusCode::kInvalidArgument,
            "run: the plan's workspace was planned again or overwritten since this plan was made"};
  HATTN_RETURN_IF_ERROR(validate(p, q));
  HATTN_RETURN_IF_ERROR(validate(p, out));
  HATTN_RETURN_IF_ERROR(validate(p, kv));
  for (std::int32_t b = 0; b < p.batch_size; ++b)
    if (kv.seq_len(b) != pl.seq_lens[b])
      return {StatusCode::kInvalidArgument, "run: sequence lengths differ from the plan's"};
  RunContext ctx{
      &pl,  &q,
      &out, detail::kernel_for(isa_, p.head_dim, p.kv_dtype, uses_bf16_products(p.kv_dtype)),
      {},   {}};
  if (ctx.kernel.attend == nullptr)
    return {StatusCode::kInternal, "no kernel for this configuration"};
  for (std::int32_t i = 0; i < p.head_dim; ++i) {
    ctx.natural[i] = detail::natural_index(i, ctx.kernel.acc_order, ctx.kernel.order_block);
    ctx.q_natural[i] = detail::natural_index(i, ctx.kernel.q_order, ctx.kernel.order_block);
  }

  // The items do not throw; TBB may (std::bad_alloc for its tasks).
  HATTN_RETURN_IF_ERROR(executor.try_parallel_for(
      pl.num_items, [&](std::int64_t i) { attend_item(pl.items[i], ctx, kv); }));
  return executor.try_parallel_for(pl.num_merges,
                                   [&](std::int64_t i) { merge_item(pl.merges[i], pl, out); });
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
