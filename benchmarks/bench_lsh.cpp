// LSH-sampled decode attention (MagicPIG) against dense CPU attention on the
// same KV cache, in one run.
//
// Cases (names are fixed; scripts read them):
//   lsh_build/K10L150/kv:<n>         prefill of one sequence: store K/V, mu,
//                                    hash every key, build the tables
//   lsh/K10L150/kv:<n>/bs:<b>        one decode step (sampled + exact part, merged)
//   lsh/K8L75/kv:<n>/bs:<b>
//   cpu_dense/bf16/kv:<n>/bs:<b>     cpu::DenseDecode::run on the same cache
//   lsh_peaky/K10L150/kv:65536/bs:<b>  the same step on peaky attention data
//   lsh_vs_dense/K10L150/kv:65536/bs:<b>  the lsh and cpu_dense steps paired:
//                                    each iteration runs one of each, in
//                                    alternating order; counters lsh_ms and
//                                    dense_ms (medians) and speedup (their
//                                    ratio). The reported time is the lsh
//                                    step's (the timer is paused for the
//                                    rest). This host's speed drifts by
//                                    20-50 % within seconds, so the separate
//                                    cases, seconds apart, can see different
//                                    machines; the pairs see the same one.
// n in {16384, 65536, 131072}, b in {1, 8}; a case whose memory is not
// available is skipped with a message.
//
// Shape: Llama-3-8B attention (32 query heads, 8 KV heads, head dim 128), bf16
// KV in pages of 16 tokens (HND), f32 queries and outputs, all cores. Each
// timed iteration is one decode step for a fresh query batch (16 batches in
// rotation); before it, outside the timer, a buffer of max(96 MiB, 3 x the
// last-level cache) is written by all threads so the step finds no KV or
// index in any cache (as in a real model, where the other layers' KV passes
// through the caches between two visits of this layer).
//
// Counters of the lsh cases, from the first query batch:
//   sampled_fraction  mean over (sequence, query head) of sampled / indexed keys
//   rel_error         ||o - o_exact|| / ||o_exact|| mean over the 32 heads of
//                     sequence 0, o_exact = dense attention in double
//   topk_rel_error    the same for exact TopK by score with, per head, the
//                     number of keys the sampler took, plus the same exact part
//   index_bytes, kv_bytes, index_kv_ratio   over the batch's sequences
//
// The synthetic KV (docs/lsh.md): per (sequence, KV head) a stable shared key
// direction a (every key is 4 a + N(0, I)), a sink key (token 0) at -12 a,
// 16 heavy tokens with a component along a query direction c, values that
// depend on their keys (0.25 x a signed permutation of k, plus N(0, I)), and
// queries -gamma a + kappa c + sigma N(0, I). Diffuse (default): score spread
// about 1, no few keys dominate. Peaky: heavy tokens hold most of the mass.

#include <benchmark/benchmark.h>

#include <tbb/parallel_for.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bench_cache.hpp"
#include "hattn/core/dtype.hpp"
#include "hattn/core/page_pool.hpp"
#include "hattn/cpu/dense_decode.hpp"
#include "hattn/cpu/executor.hpp"
#include "hattn/cpu/lsh_attention.hpp"
#include "hattn/detail/kv_rows.hpp"
#include "hattn/detail/splitmix.hpp"

namespace {

using namespace hattn;
using namespace hattn::cpu;

constexpr std::int32_t kQHeads = 32, kKvHeads = 8, kD = 128, kG = kQHeads / kKvHeads;
constexpr std::int32_t kMaxBatch = 8;
constexpr int kQueryBatches = 16;

enum class Data { kDiffuse, kPeaky };

struct DataParams {
  float key_shared, sink, heavy, q_shared, q_topic, q_noise;
};
DataParams params(Data d) {
  return d == Data::kDiffuse ? DataParams{4.0f, 12.0f, 6.0f, 3.0f, 3.0f, 0.9f}
                             : DataParams{4.0f, 12.0f, 12.0f, 4.0f, 10.0f, 1.3f};
}

using hattn::detail::splitmix64;

// Normal noise fast enough for GiBs of KV: rows are windows of a table of
// 2^20 N(0, 1) values at random offsets.
struct NoiseTable {
  std::vector<float> t;
  NoiseTable() {
    std::mt19937_64 rng(12345);
    std::normal_distribution<float> nd;
    t.resize((std::size_t{1} << 20) + kD);
    for (auto& x : t) x = nd(rng);
  }
  const float* row(std::uint64_t key) const {
    return t.data() + (splitmix64(key) & ((1u << 20) - 1));
  }
};
const NoiseTable& noise() {
  static const NoiseTable table;
  return table;
}

std::vector<float> unit(std::mt19937_64& rng) {
  std::normal_distribution<float> nd;
  std::vector<float> v(kD);
  double n = 0;
  for (auto& x : v) {
    x = nd(rng);
    n += double{x} * x;
  }
  for (auto& x : v) x = static_cast<float>(x / std::sqrt(n));
  return v;
}

// Directions of one (sequence, KV head).
struct HeadDirs {
  std::vector<float> a, c;          // shared key direction, query topic
  std::vector<std::int64_t> heavy;  // heavy token positions
  std::vector<std::int32_t> perm;   // value = signed permutation of key
  std::vector<float> sign;
};

struct SeqData {
  std::vector<HeadDirs> heads;  // [kKvHeads]
};

SeqData make_dirs(std::uint64_t seed, std::int64_t n) {
  std::mt19937_64 rng(seed);
  SeqData s;
  for (int h = 0; h < kKvHeads; ++h) {
    HeadDirs d;
    d.a = unit(rng);
    d.c = unit(rng);
    // c orthogonal to a.
    double ac = 0;
    for (int i = 0; i < kD; ++i) ac += double{d.a[i]} * d.c[i];
    double cn = 0;
    for (int i = 0; i < kD; ++i) {
      d.c[i] -= static_cast<float>(ac * d.a[i]);
      cn += double{d.c[i]} * d.c[i];
    }
    for (auto& x : d.c) x = static_cast<float>(x / std::sqrt(cn));
    std::uniform_int_distribution<std::int64_t> pos(4, std::max<std::int64_t>(5, n - 65));
    for (int i = 0; i < 16; ++i) d.heavy.push_back(pos(rng));
    d.perm.resize(kD);
    std::iota(d.perm.begin(), d.perm.end(), 0);
    std::shuffle(d.perm.begin(), d.perm.end(), rng);
    for (int i = 0; i < kD; ++i) d.sign.push_back(rng() & 1 ? 1.0f : -1.0f);
    s.heads.push_back(std::move(d));
  }
  return s;
}

// K and V of one sequence, [n][kKvHeads][kD] bf16.
void make_kv(const SeqData& s, Data data, std::uint64_t seed, std::int64_t n, std::vector<bf16>* k,
             std::vector<bf16>* v, const CpuExecutor& ex) {
  const DataParams p = params(data);
  k->resize(static_cast<std::size_t>(n) * kKvHeads * kD);
  v->resize(k->size());
  ex.parallel_for((n + 1023) / 1024, [&](std::int64_t blk) {
    float kr[kD];
    for (std::int64_t t = blk * 1024; t < std::min(n, (blk + 1) * 1024); ++t) {
      for (int h = 0; h < kKvHeads; ++h) {
        const HeadDirs& d = s.heads[h];
        const std::uint64_t key = (seed * 1315423911u) ^ (std::uint64_t(t) << 8) ^ std::uint64_t(h);
        const float* nk = noise().row(key);
        const float* nv = noise().row(~key);
        const float shared = t == 0 ? -p.sink : p.key_shared;
        const bool heavy = std::find(d.heavy.begin(), d.heavy.end(), t) != d.heavy.end();
        for (int i = 0; i < kD; ++i)
          kr[i] = shared * d.a[i] + (heavy ? p.heavy * d.c[i] : 0.0f) + nk[i];
        const std::size_t off = (static_cast<std::size_t>(t) * kKvHeads + h) * kD;
        for (int i = 0; i < kD; ++i) {
          (*k)[off + i] = to_bf16(kr[i]);
          (*v)[off + i] = to_bf16(0.25f * d.sign[i] * kr[d.perm[i]] + nv[i]);
        }
      }
    }
  });
}

// Query batches: [batch][kQHeads][kD] f32 for sequences 0..kMaxBatch-1.
std::vector<float> make_queries(const std::vector<SeqData>& seqs, Data data, int which) {
  const DataParams p = params(data);
  std::vector<float> q(static_cast<std::size_t>(kMaxBatch) * kQHeads * kD);
  for (int b = 0; b < kMaxBatch; ++b)
    for (int h = 0; h < kQHeads; ++h) {
      const HeadDirs& d = seqs[b].heads[h / kG];
      const float* nq =
          noise().row(0x51ull ^ (std::uint64_t(which) << 20) ^ (std::uint64_t(b) << 10) ^ h);
      float* out = q.data() + (static_cast<std::size_t>(b) * kQHeads + h) * kD;
      for (int i = 0; i < kD; ++i)
        out[i] = -p.q_shared * d.a[i] + p.q_topic * d.c[i] + p.q_noise * nq[i];
    }
  return q;
}

std::int64_t mem_available() {
  std::ifstream f("/proc/meminfo");
  std::string k;
  std::int64_t v = 0;
  std::string unit;
  while (f >> k >> v >> unit)
    if (k == "MemAvailable:") return v * 1024;
  return std::int64_t{1} << 40;
}

const CpuExecutor& executor() {
  static const CpuExecutor ex;
  return ex;
}

LshConfig config_of(const std::string& name) {
  LshConfig c;
  if (name == "K8L75") {
    c.K = 8;
    c.L = 75;
  }
  return c;
}

// The one layer alive: kMaxBatch sequences of length n under one config.
struct Fixture {
  std::string cfg;
  std::int64_t n = 0;
  Data data = Data::kDiffuse;
  std::vector<SeqData> seqs;
  std::unique_ptr<LshAttention> layer;
  std::vector<std::vector<float>> queries;
};
std::unique_ptr<Fixture> g_fixture;

std::size_t layer_bytes(const std::string& cfg, std::int64_t n, int seqs) {
  const LshConfig c = config_of(cfg);
  const std::size_t kv = std::size_t(n) * kKvHeads * kD * 2 * 2;
  const std::size_t pos = n >= 65536 ? 4 : 2;
  const std::size_t index =
      std::size_t(c.L) * (std::size_t(n) * pos + (std::size_t{4} << c.K)) * kKvHeads;
  return (kv + index) * seqs;
}

Fixture* fixture(const std::string& cfg, std::int64_t n, Data data, std::string* err) {
  if (g_fixture && g_fixture->cfg == cfg && g_fixture->n == n && g_fixture->data == data)
    return g_fixture.get();
  g_fixture.reset();
  const std::size_t need = layer_bytes(cfg, n, kMaxBatch) + (std::size_t(n) * kKvHeads * kD * 4);
  if (static_cast<std::int64_t>(need) > mem_available() * 9 / 10) {
    *err = "not enough memory for this case (needs " + std::to_string(need >> 20) + " MiB)";
    return nullptr;
  }
  auto f = std::make_unique<Fixture>();
  f->cfg = cfg;
  f->n = n;
  f->data = data;
  LshShape shape{kQHeads, kKvHeads, kD, DType::kBF16, 0, n * kMaxBatch, kMaxBatch, 16, {}};
  if (!LshAttention::create(config_of(cfg), shape, &f->layer).is_ok()) {
    *err = "LshAttention::create failed";
    return nullptr;
  }
  std::vector<bf16> k, v;
  for (int b = 0; b < kMaxBatch; ++b) {
    f->seqs.push_back(make_dirs(1000 + b, n));
    make_kv(f->seqs.back(), data, 1000 + b, n, &k, &v, executor());
    if (Status st = f->layer->prefill(b, k.data(), v.data(), n, executor()); !st) {
      *err = std::string("prefill failed: ") + st.message();
      return nullptr;
    }
  }
  for (int i = 0; i < kQueryBatches; ++i) f->queries.push_back(make_queries(f->seqs, data, i));
  g_fixture = std::move(f);
  return g_fixture.get();
}

// Writes a buffer of 3x the last-level cache (96 MiB at least; 3x and 6x
// gave the same step times, 96 MiB against a 260 MiB L3 a step at kv:65536
// bs:1 6 % faster: docs/lsh.md), on every thread of the executor, so every
// core's private L2 is flushed too and every core has
// been busy just before the step, as in an engine whose attention threads
// come from other layers' work. (Written by the main thread alone, it left
// the other core's 2 MiB L2 as the previous step had left it, and that vCPU
// idle for the ~5 ms of the flush: measured inside one process, alternating
// every 16 steps, an LSH step at kv:65536 bs:1 took 1.71 and 2.01 ms after
// it against 1.57 and 1.67 after this flush; dense steps 10.5 and 10.9
// against 10.3 and 10.8 ms.)
void flush_cache() {
  static std::vector<std::uint64_t> buf(bench_cache::beyond(std::size_t{96} << 20, 3) /
                                        sizeof(std::uint64_t));
  static std::uint64_t tick = 0;
  ++tick;
  constexpr std::int64_t kChunks = 64;
  const std::size_t chunk = buf.size() / kChunks;
  executor().parallel_for(kChunks, [&](std::int64_t c) {
    const std::size_t begin = static_cast<std::size_t>(c) * chunk;
    for (std::size_t i = begin; i < begin + chunk; ++i) buf[i] += tick;
  });
  benchmark::DoNotOptimize(buf.data());
}

// Dense attention in double of query head h of sequence 0 over positions.
void attend_rows(const PagedKvView& kv, const float* q, std::int32_t h,
                 const std::vector<std::int64_t>& pos, std::vector<double>* o) {
  const double scale = 1.0 / std::sqrt(double(kD));
  std::vector<double> s(pos.size());
  double mx = -1e300;
  for (std::size_t j = 0; j < pos.size(); ++j) {
    const auto* k = reinterpret_cast<const bf16*>(hattn::detail::row_at(kv, 0, h / kG, pos[j]).k);
    double acc = 0;
    for (int i = 0; i < kD; ++i) acc += double{q[i]} * to_float(k[i]);
    s[j] = scale * acc;
    mx = std::max(mx, s[j]);
  }
  o->assign(kD, 0.0);
  double sum = 0;
  for (std::size_t j = 0; j < pos.size(); ++j) {
    const double w = std::exp(s[j] - mx);
    sum += w;
    const auto* v = reinterpret_cast<const bf16*>(hattn::detail::row_at(kv, 0, h / kG, pos[j]).v);
    for (int i = 0; i < kD; ++i) (*o)[i] += w * to_float(v[i]);
  }
  for (auto& x : *o) x /= sum;
}

double rel(const float* o, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (int i = 0; i < kD; ++i) {
    num += (o[i] - ref[i]) * (o[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / den);
}

void set_accuracy_counters(benchmark::State& state, Fixture& f, int bs) {
  std::vector<std::int64_t> ids(bs);
  std::iota(ids.begin(), ids.end(), 0);
  const float* q = f.queries[0].data();
  // Sampled fraction over the batch.
  double frac = 0;
  std::vector<std::int64_t> sampled;
  LshPartition part;
  for (int b = 0; b < bs; ++b) {
    (void)f.layer->partition(b, &part);
    for (int h = 0; h < kQHeads; ++h) {
      (void)f.layer->sampled_positions(b, h, q + (std::size_t(b) * kQHeads + h) * kD, &sampled);
      frac += double(sampled.size()) / double(part.tail_begin - part.sink_end);
    }
  }
  state.counters["sampled_fraction"] = frac / (bs * kQHeads);
  // Errors on sequence 0 against dense attention, and TopK at the same budget.
  std::vector<float> o(std::size_t(kQHeads) * kD), lse(kQHeads);
  const std::int64_t one[] = {0};
  (void)f.layer->decode(one, make_query_view(q, DType::kF32, 1, kQHeads, kD),
                        make_partial_view(o.data(), DType::kF32, lse.data(), 1, kQHeads, kD),
                        executor());
  PageTable table;
  PagedKvView kv;
  (void)f.layer->kv_view(one, &table, &kv);
  (void)f.layer->partition(0, &part);
  std::vector<double> err(kQHeads), terr(kQHeads);
  executor().parallel_for(kQHeads, [&](std::int64_t h) {
    const float* qh = q + h * kD;
    std::vector<std::int64_t> all(f.n), smp;
    std::iota(all.begin(), all.end(), 0);
    std::vector<double> exact, top;
    attend_rows(kv, qh, static_cast<std::int32_t>(h), all, &exact);
    (void)f.layer->sampled_positions(0, static_cast<std::int32_t>(h), qh, &smp);
    std::vector<std::pair<double, std::int64_t>> sc;
    for (std::int64_t t = part.sink_end; t < part.tail_begin; ++t) {
      const auto* k =
          reinterpret_cast<const bf16*>(hattn::detail::row_at(kv, 0, std::int32_t(h) / kG, t).k);
      double s = 0;
      for (int i = 0; i < kD; ++i) s += double{qh[i]} * to_float(k[i]);
      sc.emplace_back(-s, t);
    }
    std::partial_sort(sc.begin(), sc.begin() + static_cast<std::ptrdiff_t>(smp.size()), sc.end());
    std::vector<std::int64_t> keep;
    for (std::int64_t t = 0; t < part.sink_end; ++t) keep.push_back(t);
    for (std::int64_t t = part.tail_begin; t < part.length; ++t) keep.push_back(t);
    for (std::size_t i = 0; i < smp.size(); ++i) keep.push_back(sc[i].second);
    attend_rows(kv, qh, static_cast<std::int32_t>(h), keep, &top);
    err[h] = rel(o.data() + h * kD, exact);
    std::vector<float> tf(top.begin(), top.end());
    terr[h] = rel(tf.data(), exact);
  });
  state.counters["rel_error"] = std::accumulate(err.begin(), err.end(), 0.0) / kQHeads;
  state.counters["topk_rel_error"] = std::accumulate(terr.begin(), terr.end(), 0.0) / kQHeads;
  double index = 0, kvb = 0;
  for (int b = 0; b < bs; ++b) {
    LshMemory m;
    (void)f.layer->memory(b, &m);
    index += double(m.index);
    kvb += double(m.kv);
  }
  state.counters["index_bytes"] = index;
  state.counters["kv_bytes"] = kvb;
  state.counters["index_kv_ratio"] = index / kvb;
}

void bm_lsh(benchmark::State& state, std::string cfg, std::int64_t n, int bs, Data data) {
  std::string err;
  Fixture* f = fixture(cfg, n, data, &err);
  if (f == nullptr) {
    state.SkipWithError(err.c_str());
    return;
  }
  std::vector<std::int64_t> ids(bs);
  std::iota(ids.begin(), ids.end(), 0);
  std::vector<float> o(std::size_t(bs) * kQHeads * kD), lse(std::size_t(bs) * kQHeads);
  const PartialView out = make_partial_view(o.data(), DType::kF32, lse.data(), bs, kQHeads, kD);
  int it = 0;
  for (auto _ : state) {
    state.PauseTiming();
    flush_cache();
    const QueryView q =
        make_query_view(f->queries[it++ % kQueryBatches].data(), DType::kF32, bs, kQHeads, kD);
    state.ResumeTiming();
    if (Status st = f->layer->decode(ids, q, out, executor()); !st) {
      state.SkipWithError(st.message());
      return;
    }
  }
  set_accuracy_counters(state, *f, bs);
  state.SetLabel(std::string(to_string(f->layer->isa())));
}

// Dense decode over the first bs sequences of the fixture's layer (its own
// paged cache), planned once; the output buffers are shared with the lsh step.
struct DenseStep {
  std::vector<std::int64_t> ids;
  PageTable table;
  PagedKvView kv;
  DenseDecode dense;
  std::vector<std::byte> ws;
  DecodePlan plan;
  std::vector<float> o, lse;
  PartialView out;
  bool ok = false;

  DenseStep(Fixture& f, int bs) : ids(static_cast<std::size_t>(bs)) {
    std::iota(ids.begin(), ids.end(), 0);
    (void)f.layer->kv_view(ids, &table, &kv);
    const DecodeProblem p{bs, kQHeads, kKvHeads, kD, DType::kBF16, DType::kF32, DType::kF32, {}};
    ws.resize(DenseDecode::workspace_size(p));
    ok = dense.plan(p, kv, ws.data(), ws.size(), &plan).is_ok();
    o.resize(std::size_t(bs) * kQHeads * kD);
    lse.resize(std::size_t(bs) * kQHeads);
    out = make_partial_view(o.data(), DType::kF32, lse.data(), bs, kQHeads, kD);
  }
  DenseStep(const DenseStep&) = delete;
  DenseStep& operator=(const DenseStep&) = delete;
  Status run(const QueryView& q) { return dense.run(plan, q, kv, out, executor()); }
};

void bm_dense(benchmark::State& state, std::int64_t n, int bs) {
  std::string err;
  Fixture* f = g_fixture && g_fixture->n == n ? g_fixture.get()
                                              : fixture("K10L150", n, Data::kDiffuse, &err);
  if (f == nullptr) {
    state.SkipWithError(err.c_str());
    return;
  }
  DenseStep d(*f, bs);
  if (!d.ok) {
    state.SkipWithError("dense plan failed");
    return;
  }
  int it = 0;
  for (auto _ : state) {
    state.PauseTiming();
    flush_cache();
    const QueryView q =
        make_query_view(f->queries[it++ % kQueryBatches].data(), DType::kF32, bs, kQHeads, kD);
    state.ResumeTiming();
    if (!d.run(q).is_ok()) {
      state.SkipWithError("dense run failed");
      return;
    }
  }
  state.counters["kv_bytes"] = double(n) * bs * kKvHeads * kD * 2 * 2;
  state.SetLabel(std::string(to_string(d.dense.isa())));
}

// The lsh and dense steps of one shape paired in each iteration (alternating
// which goes first), so both see the host in the same state.
void bm_paired(benchmark::State& state, std::int64_t n, int bs) {
  std::string err;
  Fixture* f = fixture("K10L150", n, Data::kDiffuse, &err);
  std::unique_ptr<DenseStep> d = f != nullptr ? std::make_unique<DenseStep>(*f, bs) : nullptr;
  if (d == nullptr || !d->ok) {
    state.SkipWithError(f == nullptr ? err.c_str() : "dense plan failed");
    return;
  }
  std::vector<double> lsh_ms, dense_ms;
  int it = 0;
  for (auto _ : state) {
    // The timer runs for the lsh step only.
    state.PauseTiming();
    for (int k = 0; k < 2; ++k) {
      const bool run_lsh = (k == 0) == (it % 2 == 0);
      flush_cache();
      const QueryView q =
          make_query_view(f->queries[it % kQueryBatches].data(), DType::kF32, bs, kQHeads, kD);
      if (run_lsh) state.ResumeTiming();
      const auto t0 = std::chrono::steady_clock::now();
      const Status st = run_lsh ? f->layer->decode(d->ids, q, d->out, executor()) : d->run(q);
      const auto t1 = std::chrono::steady_clock::now();
      if (run_lsh) state.PauseTiming();
      if (!st) {
        state.SkipWithError(st.message());
        break;
      }
      (run_lsh ? lsh_ms : dense_ms)
          .push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    }
    state.ResumeTiming();
    ++it;
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0 : v[v.size() / 2];
  };
  const double lm = median(lsh_ms), dm = median(dense_ms);
  state.counters["lsh_ms"] = lm;
  state.counters["dense_ms"] = dm;
  state.counters["speedup"] = lm > 0 ? dm / lm : 0.0;
}

void bm_build(benchmark::State& state, std::int64_t n) {
  g_fixture.reset();  // room for this case
  if (static_cast<std::int64_t>(layer_bytes("K10L150", n, 2)) > mem_available() * 9 / 10) {
    state.SkipWithError("not enough memory for this case");
    return;
  }
  const SeqData dirs = make_dirs(7, n);
  std::vector<bf16> k, v;
  make_kv(dirs, Data::kDiffuse, 7, n, &k, &v, executor());
  LshShape shape{kQHeads, kKvHeads, kD, DType::kBF16, 0, n, 1, 16, {}};
  std::unique_ptr<LshAttention> layer;
  if (!LshAttention::create(LshConfig{}, shape, &layer).is_ok()) {
    state.SkipWithError("create failed");
    return;
  }
  for (auto _ : state) {
    if (!layer->prefill(1, k.data(), v.data(), n, executor()).is_ok()) {
      state.SkipWithError("prefill failed");
      return;
    }
    state.PauseTiming();
    (void)layer->release(1);
    state.ResumeTiming();
  }
  state.counters["tokens_per_second"] =
      benchmark::Counter(double(n), benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

int main(int argc, char** argv) {
  const std::int64_t lens[] = {16384, 65536, 131072};
  for (std::int64_t n : lens) {
    const std::string kv = "/kv:" + std::to_string(n);
    benchmark::RegisterBenchmark(("lsh_build/K10L150" + kv).c_str(), bm_build, n)
        ->Unit(benchmark::kMillisecond);
    for (const char* cfg : {"K10L150", "K8L75"}) {
      for (int bs : {1, 8})
        benchmark::RegisterBenchmark(
            ("lsh/" + std::string(cfg) + kv + "/bs:" + std::to_string(bs)).c_str(), bm_lsh,
            std::string(cfg), n, bs, Data::kDiffuse)
            ->Unit(benchmark::kMillisecond);
      if (std::string(cfg) == "K10L150")
        for (int bs : {1, 8})
          benchmark::RegisterBenchmark(
              ("cpu_dense/bf16" + kv + "/bs:" + std::to_string(bs)).c_str(), bm_dense, n, bs)
              ->Unit(benchmark::kMillisecond);
    }
    if (n == 65536)
      for (int bs : {1, 8})
        benchmark::RegisterBenchmark(
            ("lsh_peaky/K10L150" + kv + "/bs:" + std::to_string(bs)).c_str(), bm_lsh,
            std::string("K10L150"), n, bs, Data::kPeaky)
            ->Unit(benchmark::kMillisecond);
    if (n == 65536)
      for (int bs : {1, 8})
        benchmark::RegisterBenchmark(
            ("lsh_vs_dense/K10L150" + kv + "/bs:" + std::to_string(bs)).c_str(), bm_paired, n, bs)
            ->Unit(benchmark::kMillisecond);
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  g_fixture.reset();
  return 0;
}
