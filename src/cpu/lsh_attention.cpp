#include "hattn/cpu/lsh_attention.hpp"

#include <tbb/task_arena.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>

#include "cpu/attend.hpp"
#include "cpu/lsh_kernels.hpp"
#include "cpu/prefetch.hpp"
#include "hattn/core/merge.hpp"
#include "hattn/core/supported.hpp"
#include "hattn/core/validate.hpp"
#include "hattn/detail/kv_rows.hpp"
#include "hattn/detail/splitmix.hpp"

namespace hattn::cpu {

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr std::int32_t kCorrIntervals = 1 << 14;  // of the -ln(u + eps) table over [-1, 1]
constexpr std::int64_t kHashBlock = 256;          // rows centered and hashed at once

// f() as a Status that never throws: std::bad_alloc anywhere in it (its
// parallel items included: TBB passes their exceptions on) is kOutOfMemory.
template <class F>
Status status_of(F&& f) noexcept {
  return hattn::detail::status_of(std::forward<F>(f), "LshAttention: out of memory",
                                  "LshAttention: unexpected exception");
}

template <class F>
void visit_dtype(DType t, F&& f) {
  switch (t) {
    case DType::kF32: f(float{}); break;
    case DType::kF16: f(f16{}); break;
    case DType::kBF16: f(bf16{}); break;
  }
}

// dst[i] = row[i] (widened), i < D.
void widen_row(const std::byte* row, DType t, std::int32_t D, float* dst) noexcept {
  visit_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    for (std::int32_t i = 0; i < D; ++i) {
      T x;
      std::memcpy(&x, row + i * sizeof(T), sizeof(T));
      dst[i] = to_float(x);
    }
  });
}

// 64-byte aligned storage: the dense kernels load q and the accumulators aligned.
template <class T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <class U>
  Aligned64(const Aligned64<U>&) noexcept {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new (n * sizeof(T), std::align_val_t{64}));
  }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete (p, std::align_val_t{64}); }
  template <class U>
  bool operator==(const Aligned64<U>&) const noexcept {
    return true;
  }
};

}  // namespace

// Per-thread scratch of decode: collision counters and bitsets, the union of
// the sampled positions (when listed), row pointers, the bucket walk's
// bounds and the item's query and output buffers.
struct Scratch {
  // Per head g < head_cap, collision counts over the indexed positions: one
  // byte each as a thermometer code for m <= 8 (detail::ScanFn),
  // [head_cap][64 words]; else epoch << 8 | count in 16 bits, [head_cap][cap].
  std::vector<std::uint8_t, Aligned64<std::uint8_t>> marks;
  std::vector<std::uint16_t> counters;
  // Per head g < head_cap, the sampled positions (at least m collisions) as a
  // bitset, [head_cap][words].
  std::vector<std::uint64_t> hits;
  // From build_union(): the union over the pass's heads, ascending, and per
  // position a mask with bit g set when head g sampled it.
  std::vector<std::uint32_t> sampled;
  std::vector<std::uint16_t> umask;
  // With one head per pass, retrieve() also lists its sampled positions,
  // ascending: nlisted of them (room for n + 64).
  std::vector<std::uint32_t> listed;
  std::int32_t nlisted = 0;
  std::vector<const std::byte*> krows, vrows;
  std::vector<std::uint16_t> qcodes;         // [16][L]
  std::vector<std::uint32_t> ranges;         // [16 L][2]: bucket bounds of a walk
  std::vector<const std::uint32_t*> bounds;  // [16 L]: where each task's bounds are
  std::vector<const void*> pbase;            // [16 L]: each task's table positions
  // [16][D] each: queries in a kernel's order, accumulator, sampled and exact outputs.
  std::vector<float, Aligned64<float>> qd, acc, os, oe;
  float lse_e[kMaxGroupPerPass];             // the exact part's lse2 per head of the pass
  std::vector<float, Aligned64<float>> muk;  // [D]: the head's key mean in kernel order
  std::int64_t cap = 0;                      // positions the per-head arrays have room for
  std::int32_t head_cap = 0;                 // heads of a pass they have room for
  std::uint16_t epoch = 0;

  // Room for n indexed positions, exact_rows exact rows, head dim D, L tables,
  // the collision threshold m and passes of `heads` query heads (per-head
  // items: 1; the counts and bitsets are per head: 64 KiB of marks per head
  // at 64K positions).
  void reserve(std::int64_t n, std::int64_t exact_rows, std::int32_t D, std::int32_t L,
               std::int32_t m, std::int32_t heads) {
    // Every array is checked against its own need, and the ones laid out by
    // cap and head_cap are made aside and swapped in last, so a failed
    // allocation leaves the scratch consistent with cap and head_cap.
    const auto hd = static_cast<std::size_t>(kMaxGroupPerPass) * D;
    for (auto* v : {&qd, &acc, &os, &oe})
      if (v->size() < hd) v->resize(hd);
    if (muk.size() < static_cast<std::size_t>(D)) muk.resize(static_cast<std::size_t>(D));
    const auto hl = static_cast<std::size_t>(kMaxGroupPerPass) * L;
    if (qcodes.size() < hl) qcodes.resize(hl);
    if (ranges.size() < 2 * hl) ranges.resize(2 * hl);
    if (bounds.size() < hl) bounds.resize(hl);
    if (pbase.size() < hl) pbase.resize(hl);
    const auto rows = static_cast<std::size_t>(std::max(n, exact_rows));
    if (krows.size() < rows) krows.resize(rows);
    if (vrows.size() < rows) vrows.resize(rows);

    const std::int64_t new_cap = std::max(cap, n);
    const std::int32_t new_heads = std::max(head_cap, heads);
    const auto words = static_cast<std::size_t>((new_cap + 63) / 64);
    const auto ncap = static_cast<std::size_t>(new_cap);
    if (sampled.capacity() < ncap) sampled.reserve(ncap);
    if (listed.size() < ncap + 64) listed.resize(ncap + 64);
    if (umask.capacity() < ncap + detail::kLshPad) umask.reserve(ncap + detail::kLshPad);
    const bool regrow = new_cap != cap || new_heads != head_cap;
    const bool thermometer = m <= detail::kMaxThermometer;
    const auto need_marks = thermometer ? static_cast<std::size_t>(new_heads) * words * 64 : 0;
    const auto need_counters = thermometer ? 0 : static_cast<std::size_t>(new_heads) * ncap;
    const bool new_marks = regrow || marks.size() < need_marks;
    const bool new_counters = regrow || counters.size() < need_counters;
    decltype(hits) h;
    decltype(marks) mk;
    decltype(counters) ct;
    if (regrow) h.assign(static_cast<std::size_t>(new_heads) * words, 0);
    if (new_marks) mk.assign(need_marks, 0);
    if (new_counters) ct.assign(need_counters, 0);
    // Nothing below throws.
    if (regrow) hits.swap(h);
    if (new_marks) marks.swap(mk);
    if (new_counters) {
      counters.swap(ct);
      epoch = 0;
    }
    cap = new_cap;
    head_cap = new_heads;
  }
  // A fresh epoch: counters of older epochs read as zero.
  std::uint16_t next_epoch() noexcept {
    if (++epoch == 256) {
      std::fill(counters.begin(), counters.end(), std::uint16_t{0});
      epoch = 1;
    }
    return epoch;
  }
};

struct LshAttention::Seq {
  HostPagePool::SeqId pool_id = -1;
  std::int64_t length = 0;
  std::int64_t sink_end = 0;
  std::int64_t indexed_end = 0;   // the exact tail starts here
  bool centered = false;          // mu fixed
  std::vector<float> mu;          // [Hk][D]
  std::vector<LshTables> tables;  // [Hk]
  PageTable page_table;
  PagedKvView view{};  // this sequence alone (batch 1)

  std::int64_t indexed() const noexcept { return indexed_end - sink_end; }
};

struct LshAttention::Impl {
  std::vector<SimHash> proj;  // one (shared) or one per KV head
  HostPagePool pool;
  detail::Kernel sampled;  // the dense kernel with the LSH score transform
  detail::Kernel dense;
  detail::ScanFn scan = nullptr;  // retrieval's thermometer marks to bitsets
  std::vector<float> corr;        // -ln(u + eps) at cos = -1 + 2 i / kCorrIntervals
  std::vector<std::int32_t> lsh_natural, lsh_q_natural, dense_natural, dense_q_natural;
  std::vector<Scratch> scratch;
  // A step's queries as natural f32, and their sign bits (shared projection
  // only).
  std::vector<float, Aligned64<float>> step_q;  // [B Hq][D]
  std::vector<std::uint64_t> step_bits;         // [B Hq][words]
  // A step's exact partials (per-head items): o natural, normalized, and lse2.
  std::vector<float> step_oe;     // [B Hq][D]
  std::vector<float> step_lse_e;  // [B Hq]

  explicit Impl(const PagePoolOptions& o) : pool(o) {}
  const SimHash& proj_of(std::int32_t h) const noexcept {
    return proj.size() == 1 ? proj[0] : proj[static_cast<std::size_t>(h)];
  }
};

LshAttention::LshAttention(const LshConfig& config, const LshShape& shape, CpuIsa isa)
    : config_(config), shape_(shape), isa_(cpu_isa_available(isa) ? isa : cpu_isa_supported()) {}

LshAttention::~LshAttention() = default;

Status LshAttention::create(const LshConfig& config, const LshShape& s,
                            std::unique_ptr<LshAttention>* out, CpuIsa isa) {
  if (out == nullptr) return {StatusCode::kInvalidArgument, "LshAttention::create: out is null"};
  HATTN_RETURN_IF_ERROR(validate(config));
  if (s.num_q_heads <= 0 || s.num_kv_heads <= 0 || s.num_q_heads % s.num_kv_heads != 0)
    return {StatusCode::kInvalidArgument,
            "LshShape: num_q_heads must be a positive multiple of num_kv_heads"};
  if (!hattn::contains<SupportedHeadDims>(s.head_dim))
    return {StatusCode::kNotSupported, "LshShape: head_dim is not supported (64, 128, 256)"};
  if (!hattn::contains<SupportedKvDTypes>(s.kv_dtype))
    return {StatusCode::kNotSupported, "LshShape: KV dtype is not supported"};
  if (s.max_tokens <= 0 || s.max_sequences <= 0 || s.page_size <= 0)
    return {StatusCode::kInvalidArgument,
            "LshShape: max_tokens, max_sequences and page_size must be positive"};
  if (s.sm_scale && !(hattn::detail::scale_is_finite_in_base2(*s.sm_scale) && *s.sm_scale > 0.0f))
    return {StatusCode::kInvalidArgument,
            "LshShape: sm_scale must be positive, and finite times log2(e)"};
  // Pages for max_tokens plus a partial page per sequence, checked before
  // the sum so it cannot overflow (then it is at most 2^31 - 1).
  constexpr std::int64_t kMaxPages = std::numeric_limits<std::int32_t>::max();
  if (s.max_tokens / s.page_size > kMaxPages - 1 - s.max_sequences)
    return {StatusCode::kInvalidArgument,
            "LshShape: max_tokens / page_size + max_sequences exceeds 2^31 - 1 pages"};
  const std::int64_t pages = s.max_tokens / s.page_size + (s.max_tokens % s.page_size != 0) +
                             std::int64_t{s.max_sequences};

  std::unique_ptr<LshAttention> a(new LshAttention(config, s, isa));
  try {
    PagePoolOptions po;
    po.dtype = s.kv_dtype;
    po.num_kv_heads = s.num_kv_heads;
    po.head_dim = s.head_dim;
    po.page_size = s.page_size;
    po.num_pages = pages;
    po.layout = KvLayout::kHND;
    po.prefault = true;  // appends during decode must not pay first-touch faults
    try {
      a->impl_ = std::make_unique<Impl>(po);
    } catch (const std::length_error&) {
      return {StatusCode::kOutOfMemory, "LshAttention: the KV pool's size overflows"};
    } catch (const std::invalid_argument&) {
      return {StatusCode::kInvalidArgument, "LshAttention: the KV pool rejected the shape"};
    }
    Impl& im = *a->impl_;
    if (config.projection == LshConfig::Projection::kShared) {
      im.proj.emplace_back(s.head_dim, config.K, config.L, config.seed, a->isa_);
    } else {
      for (std::int32_t h = 0; h < s.num_kv_heads; ++h) {
        const std::uint64_t seed = hattn::detail::splitmix64(
            config.seed ^ hattn::detail::splitmix64((std::uint64_t(std::uint32_t(s.layer)) << 32) |
                                                    std::uint32_t(h)));
        im.proj.emplace_back(s.head_dim, config.K, config.L, seed, a->isa_);
      }
    }
    im.sampled = detail::lsh_kernel_for(a->isa_, s.head_dim, s.kv_dtype);
    im.scan = detail::lsh_scan_for(a->isa_);
    im.dense = detail::kernel_for(a->isa_, s.head_dim, s.kv_dtype, false);
    if (im.sampled.attend == nullptr || im.dense.attend == nullptr)
      return {StatusCode::kInternal, "LshAttention: no kernel for this configuration"};
    for (std::int32_t i = 0; i < s.head_dim; ++i) {
      im.lsh_natural.push_back(
          detail::natural_index(i, im.sampled.acc_order, im.sampled.order_block));
      im.lsh_q_natural.push_back(
          detail::natural_index(i, im.sampled.q_order, im.sampled.order_block));
      im.dense_natural.push_back(
          detail::natural_index(i, im.dense.acc_order, im.dense.order_block));
      im.dense_q_natural.push_back(
          detail::natural_index(i, im.dense.q_order, im.dense.order_block));
    }
    im.corr.resize(kCorrIntervals + 1);
    for (std::int32_t i = 0; i <= kCorrIntervals; ++i) {
      const double c = -1.0 + 2.0 * i / kCorrIntervals;
      const double u = lsh_sample_probability(c, config.K, config.L, config.min_collisions);
      im.corr[static_cast<std::size_t>(i)] = static_cast<float>(-std::log(u + double{config.eps}));
    }
  } catch (const std::bad_alloc&) {
    return {StatusCode::kOutOfMemory, "LshAttention: cannot allocate the KV pool"};
  } catch (const std::exception&) {
    return {StatusCode::kInvalidArgument, "LshAttention: invalid projection shape"};
  }
  *out = std::move(a);
  return Status::ok();
}

float LshAttention::score_correction(float cos) const noexcept {
  if (config_.sample_all) return 0.0f;
  if (!(cos > -1.0f)) cos = std::isnan(cos) ? 0.0f : -1.0f;  // clamp (and NaN -> orthogonal)
  if (cos > 1.0f) cos = 1.0f;
  return detail::lsh_correction(impl_->corr.data(), kCorrIntervals, cos);
}

const SimHash* LshAttention::projection(std::int32_t kv_head) const noexcept {
  if (kv_head < 0 || kv_head >= shape_.num_kv_heads) return nullptr;
  return &impl_->proj_of(kv_head);
}

namespace {

// Centers rows [from, to) of KV head h and hashes them.
void hash_rows(const PagedKvView& view, std::int32_t h, std::int64_t from, std::int64_t to,
               const float* mu, const SimHash& proj, std::uint16_t* codes) {
  const std::int32_t D = view.head_dim;
  std::vector<float> x(static_cast<std::size_t>(kHashBlock) * D);
  for (std::int64_t r0 = from; r0 < to; r0 += kHashBlock) {
    const std::int64_t nr = std::min(kHashBlock, to - r0);
    for (std::int64_t r = 0; r < nr; ++r) {
      float* xr = x.data() + r * D;
      widen_row(hattn::detail::row_at(view, 0, h, r0 + r).k, view.dtype, D, xr);
      for (std::int32_t d = 0; d < D; ++d) xr[d] -= mu[d];
    }
    proj.hash(x.data(), nr, D, codes + (r0 - from) * proj.L());
  }
}

}  // namespace

Status LshAttention::prefill(SeqId id, const void* keys, const void* values, std::int64_t n,
                             const CpuExecutor& executor, std::int64_t token_stride) {
  if (seqs_.count(id)) return {StatusCode::kInvalidArgument, "prefill: sequence already exists"};
  if (n < 0) return {StatusCode::kInvalidArgument, "prefill: negative token count"};
  if (n > 0 && (keys == nullptr || values == nullptr))
    return {StatusCode::kInvalidArgument, "prefill: keys or values is null"};
  Impl& im = *impl_;
  const std::int32_t Hk = shape_.num_kv_heads, D = shape_.head_dim;
  std::unique_ptr<Seq> seq;
  try {
    seq = std::make_unique<Seq>();
    HATTN_RETURN_IF_ERROR(im.pool.create_sequence(&seq->pool_id));
  } catch (const std::bad_alloc&) {
    return {StatusCode::kOutOfMemory, "prefill: out of memory"};
  }
  const HostPagePool::SeqId pool_id = seq->pool_id;
  // Every failure from here returns the pool sequence and its pages.
  struct ReleaseUnlessKept {
    HostPagePool& pool;
    HostPagePool::SeqId id;
    bool kept = false;
    ~ReleaseUnlessKept() {
      if (!kept) (void)pool.release(id);
    }
  } guard{im.pool, pool_id};
  HATTN_RETURN_IF_ERROR(im.pool.append(pool_id, keys, values, n, token_stride));
  try {
    seq->length = n;
    seq->sink_end = std::min<std::int64_t>(config_.sink, n);
    seq->indexed_end = std::max(seq->sink_end, n - config_.window);
    seq->mu.assign(static_cast<std::size_t>(Hk) * D, 0.0f);
    seq->tables.assign(static_cast<std::size_t>(Hk), LshTables(config_.K, config_.L));
    const HostPagePool::SeqId one[] = {pool_id};
    HATTN_RETURN_IF_ERROR(im.pool.build_page_table(one, &seq->page_table));
    seq->view = im.pool.view(seq->page_table);
    const std::int64_t ni = seq->indexed();
    if (ni > 0) {
      seq->centered = true;
      Seq& s = *seq;
      executor.parallel_for(Hk, [&](std::int64_t h) {
        const auto hh = static_cast<std::int32_t>(h);
        std::vector<double> sum(static_cast<std::size_t>(D), 0.0);
        std::vector<float> row(static_cast<std::size_t>(D));
        for (std::int64_t t = s.sink_end; t < s.indexed_end; ++t) {
          widen_row(hattn::detail::row_at(s.view, 0, hh, t).k, shape_.kv_dtype, D, row.data());
          for (std::int32_t d = 0; d < D; ++d) sum[d] += row[d];
        }
        float* mu = s.mu.data() + h * D;
        for (std::int32_t d = 0; d < D; ++d) mu[d] = static_cast<float>(sum[d] / double(ni));
        std::vector<std::uint16_t> codes(static_cast<std::size_t>(ni) * config_.L);
        hash_rows(s.view, hh, s.sink_end, s.indexed_end, mu, im.proj_of(hh), codes.data());
        s.tables[h].build(codes.data(), ni);
      });
    }
    seqs_.emplace(id, std::move(seq));
  } catch (const std::bad_alloc&) {
    return {StatusCode::kOutOfMemory, "prefill: out of memory building the index"};
  }
  guard.kept = true;
  return Status::ok();
}

Status LshAttention::append(SeqId id, const void* keys, const void* values, std::int64_t n,
                            std::int64_t token_stride) {
  auto it = seqs_.find(id);
  if (it == seqs_.end())
    return {StatusCode::kInvalidArgument, "append: unknown sequence (prefill first)"};
  if (n < 0) return {StatusCode::kInvalidArgument, "append: negative token count"};
  if (n == 0) return Status::ok();
  if (keys == nullptr || values == nullptr)
    return {StatusCode::kInvalidArgument, "append: keys or values is null"};
  Impl& im = *impl_;
  Seq& s = *it->second;
  // All or nothing: the pool's append is (kOutOfMemory changes nothing), and
  // everything after it that can fail (the page table, the keys' means and
  // codes, the tables' new arrays) is made aside first; the pool append is
  // undone if any of it fails. Only then does the sequence change.
  const std::int64_t old_len = s.length;
  HATTN_RETURN_IF_ERROR(im.pool.append(s.pool_id, keys, values, n, token_stride));
  const std::int32_t Hk = shape_.num_kv_heads, D = shape_.head_dim;
  const std::int64_t length = old_len + n;
  std::int64_t sink_end = s.sink_end, indexed_end = s.indexed_end;
  PageTable table;
  std::vector<float> mu;
  std::vector<LshTables::Pending> pending;
  try {
    const HostPagePool::SeqId one[] = {s.pool_id};
    if (Status st = im.pool.build_page_table(one, &table); !st) {
      (void)im.pool.truncate(s.pool_id, old_len);
      return st;
    }
    const PagedKvView view = im.pool.view(table);
    if (length - indexed_end > config_.max_exact_tail) {
      // Move the older part of the tail into the index.
      if (indexed_end - sink_end == 0) {
        sink_end = std::min<std::int64_t>(config_.sink, length);
        indexed_end = std::max(indexed_end, sink_end);
      }
      const std::int64_t from = indexed_end, to = length - config_.window;
      if (to > from) {
        const std::int64_t nn = to - from;
        mu = s.mu;
        std::vector<std::uint16_t> codes(static_cast<std::size_t>(nn) * config_.L);
        std::vector<float> row(static_cast<std::size_t>(D));
        pending.reserve(static_cast<std::size_t>(Hk));
        for (std::int32_t h = 0; h < Hk; ++h) {
          float* muh = mu.data() + std::int64_t{h} * D;
          if (!s.centered) {  // nothing was indexed at prefill: mu of the first indexed keys
            std::vector<double> sum(static_cast<std::size_t>(D), 0.0);
            for (std::int64_t t = from; t < to; ++t) {
              widen_row(hattn::detail::row_at(view, 0, h, t).k, shape_.kv_dtype, D, row.data());
              for (std::int32_t d = 0; d < D; ++d) sum[d] += row[d];
            }
            for (std::int32_t d = 0; d < D; ++d) muh[d] = static_cast<float>(sum[d] / double(nn));
          }
          hash_rows(view, h, from, to, muh, im.proj_of(h), codes.data());
          pending.push_back(s.tables[static_cast<std::size_t>(h)].prepare_insert(codes.data(), nn));
        }
        indexed_end = to;
      }
    }
  } catch (const std::bad_alloc&) {
    (void)im.pool.truncate(s.pool_id, old_len);
    return {StatusCode::kOutOfMemory, "append: out of memory growing the index"};
  }
  // Commit: nothing below can fail.
  s.page_table = std::move(table);
  s.view = im.pool.view(s.page_table);
  s.length = length;
  s.sink_end = sink_end;
  s.indexed_end = indexed_end;
  if (!pending.empty()) {
    s.mu.swap(mu);
    for (std::int32_t h = 0; h < Hk; ++h)
      s.tables[static_cast<std::size_t>(h)].commit(std::move(pending[static_cast<std::size_t>(h)]));
    s.centered = true;
    for (LshTables& t : s.tables) t.compact_if_large();
  }
  return Status::ok();
}

Status LshAttention::release(SeqId id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return {StatusCode::kInvalidArgument, "release: unknown sequence"};
  HATTN_RETURN_IF_ERROR(impl_->pool.release(it->second->pool_id));
  seqs_.erase(it);
  return Status::ok();
}

Status LshAttention::partition(SeqId id, LshPartition* out) const noexcept {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return {StatusCode::kInvalidArgument, "partition: unknown sequence"};
  if (out == nullptr) return {StatusCode::kInvalidArgument, "partition: out is null"};
  *out = {it->second->sink_end, it->second->indexed_end, it->second->length};
  return Status::ok();
}

Status LshAttention::memory(SeqId id, LshMemory* out) const noexcept {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return {StatusCode::kInvalidArgument, "memory: unknown sequence"};
  if (out == nullptr) return {StatusCode::kInvalidArgument, "memory: out is null"};
  const Seq& s = *it->second;
  LshMemory m;
  m.kv = 2 * impl_->pool.page_bytes() * s.page_table.indices.size();
  for (const auto& t : s.tables) m.index += t.bytes();
  m.means = s.mu.size() * sizeof(float);
  *out = m;
  return Status::ok();
}

Status LshAttention::mu(SeqId id, std::int32_t kv_head,
                        std::span<const float>* out) const noexcept {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return {StatusCode::kInvalidArgument, "mu: unknown sequence"};
  if (kv_head < 0 || kv_head >= shape_.num_kv_heads || out == nullptr)
    return {StatusCode::kInvalidArgument, "mu: bad KV head or null out"};
  *out = {it->second->mu.data() + std::int64_t{kv_head} * shape_.head_dim,
          static_cast<std::size_t>(shape_.head_dim)};
  return Status::ok();
}

const LshTables* LshAttention::tables(SeqId id, std::int32_t kv_head) const noexcept {
  auto it = seqs_.find(id);
  if (it == seqs_.end() || kv_head < 0 || kv_head >= shape_.num_kv_heads) return nullptr;
  return &it->second->tables[static_cast<std::size_t>(kv_head)];
}

Status LshAttention::kv_view(std::span<const SeqId> ids, PageTable* table,
                             PagedKvView* view) const {
  if (table == nullptr || view == nullptr)
    return {StatusCode::kInvalidArgument, "kv_view: null output"};
  std::vector<HostPagePool::SeqId> pool_ids;
  for (SeqId id : ids) {
    auto it = seqs_.find(id);
    if (it == seqs_.end()) return {StatusCode::kInvalidArgument, "kv_view: unknown sequence"};
    pool_ids.push_back(it->second->pool_id);
  }
  HATTN_RETURN_IF_ERROR(impl_->pool.build_page_table(pool_ids, table));
  *view = impl_->pool.view(*table);
  return Status::ok();
}

Status LshAttention::rebuild_index(SeqId id, const CpuExecutor& executor) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) return {StatusCode::kInvalidArgument, "rebuild_index: unknown sequence"};
  Seq& s = *it->second;
  const std::int64_t ni = s.indexed();
  const std::int32_t D = shape_.head_dim;
  try {
    executor.parallel_for(shape_.num_kv_heads, [&](std::int64_t h) {
      const auto hh = static_cast<std::int32_t>(h);
      std::vector<std::uint16_t> codes(static_cast<std::size_t>(ni) * config_.L);
      hash_rows(s.view, hh, s.sink_end, s.indexed_end, s.mu.data() + h * D, impl_->proj_of(hh),
                codes.data());
      s.tables[h].build(codes.data(), ni);
    });
  } catch (const std::bad_alloc&) {
    return {StatusCode::kOutOfMemory, "rebuild_index: out of memory"};
  }
  return Status::ok();
}

namespace {

// Walks bucket qcodes[g][l] of every main table l for every head g, in the
// order (g, l), in two passes: first every task's bucket bounds are read and
// the lines of its positions prefetched towards L2, then the buckets are
// walked. (Measured in TSC Mcycles per bs:1 step at 64K positions, 32 heads:
// a software pipeline with bounds 16 tasks and positions 8 tasks ahead of the
// walk spent 2.9-3.1 in all, these two passes 2.0-2.4, 0.6-0.7 of it in the
// first. The pipeline's prefetches had also started at the first position
// rather than its line, missing the last line of many buckets.) Every
// prefetch from memory goes towards L2 (a second stage below moves lines
// already there into L1): on Zen 4 a prefetcht0 holds one of the L1's few
// miss buffers until its line arrives, so fewer random lines are in flight
// (a loop summing random 256-byte rows read 4.7-6.7 GB/s on one core with
// prefetcht0 against 6.5-10.6 with prefetcht1 at the same distances; the
// sampled kernel's rows with prefetcht0 took about twice as long); the
// bounds' prefetcht0 made bs:8 steps at 64K 1-9 % slower than prefetcht1
// (six in-process comparisons, alternating every 16 steps), bs:1 within
// noise.
template <class Idx, class Visit>
void walk_main(const LshTables& t, const std::uint16_t* qcodes, std::int32_t L, std::int32_t gp,
               Scratch& sc, Visit&& hit) {
  const std::int32_t n = L * gp;
  // Task k is (head k / L, table k % L): one head's counts stay in cache
  // while its L buckets are walked.
  const std::uint32_t** bptr = sc.bounds.data();
  const void** pbase = sc.pbase.data();
  for (std::int32_t g = 0, k = 0; g < gp; ++g)
    for (std::int32_t l = 0; l < L; ++l, ++k) {
      bptr[k] = t.bucket_offsets(l, qcodes[k]);
      if constexpr (sizeof(Idx) == 2)
        pbase[k] = t.positions16(l);
      else
        pbase[k] = t.positions32(l);
      detail::prefetch_l2(bptr[k]);
    }
  std::uint32_t* range = sc.ranges.data();  // [n][2]
  // Every line of task k's positions (up to 512 bytes of them).
  auto position_lines = [&](std::int32_t k, auto&& prefetch) {
    const Idx* pos = static_cast<const Idx*>(pbase[k]);
    const auto line0 = reinterpret_cast<std::uintptr_t>(pos + range[2 * k]) & ~std::uintptr_t{63};
    const auto end =
        std::min(reinterpret_cast<std::uintptr_t>(pos + range[2 * k + 1]), line0 + 512);
    for (std::uintptr_t c = line0; c < end; c += 64) prefetch(reinterpret_cast<const void*>(c));
  };
  auto to_l1 = [](const void* p) { detail::prefetch_l1(p); };
  auto to_l2 = [](const void* p) { detail::prefetch_l2(p); };
  // A second stage pulls the lines each pass reads from L2 (or on their way
  // there) into L1 a few tasks ahead: the bounds kNearBounds tasks ahead of
  // the pass that reads them, the positions kNearPositions buckets ahead of
  // the walk. (Zen 3, whole bench_lsh steps, alternating in one process with
  // each variant meeting every query batch: 12 of 14 comparisons faster,
  // median 1 %, bs:8 up to 4 %.)
  constexpr std::int32_t kNearBounds = 4, kNearPositions = 2;
  for (std::int32_t k = 0; k < n; ++k) {
    if (k + kNearBounds < n) detail::prefetch_l1(bptr[k + kNearBounds]);
    const std::uint32_t* o = bptr[k];
    range[2 * k] = o[0];
    range[2 * k + 1] = o[1];
    position_lines(k, to_l2);
  }
  for (std::int32_t g = 0, k = 0; g < gp; ++g)
    for (std::int32_t l = 0; l < L; ++l, ++k) {
      if (k + kNearPositions < n) position_lines(k + kNearPositions, to_l1);
      const Idx* pos = static_cast<const Idx*>(pbase[k]);
      hit(g, pos + range[2 * k], pos + range[2 * k + 1]);
    }
}

// The positions each of the pass's query heads samples (relative to
// sink_end), as a bitset per head in sc.hits (build_union() lists their
// union). A position is sampled by head g when it shares the query's bucket
// in >= m tables, or always with `all`. For m <= 8 a head counts in one byte
// per position, a thermometer code (c = c << 1 | 1: one load and one store
// per bucket entry, no dependence between the entries of a bucket, which are
// distinct), and a vector scan turns bit m - 1 of the bytes into the bitset
// and zeroes them. (Measured against the two bitsets seen/sampled this
// replaced, hits |= seen & bit; seen |= bit, on one thread with the buckets
// in cache: 1.4-2.2 against 2.3-3.8 TSC cycles per entry.) Larger m counts
// in epoch-stamped 16-bit counters (no clearing per step).
void retrieve(const LshTables& t, std::int64_t n, std::int32_t gp, const std::uint16_t* qcodes,
              std::int32_t L, std::int32_t m, bool all, detail::ScanFn scan, Scratch& sc) {
  sc.nlisted = 0;
  if (n <= 0) return;
  const std::int64_t words = (n + 63) / 64;
  const std::int64_t stride = (sc.cap + 63) / 64;
  // One head's positions listed from its bitset (the thermometer scan lists
  // them itself).
  auto list_one = [&] {
    if (gp != 1) return;
    for (std::int64_t w = 0; w < words; ++w)
      sc.nlisted =
          detail::list_word(sc.hits[static_cast<std::size_t>(w)],
                            static_cast<std::uint32_t>(w * 64), sc.listed.data(), sc.nlisted);
  };
  if (all) {
    for (std::int32_t g = 0; g < gp; ++g) {
      std::uint64_t* h = sc.hits.data() + g * stride;
      std::fill_n(h, words, ~std::uint64_t{0});
      if (n % 64 != 0) h[words - 1] = (std::uint64_t{1} << (n % 64)) - 1;
    }
    list_one();
    return;
  }
  // Every bucket of every (head, table), main then side tables, through
  // bucket(g, first, last): the loop over a bucket keeps the head's arrays
  // in registers.
  auto walk = [&](auto&& bucket) {
    if (t.main_size() > 0) {
      if (t.wide())
        walk_main<std::uint32_t>(t, qcodes, L, gp, sc, bucket);
      else
        walk_main<std::uint16_t>(t, qcodes, L, gp, sc, bucket);
    }
    if (t.side_size() > 0)
      for (std::int32_t g = 0; g < gp; ++g)
        for (std::int32_t l = 0; l < L; ++l)
          t.for_each_in_side(l, qcodes[g * L + l], [&](std::uint32_t i) { bucket(g, &i, &i + 1); });
  };
  std::uint64_t* const hits = sc.hits.data();
  if (m <= detail::kMaxThermometer) {
    // The hot loop of retrieval: 64 KiB of marks per head at 64K positions.
    // Four entries at a time, all loads before the stores: a bucket's
    // entries are distinct positions, so no store of a group feeds one of
    // its loads. (Measured together with the sampled kernel's native table
    // gather, inside one process, alternating every 16 steps: bs:8 steps at
    // 64K 2-4 % faster, bs:1 within 1 %; eight at a time gained nothing more.)
    std::uint8_t* const marks = sc.marks.data();
    const std::int64_t pitch = stride * 64;
    walk([=](std::int32_t g, const auto* first, const auto* last) {
      std::uint8_t* __restrict c = marks + g * pitch;
      for (; last - first >= 4; first += 4) {
        const std::uint32_t i0 = first[0], i1 = first[1], i2 = first[2], i3 = first[3];
        const unsigned c0 = c[i0], c1 = c[i1], c2 = c[i2], c3 = c[i3];
        c[i0] = static_cast<std::uint8_t>(c0 << 1 | 1u);
        c[i1] = static_cast<std::uint8_t>(c1 << 1 | 1u);
        c[i2] = static_cast<std::uint8_t>(c2 << 1 | 1u);
        c[i3] = static_cast<std::uint8_t>(c3 << 1 | 1u);
      }
      for (; first < last; ++first) c[*first] = static_cast<std::uint8_t>(c[*first] << 1 | 1u);
    });
    // With one head the scan also lists its positions (sc.listed).
    for (std::int32_t g = 0; g < gp; ++g)
      sc.nlisted = scan(marks + g * pitch, words, m, hits + g * stride,
                        gp == 1 ? sc.listed.data() : nullptr);
  } else {
    for (std::int32_t g = 0; g < gp; ++g)
      std::fill_n(sc.hits.data() + g * stride, words, std::uint64_t{0});
    const std::uint16_t stamp = static_cast<std::uint16_t>(sc.next_epoch() << 8);
    const auto mm = static_cast<std::uint16_t>(m);
    std::uint16_t* const counters = sc.counters.data();
    const std::int64_t cap = sc.cap;
    walk([=](std::int32_t g, const auto* first, const auto* last) {
      std::uint16_t* cnt = counters + g * cap;
      for (; first < last; ++first) {
        const std::uint32_t i = *first;
        std::uint16_t c = cnt[i];
        if ((c & 0xff00u) != stamp) c = stamp;
        if ((c & 0xffu) < mm) {
          ++c;
          cnt[i] = c;
          if ((c & 0xffu) == mm) hits[g * stride + (i >> 6)] |= std::uint64_t{1} << (i & 63);
        }
      }
    });
    list_one();
  }
}

// The union of the pass's sets from the bitsets retrieve() left (ascending),
// with umask[j] bit g set when head g sampled the j-th position.
void build_union(std::int64_t n, std::int32_t gp, Scratch& sc) {
  sc.sampled.clear();
  sc.umask.clear();
  const std::int64_t words = (n + 63) / 64;
  const std::int64_t stride = (sc.cap + 63) / 64;
  const std::uint64_t* hits = sc.hits.data();
  for (std::int64_t w = 0; w < words; ++w) {
    std::uint64_t any = 0;
    for (std::int32_t g = 0; g < gp; ++g) any |= hits[g * stride + w];
    while (any != 0) {
      const int b = __builtin_ctzll(any);
      any &= any - 1;
      std::uint16_t mk = 0;
      for (std::int32_t g = 0; g < gp; ++g)
        mk = static_cast<std::uint16_t>(mk | (((hits[g * stride + w] >> b) & 1u) << g));
      sc.sampled.push_back(static_cast<std::uint32_t>(w * 64 + b));
      sc.umask.push_back(mk);
    }
  }
}

}  // namespace

Status LshAttention::sampled_positions(SeqId id, std::int32_t q_head, const float* q,
                                       std::vector<std::int64_t>* out) const {
  auto it = seqs_.find(id);
  if (it == seqs_.end())
    return {StatusCode::kInvalidArgument, "sampled_positions: unknown sequence"};
  if (q_head < 0 || q_head >= shape_.num_q_heads || q == nullptr || out == nullptr)
    return {StatusCode::kInvalidArgument, "sampled_positions: bad head or null pointer"};
  const Seq& s = *it->second;
  const std::int32_t h = q_head / (shape_.num_q_heads / shape_.num_kv_heads);
  return status_of([&] {
    Scratch sc;
    sc.reserve(std::max<std::int64_t>(1, s.indexed()), 0, shape_.head_dim, config_.L,
               config_.min_collisions, 1);
    std::vector<std::uint16_t> codes(static_cast<std::size_t>(config_.L));
    impl_->proj_of(h).hash(q, 1, shape_.head_dim, codes.data());
    retrieve(s.tables[static_cast<std::size_t>(h)], s.indexed(), 1, codes.data(), config_.L,
             config_.min_collisions, config_.sample_all, impl_->scan, sc);
    std::vector<std::int64_t> positions(static_cast<std::size_t>(sc.nlisted));
    for (std::int32_t j = 0; j < sc.nlisted; ++j)  // ascending
      positions[static_cast<std::size_t>(j)] = s.sink_end + sc.listed[static_cast<std::size_t>(j)];
    out->swap(positions);  // *out changes only on success
    return Status::ok();
  });
}

Status LshAttention::decode(std::span<const SeqId> seqs, const QueryView& q, const PartialView& out,
                            const CpuExecutor& executor) noexcept {
  return status_of([&] { return decode_impl(seqs, q, out, executor, true); });
}

Status LshAttention::decode_sampled(std::span<const SeqId> seqs, const QueryView& q,
                                    const PartialView& out, const CpuExecutor& executor) noexcept {
  return status_of([&] { return decode_impl(seqs, q, out, executor, false); });
}

namespace {

// Token ranges of one sequence that are attended exactly: [0, sink) and
// [tail_begin, length) of `view` (the sequence alone).
struct ExactRows {
  const PagedKvView* view;
  std::int64_t sink, tail_begin, length;
};

// Task t of B x Hk x passes, passes of up to `width` of the G query heads of
// a KV head: (sequence, KV head, first query head of the pass, heads in it).
struct Pass {
  std::int32_t b, h, g0, gp;
};
Pass pass_of(std::int64_t t, std::int32_t Hk, std::int32_t passes, std::int32_t width,
             std::int32_t G) noexcept {
  Pass p{};
  p.b = static_cast<std::int32_t>(t / (std::int64_t{Hk} * passes));
  p.h = static_cast<std::int32_t>(t / passes % Hk);
  p.g0 = static_cast<std::int32_t>(t % passes) * width;
  p.gp = std::min(width, G - p.g0);
  return p;
}

// The calling thread's scratch.
Scratch& thread_scratch(std::vector<Scratch>& scratch) noexcept {
  const int slot = tbb::this_task_arena::current_thread_index();
  return scratch[static_cast<std::size_t>(slot < 0 ? 0 : slot)];
}

// The exact part of (sequence, KV head h) for gp query heads: the sink and
// the tail through the dense kernel. qf: the queries, natural f32, [gp][D];
// oe: [gp][D] natural order, normalized; lse_e: [gp].
void exact_part(const LshAttention::Impl& im, const ExactRows& x, std::int32_t h, const float* qf,
                std::int32_t gp, std::int32_t D, float scale, Scratch& sc, float* oe,
                float* lse_e) noexcept {
  const auto sink = static_cast<std::int32_t>(x.sink);
  const auto tail = static_cast<std::int32_t>(x.length - x.tail_begin);
  hattn::detail::RowCursor<PagedKvView>(*x.view, 0, h, 0)
      .next(sink, sc.krows.data(), sc.vrows.data());
  hattn::detail::RowCursor<PagedKvView>(*x.view, 0, h, x.tail_begin)
      .next(tail, sc.krows.data() + sink, sc.vrows.data() + sink);
  const std::int32_t n = sink + tail;
  float* qd = sc.qd.data();
  float* acc = sc.acc.data();
  float m[kMaxGroupPerPass], l[kMaxGroupPerPass];
  const float qs = scale * kLog2e;
  for (std::int32_t g = 0; g < gp; ++g)
    for (std::int32_t i = 0; i < D; ++i) qd[g * D + i] = qf[g * D + im.dense_q_natural[i]] * qs;
  std::fill_n(acc, gp * D, 0.0f);
  std::fill_n(m, gp, kNegInf);
  std::fill_n(l, gp, 0.0f);
  if (n > 0) {
    detail::AttendArgs a{qd, acc, m, l, 1, gp, sc.krows.data(), sc.vrows.data(), 0, 0, n};
    im.dense.attend(a);
  }
  for (std::int32_t g = 0; g < gp; ++g) {
    const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
    lse_e[g] = l[g] > 0.0f ? m[g] + std::log2(l[g]) : kNegInf;
    for (std::int32_t i = 0; i < D; ++i) oe[g * D + im.dense_natural[i]] = acc[g * D + i] * inv;
  }
}

}  // namespace

Status LshAttention::decode_impl(std::span<const SeqId> ids, const QueryView& q,
                                 const PartialView& out, const CpuExecutor& executor,
                                 bool with_exact) {
  const std::int32_t Hq = shape_.num_q_heads, Hk = shape_.num_kv_heads, D = shape_.head_dim;
  const std::int32_t G = Hq / Hk;
  const auto B = static_cast<std::int32_t>(ids.size());
  // The views' shapes, pointers and strides, as the dense backends check
  // them, for the problem this step is (its dtypes are the views' own).
  const DecodeProblem step{B, Hq, Hk, D, shape_.kv_dtype, q.dtype, out.dtype, shape_.sm_scale};
  HATTN_RETURN_IF_ERROR(hattn::validate(step, q));
  HATTN_RETURN_IF_ERROR(hattn::validate(step, out));
  if (!hattn::contains<SupportedQueryDTypes>(q.dtype) ||
      !hattn::contains<SupportedOutDTypes>(out.dtype))
    return {StatusCode::kNotSupported, "decode: query or output dtype is not supported"};
  std::vector<Seq*> seqs(static_cast<std::size_t>(B));
  std::int64_t max_indexed = 1, max_exact = 1;
  for (std::int32_t b = 0; b < B; ++b) {
    auto it = seqs_.find(ids[b]);
    if (it == seqs_.end())
      return {StatusCode::kInvalidArgument, "decode: unknown sequence (decode before prefill?)"};
    seqs[b] = it->second.get();
    max_indexed = std::max(max_indexed, seqs[b]->indexed());
    max_exact = std::max(max_exact, seqs[b]->sink_end + seqs[b]->length - seqs[b]->indexed_end);
  }
  Impl& im = *impl_;
  // Work items: (sequence, query head), or with the union gather (sequence,
  // KV head, pass of up to 16 of its query heads).
  const std::int32_t gmax =
      config_.gather == LshConfig::Gather::kUnion ? std::min(G, kMaxGroupPerPass) : 1;
  // Allocation failures here and below reach decode()'s status_of.
  const auto slots = static_cast<std::size_t>(executor.concurrency()) + 1;
  if (im.scratch.size() < slots) im.scratch.resize(slots);
  for (auto& sc : im.scratch)
    sc.reserve(max_indexed, max_exact, D, config_.L, config_.min_collisions, gmax);

  const float scale = shape_.sm_scale ? *shape_.sm_scale : 1.0f / std::sqrt(float(D));
  const std::int32_t L = config_.L;
  const std::int32_t passes = (G + gmax - 1) / gmax;
  const std::int64_t items = std::int64_t{B} * Hk * passes;

  // With one projection for all heads, the step's queries are hashed together
  // first: the planes are read once per step instead of once per KV head.
  const bool shared = im.proj.size() == 1;
  const std::int64_t qrows = std::int64_t{B} * Hq;
  const std::int32_t words = im.proj[0].words();
  // Per-head items take their exact part (sink and tail) from this phase too:
  // one task per (sequence, KV head, pass of up to 16 query heads), so each
  // exact row is read and converted once for its group rather than once per
  // query head, in tasks that run beside the hashing's. (Inside one process,
  // alternating every 16 steps, K10L150 at 64K: bs:1 steps -0.4 to +2.3 %
  // faster, bs:8 within +-3 %: the exact part is ~2 % of a step.)
  const bool exact_first = with_exact && gmax == 1;
  const std::int32_t epasses = (G + kMaxGroupPerPass - 1) / kMaxGroupPerPass;
  const std::int64_t exact_tasks = exact_first ? std::int64_t{B} * Hk * epasses : 0;
  // Tasks split the planes, not the rows: each block of 64 planes is read
  // from memory once per step, by one thread, and all rows are hashed
  // against it. (Splitting rows had every thread read all the planes:
  // 786 KB at K10L150, cold after the other layers' traffic.)
  constexpr std::int32_t kWordsPerTask = 3;
  const std::int64_t hash_tasks = shared ? (words + kWordsPerTask - 1) / kWordsPerTask : 0;
  im.step_q.resize(static_cast<std::size_t>(qrows * D));
  if (shared) im.step_bits.resize(static_cast<std::size_t>(qrows * words));
  if (exact_first) {
    im.step_oe.resize(static_cast<std::size_t>(qrows * D));
    im.step_lse_e.resize(static_cast<std::size_t>(qrows));
  }
  for (std::int64_t r = 0; r < qrows; ++r) {
    const std::int64_t off = r / Hq * q.stride_batch + r % Hq * q.stride_head;
    for (std::int32_t d = 0; d < D; ++d)
      im.step_q[static_cast<std::size_t>(r * D + d)] = load_as_float(q.data, q.dtype, off + d);
  }
  executor.parallel_for(exact_tasks + hash_tasks, [&](std::int64_t task) {
    if (task >= exact_tasks) {
      const auto w0 = static_cast<std::int32_t>(task - exact_tasks) * kWordsPerTask;
      im.proj[0].sign_bits(im.step_q.data(), qrows, D, w0, std::min(words, w0 + kWordsPerTask),
                           im.step_bits.data());
      return;
    }
    Scratch& sc = thread_scratch(im.scratch);
    const auto [b, h, g0, gp] = pass_of(task, Hk, epasses, kMaxGroupPerPass, G);
    const Seq& s = *seqs[static_cast<std::size_t>(b)];
    const std::int64_t r = std::int64_t{b} * Hq + h * G + g0;
    exact_part(im, {&s.view, s.sink_end, s.indexed_end, s.length}, h, im.step_q.data() + r * D, gp,
               D, scale, sc, im.step_oe.data() + r * D, im.step_lse_e.data() + r);
  });

  executor.parallel_for(items, [&](std::int64_t item) {
    Scratch& sc = thread_scratch(im.scratch);
    const auto [b, h, g0, gp] = pass_of(item, Hk, passes, gmax, G);
    const Seq& s = *seqs[static_cast<std::size_t>(b)];

    // Queries of the pass: natural f32, their norms and q.mu.
    const float* qf = im.step_q.data() + (std::int64_t{b} * Hq + h * G + g0) * D;
    float qn[kMaxGroupPerPass], qmu[kMaxGroupPerPass];
    std::uint16_t* qcodes = sc.qcodes.data();
    const float* mu = s.mu.data() + std::int64_t{h} * D;
    for (std::int32_t g = 0; g < gp; ++g) {
      double n2 = 0.0, dm = 0.0;
      for (std::int32_t d = 0; d < D; ++d) {
        const float x = qf[g * D + d];
        n2 += double{x} * x;
        dm += double{x} * mu[d];
      }
      qn[g] = static_cast<float>(std::sqrt(n2));
      qmu[g] = static_cast<float>(dm);
    }

    // Sampled part.
    float* os = sc.os.data();
    float lse_s[kMaxGroupPerPass];
    std::fill_n(os, gp * D, 0.0f);
    std::fill_n(lse_s, gp, kNegInf);
    const std::int64_t ni = s.indexed();
    if (ni > 0) {
      const LshTables& tab = s.tables[static_cast<std::size_t>(h)];
      const std::uint16_t* codes = qcodes;
      if (shared)
        im.proj[0].codes(im.step_bits.data() + (std::int64_t{b} * Hq + h * G + g0) * words, gp,
                         qcodes);
      else
        im.proj_of(h).hash(qf, gp, D, qcodes);
      retrieve(tab, ni, gp, codes, L, config_.min_collisions, config_.sample_all, impl_->scan, sc);
      // Row pointers of the sampled set: one head's from the list retrieve()
      // made, a group's union in ascending order with per-head masks.
      const hattn::detail::PagedRowLocator loc(s.view, 0, h, s.sink_end);
      std::int32_t nu = 0;
      if (gp == 1) {
        const std::uint32_t* listed = sc.listed.data();
        nu = sc.nlisted;
        for (std::int32_t j = 0; j < nu; ++j) {
          const auto rows = loc(listed[j]);
          sc.krows[j] = rows.k;
          sc.vrows[j] = rows.v;
        }
      } else {
        build_union(ni, gp, sc);
        nu = static_cast<std::int32_t>(sc.sampled.size());
        for (std::int32_t j = 0; j < nu; ++j) {
          const auto rows = loc(sc.sampled[j]);
          sc.krows[j] = rows.k;
          sc.vrows[j] = rows.v;
        }
        sc.umask.resize(static_cast<std::size_t>(nu) + detail::kLshPad, 0);
      }
      if (nu > 0) {
        const float qs = scale * kLog2e;
        float* qd = sc.qd.data();
        for (std::int32_t g = 0; g < gp; ++g)
          for (std::int32_t i = 0; i < D; ++i) qd[g * D + i] = qf[g * D + im.lsh_q_natural[i]] * qs;
        for (std::int32_t i = 0; i < D; ++i) sc.muk[i] = mu[im.lsh_q_natural[i]];
        float* acc = sc.acc.data();
        std::fill_n(acc, gp * D, 0.0f);
        float m[kMaxGroupPerPass], l[kMaxGroupPerPass];
        std::fill_n(m, gp, kNegInf);
        std::fill_n(l, gp, 0.0f);
        const bool every = gp == 1 || config_.sample_all;  // every head sampled every row
        const detail::LshScoreCtx ctx{sc.muk.data(),
                                      every ? nullptr : sc.umask.data(),
                                      qn,
                                      qmu,
                                      1.0f / qs,
                                      config_.sample_all ? nullptr : im.corr.data(),
                                      kCorrIntervals};
        detail::AttendArgs args{qd, acc, m, l, 1, gp, sc.krows.data(), sc.vrows.data(), 0, 0, nu};
        args.ctx = &ctx;
        im.sampled.attend(args);
        for (std::int32_t g = 0; g < gp; ++g) {
          const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
          lse_s[g] = l[g] > 0.0f ? m[g] + std::log2(l[g]) : kNegInf;
          for (std::int32_t i = 0; i < D; ++i) os[g * D + im.lsh_natural[i]] = acc[g * D + i] * inv;
        }
      }
    }

    // Exact part: sink and tail through the dense kernel (per-head items:
    // computed per KV head before the items, read from step_oe).
    const float* oe = sc.oe.data();
    const float* lse_e = sc.lse_e;
    if (exact_first) {
      const std::int64_t r = std::int64_t{b} * Hq + h * G + g0;
      oe = im.step_oe.data() + r * D;
      lse_e = im.step_lse_e.data() + r;
    } else if (with_exact) {
      exact_part(im, {&s.view, s.sink_end, s.indexed_end, s.length}, h, qf, gp, D, scale, sc,
                 sc.oe.data(), sc.lse_e);
    } else {
      std::fill_n(sc.lse_e, gp, kNegInf);
    }

    for (std::int32_t g = 0; g < gp; ++g) {
      const std::int32_t qh = h * G + g0 + g;
      const std::int64_t off = b * out.stride_batch + std::int64_t{qh} * out.stride_head;
      const MergeWeights w = merge_weights(lse_s[g], lse_e[g]);
      for (std::int32_t d = 0; d < D; ++d) {
        const float xs = w.wa != 0.0f ? w.wa * os[g * D + d] : 0.0f;
        const float xe = w.wb != 0.0f ? w.wb * oe[g * D + d] : 0.0f;
        store_from_float(out.o, out.dtype, off + d, xs + xe);
      }
      out.lse2[b * out.lse_stride_batch + qh] = w.lse;
    }
  });
  return Status::ok();
}

}  // namespace hattn::cpu
