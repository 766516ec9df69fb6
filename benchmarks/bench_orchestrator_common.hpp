#pragma once
// What the host and the CUDA cases of bench_orchestrator share: the attention
// shape, a host KV cache filled with every sequence's prefix, and the CPU
// attention of one step timed alone.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "hattn/core/dtype.hpp"
#include "hattn/core/kv_view.hpp"
#include "hattn/core/page_pool.hpp"
#include "hattn/core/problem.hpp"
#include "hattn/cpu/executor.hpp"
#include "hattn/runtime/cpu_attention.hpp"
#include "hattn/runtime/host_kv_cache.hpp"
#include "hattn/runtime/orchestrator.hpp"

namespace bench_orch {

namespace rt = hattn::runtime;

struct Shape {
  std::int32_t layers = 8;
  std::int32_t batch = 16;
  std::int32_t kv_len = 4096;  // tokens already in each sequence
  std::int32_t spare = 1024;   // room for the benchmark's steps
  std::int32_t q_heads = 8;
  std::int32_t kv_heads = 2;
  std::int32_t head_dim = 64;
  hattn::DType kv_dtype = hattn::DType::kBF16;

  hattn::DecodeProblem problem(std::int32_t b) const {
    return {.batch_size = b,
            .num_q_heads = q_heads,
            .num_kv_heads = kv_heads,
            .head_dim = head_dim,
            .kv_dtype = kv_dtype,
            .q_dtype = hattn::DType::kF32,
            .o_dtype = hattn::DType::kF32,
            .sm_scale = std::nullopt};
  }
  rt::SlotShape slot(std::int32_t max_batch) const {
    return {.max_batch = max_batch,
            .num_q_heads = q_heads,
            .num_kv_heads = kv_heads,
            .head_dim = head_dim,
            .kv_dtype = kv_dtype,
            .code_bytes_per_seq = 0};
  }
  std::vector<std::int32_t> seqs() const {
    std::vector<std::int32_t> s(static_cast<std::size_t>(batch));
    for (std::int32_t i = 0; i < batch; ++i) s[static_cast<std::size_t>(i)] = i;
    return s;
  }
};

// Milliseconds of one call of f.
template <class F>
double time_ms(F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// The median over `reps` calls of f, in milliseconds.
template <class F>
double median_ms(int reps, F&& f) {
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) t.push_back(time_ms(f));
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// A host KV cache of s.batch sequences holding s.kv_len tokens each (smooth
// deterministic values), with room for s.spare more; null on failure.
inline std::unique_ptr<rt::HostKvCache> make_cache(const Shape& s) {
  const std::int64_t pages = (s.kv_len + s.spare) / 16 + 1;
  auto kv = std::make_unique<rt::HostKvCache>(
      s.layers, hattn::PagePoolOptions{.dtype = s.kv_dtype,
                                       .num_kv_heads = s.kv_heads,
                                       .head_dim = s.head_dim,
                                       .page_size = 16,
                                       .num_pages = pages * s.batch,
                                       .layout = hattn::KvLayout::kHND});
  const std::size_t n = static_cast<std::size_t>(s.kv_len) * s.kv_heads * s.head_dim;
  std::vector<std::byte> k(n * hattn::size_of(s.kv_dtype)), v(k.size());
  for (std::size_t i = 0; i < n; ++i) {
    const auto at = static_cast<std::ptrdiff_t>(i);
    hattn::store_from_float(k.data(), s.kv_dtype, at,
                            std::sin(0.37f * static_cast<float>(i % 1000)));
    hattn::store_from_float(v.data(), s.kv_dtype, at,
                            std::cos(0.11f * static_cast<float>(i % 777)));
  }
  for (std::int32_t b = 0; b < s.batch; ++b) {
    std::int32_t id = 0;
    if (!kv->add_sequence(&id)) return nullptr;
    for (std::int32_t l = 0; l < s.layers; ++l)
      if (!kv->append(l, id, k.data(), v.data(), s.kv_len)) return nullptr;
  }
  return kv;
}

// The CPU attention of one step (every layer and micro-batch: page tables and
// the dense backend), alone: the median of `reps` runs, -1 on an error.
inline double attention_alone_ms(const Shape& s, rt::HostKvCache& kv, std::int32_t mbs,
                                 const hattn::CpuExecutor& ex, int reps) {
  const auto seqs = s.seqs();
  const auto max_mb = rt::micro_batch_range(s.batch, mbs, 0).size;
  rt::DenseCpuAttention backend(s.problem(max_mb));
  std::vector<float> q(static_cast<std::size_t>(max_mb) * s.q_heads * s.head_dim, 0.01f),
      o(q.size()), lse(static_cast<std::size_t>(max_mb) * s.q_heads);
  std::vector<std::int64_t> cpu(static_cast<std::size_t>(s.batch));
  hattn::PageTable table;
  bool ok = true;
  const double ms = median_ms(reps, [&] {
    for (std::int32_t l = 0; l < s.layers; ++l)
      for (std::int32_t m = 0; m < mbs; ++m) {
        const auto r = rt::micro_batch_range(s.batch, mbs, m);
        for (std::int32_t b = 0; b < r.size; ++b)
          cpu[static_cast<std::size_t>(b)] =
              kv.seq_len(l, seqs[static_cast<std::size_t>(r.begin + b)]);
        rt::CpuAttentionTask t;
        t.layer = l;
        t.micro_batch = m;
        t.problem = s.problem(r.size);
        ok = ok && kv.build_page_table(l, seqs.data() + r.begin, cpu.data(), r.size, &table);
        t.kv = kv.pool(l).view(table);
        t.q = hattn::make_query_view(q.data(), hattn::DType::kF32, r.size, s.q_heads, s.head_dim);
        t.out = hattn::make_partial_view(o.data(), hattn::DType::kF32, lse.data(), r.size,
                                         s.q_heads, s.head_dim);
        ok = ok && backend.attend(t, ex);
      }
  });
  return ok ? ms : -1.0;
}

}  // namespace bench_orch
