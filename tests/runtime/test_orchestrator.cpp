// The decode-step orchestrator on host streams: outputs bitwise equal to the
// same stages run in sequence, overlap of CPU attention with compute in the
// timeline, and failures that return a Status and leave the next step working.

#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/alloc_fail.hpp"
#include "common/seed.hpp"
#include "hattn/runtime/affinity.hpp"
#include "hattn/runtime/cpu_attention.hpp"
#include "hattn/runtime/host_stream.hpp"
#include "hattn/runtime/lsh_cpu_attention.hpp"
#include "hattn/runtime/orchestrator.hpp"
#include "runtime/timeline_check.hpp"
#include "runtime/toy_engine.hpp"

using hattn::Status;
using hattn::StatusCode;
using hattn::runtime::DecodeOrchestrator;
using hattn::runtime::DenseCpuAttention;
using hattn::runtime::HostKvCache;
using hattn::runtime::HostStream;
using hattn::runtime::OrchestratorOptions;
using hattn::runtime::PartitionPolicy;
using hattn::runtime::Phase;
using hattn::runtime::TimelineEntry;
using hattn_test::ToyConfig;
using hattn_test::ToyEngine;

namespace {

using Stages = hattn::runtime::EngineStages<HostStream*>;

// CPU attention threads. oneTBB is not built with ThreadSanitizer, which then
// cannot see the synchronization inside tbb::parallel_for and reports its task
// recycling as races; under TSan the arena has one thread (the backend runs
// inline), so TSan checks the orchestrator's own threads: the streams, the CPU
// attention thread, the ring and the events.
#if defined(__SANITIZE_THREAD__)
constexpr int kAttentionThreads = 1;
#else
constexpr int kAttentionThreads = 2;
#endif

OrchestratorOptions options_for(const ToyConfig& c) {
  OrchestratorOptions o;
  o.num_layers = c.num_layers;
  o.num_micro_batches = c.num_micro_batches;
  const auto B = static_cast<std::int32_t>(c.prefix_lens.size());
  o.slot = {.max_batch = (B + c.num_micro_batches - 1) / c.num_micro_batches,
            .num_q_heads = c.q_heads,
            .num_kv_heads = c.kv_heads,
            .head_dim = c.head_dim,
            .kv_dtype = c.kv_dtype,
            .code_bytes_per_seq = 0};
  return o;
}

hattn::DecodeProblem max_problem(const ToyConfig& c) {
  return {.batch_size = static_cast<std::int32_t>(c.prefix_lens.size()),
          .num_q_heads = c.q_heads,
          .num_kv_heads = c.kv_heads,
          .head_dim = c.head_dim,
          .kv_dtype = c.kv_dtype,
          .q_dtype = hattn::DType::kF32,
          .o_dtype = hattn::DType::kF32,
          .sm_scale = std::nullopt};
}

std::vector<std::int32_t> iota_seqs(std::int32_t n) {
  std::vector<std::int32_t> s(static_cast<std::size_t>(n));
  for (std::int32_t i = 0; i < n; ++i) s[static_cast<std::size_t>(i)] = i;
  return s;
}

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// Two engines and caches from the same seed: one run by the orchestrator, one
// run in sequence.
struct Pair {
  ToyConfig cfg;
  ToyEngine orch_engine, ref_engine;
  HostKvCache orch_kv, ref_kv;
  DenseCpuAttention orch_backend, ref_backend;
  Pair(const ToyConfig& c, std::uint64_t seed)
      : cfg(c),
        orch_engine(c, seed),
        ref_engine(c, seed),
        orch_kv(orch_engine.make_host_cache()),
        ref_kv(ref_engine.make_host_cache()),
        orch_backend(max_problem(c)),
        ref_backend(max_problem(c)) {}

  // After the orchestrated side's one successful step: runs one step of the
  // reference in sequence and checks both sides agree, bit for bit and in
  // their host KV lengths over the first num_seqs sequences.
  void check_one_sequential_step(const hattn::CpuExecutor& executor, std::int32_t num_seqs) {
    REQUIRE(hattn_test::run_sequential(ref_engine, ref_kv, ref_backend, executor,
                                       PartitionPolicy::all_cpu(), cfg.num_layers,
                                       cfg.num_micro_batches, 0));
    CHECK(bitwise_equal(orch_engine.x(), ref_engine.x()));
    for (std::int32_t l = 0; l < cfg.num_layers; ++l)
      for (std::int32_t i = 0; i < num_seqs; ++i)
        CHECK(orch_kv.seq_len(l, i) == ref_kv.seq_len(l, i));
  }
};

// A backend wrapper that can fail or block on a chosen (step, layer, mb).
template <class Inner>
struct Hooked {
  Inner* inner;
  std::function<Status(const hattn::runtime::CpuAttentionTask&)> hook;
  Status attend(const hattn::runtime::CpuAttentionTask& t, const hattn::CpuExecutor& ex) noexcept {
    if (hook) {
      const Status s = hook(t);
      if (!s) return s;
    }
    return inner->attend(t, ex);
  }
};

// A one-shot flag a thread can wait on with a timeout.
struct Flag {
  std::mutex mu;
  std::condition_variable cv;
  bool set = false;
  void raise() {
    {
      std::lock_guard<std::mutex> lk(mu);
      set = true;
    }
    cv.notify_all();
  }
  bool wait(std::chrono::milliseconds t) {
    std::unique_lock<std::mutex> lk(mu);
    return cv.wait_for(lk, t, [&] { return set; });
  }
};

bool overlaps(const TimelineEntry& a, const TimelineEntry& b) {
  return a.begin_ns < b.end_ns && b.begin_ns < a.end_ns;
}

}  // namespace

TEST_CASE("HostKvCache::truncate keeps the first tokens, frees the rest, and checks its input",
          "[runtime]") {
  hattn::PagePoolOptions o;
  o.dtype = hattn::DType::kF32;
  o.num_kv_heads = 2;
  o.head_dim = 4;
  o.page_size = 4;
  o.num_pages = 16;
  HostKvCache kv(2, o);
  std::int32_t a = -1, b = -1;
  REQUIRE(kv.add_sequence(&a).is_ok());
  REQUIRE(kv.add_sequence(&b).is_ok());
  const std::int64_t n = 11, row = 2 * 4;
  std::vector<float> k(n * row), v(n * row);
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = static_cast<float>(i);
    v[i] = -static_cast<float>(i);
  }
  for (std::int32_t l = 0; l < 2; ++l) {
    REQUIRE(kv.append(l, a, k.data(), v.data(), n).is_ok());
    REQUIRE(kv.append(l, b, k.data(), v.data(), 3).is_ok());
  }
  const std::int64_t free_before = kv.pool(1).free_pages();
  REQUIRE(kv.truncate(1, a, 5).is_ok());  // 3 pages -> 2
  CHECK(kv.seq_len(1, a) == 5);
  CHECK(kv.seq_len(0, a) == n);  // other layers keep theirs
  CHECK(kv.pool(1).free_pages() == free_before + 1);
  // The kept tokens read back unchanged, then an append continues them.
  REQUIRE(kv.append(1, a, k.data() + 5 * row, v.data() + 5 * row, n - 5).is_ok());
  hattn::PageTable table;
  const std::int32_t seqs[] = {a};
  const std::int64_t all[] = {n};
  REQUIRE(kv.build_page_table(1, seqs, all, 1, &table).is_ok());
  const hattn::PagedKvView view = kv.pool(1).view(table);
  for (std::int64_t t = 0; t < n; ++t)
    for (std::int32_t h = 0; h < 2; ++h)
      for (std::int32_t d = 0; d < 4; ++d) {
        const std::int64_t page = table.indices[static_cast<std::size_t>(t / 4)];
        const std::int64_t off = page * view.k_strides.outer + (t % 4) * view.k_strides.token +
                                 h * view.k_strides.head + d;
        CHECK(static_cast<const float*>(view.k)[off] == k[t * row + h * 4 + d]);
        CHECK(static_cast<const float*>(view.v)[off] == v[t * row + h * 4 + d]);
      }
  CHECK(kv.truncate(1, a, n).is_ok());  // to its own length: nothing to do
  CHECK(kv.truncate(1, a, n + 1).code() == StatusCode::kInvalidArgument);
  CHECK(kv.truncate(1, a, -1).code() == StatusCode::kInvalidArgument);
  CHECK(kv.truncate(2, a, 0).code() == StatusCode::kInvalidArgument);
  CHECK(kv.truncate(0, 7, 0).code() == StatusCode::kInvalidArgument);
  REQUIRE(kv.truncate(0, b, 0).is_ok());
  CHECK(kv.seq_len(0, b) == 0);
}

TEST_CASE("HostStream runs in order; events order work across streams", "[runtime]") {
  HostStream s1, s2;
  hattn::runtime::HostEvent e;
  std::vector<int> log;
  std::mutex mu;
  auto push = [&](int v) {
    std::lock_guard<std::mutex> lk(mu);
    log.push_back(v);
  };
  Flag gate;
  REQUIRE(s1.enqueue([&](HostStream*) {
    gate.wait(std::chrono::seconds(10));
    push(1);
    return Status::ok();
  }));
  REQUIRE(e.record(s1));
  REQUIRE(e.wait(s2));
  REQUIRE(s2.enqueue([&](HostStream*) {
    push(2);
    return Status::ok();
  }));
  // s2's work cannot have run: it waits for s1, which waits for the gate.
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  {
    std::lock_guard<std::mutex> lk(mu);
    CHECK(log.empty());
  }
  CHECK_FALSE(e.query());
  gate.raise();
  REQUIRE(s2.synchronize());
  CHECK(e.query());
  CHECK(log == std::vector<int>{1, 2});
}

TEST_CASE("HostStream errors are sticky until synchronize, deadlines return", "[runtime]") {
  HostStream s;
  int ran = 0, fn_ran = 0;
  REQUIRE(s.enqueue([](HostStream*) -> Status { throw std::runtime_error("boom"); }));
  REQUIRE(s.enqueue([&](HostStream*) {
    ++ran;
    return Status::ok();
  }));
  REQUIRE(s.host_fn([&] { ++fn_ran; }));
  const Status st = s.synchronize();
  CHECK(st == StatusCode::kInternal);
  CHECK(ran == 0);     // skipped after the error
  CHECK(fn_ran == 1);  // host_fn always runs
  CHECK(s.query());    // cleared
  REQUIRE(s.enqueue([&](HostStream*) {
    ++ran;
    return Status::ok();
  }));
  CHECK(s.synchronize());
  CHECK(ran == 1);

  Flag gate;
  REQUIRE(s.enqueue([&](HostStream*) {
    gate.wait(std::chrono::seconds(10));
    return Status::ok();
  }));
  const Status late = s.synchronize(hattn::runtime::deadline_after(std::chrono::milliseconds(20)));
  CHECK(late == StatusCode::kInternal);
  CHECK(std::string(late.message()).find("deadline") != std::string::npos);
  gate.raise();
  CHECK(s.synchronize());
}

TEST_CASE("SlotRing: phases, backpressure and a producer/consumer stream", "[runtime]") {
  using hattn::runtime::SlotRing;
  const hattn::runtime::SlotShape shape{.max_batch = 2,
                                        .num_q_heads = 4,
                                        .num_kv_heads = 2,
                                        .head_dim = 8,
                                        .kv_dtype = hattn::DType::kBF16,
                                        .code_bytes_per_seq = 16};
  SlotRing ring(shape, 2);
  const auto soon = [] { return hattn::runtime::deadline_after(std::chrono::milliseconds(10)); };
  REQUIRE(ring.acquire(0, soon()));
  REQUIRE(ring.acquire(1, soon()));
  // Full: position 2 needs slot 0, still held by position 0.
  CHECK(ring.acquire(2, soon()) == StatusCode::kInternal);
  CHECK(ring.phase(0) == 0);
  ring.publish_request(0);
  CHECK(ring.phase(0) == 1);
  CHECK(ring.wait_request(0, soon()));
  CHECK_FALSE(ring.wait_request(1, soon()));
  ring.publish_response(0);
  REQUIRE(ring.wait_response(0, soon()));
  ring.release(0);
  CHECK(ring.phase(0) == -1);
  CHECK(ring.phase(2) == 0);
  REQUIRE(ring.acquire(2, soon()));
  // Buffers of different slots do not overlap.
  const auto b0 = ring.buffers(0), b1 = ring.buffers(1);
  CHECK(b0.codes != nullptr);
  CHECK(reinterpret_cast<std::byte*>(b0.lse2) < reinterpret_cast<std::byte*>(b1.q));

  // Three threads pass 3000 positions through a ring of 3: every request is
  // seen whole by the CPU side and every response by the consumer.
  SlotRing r3(shape, 3);
  constexpr std::int64_t kN = 3000;
  std::atomic<bool> stop{false};
  std::atomic<std::int64_t> bad{0};
  std::thread cpu([&] {
    for (std::int64_t p = 0; p < kN; ++p) {
      if (!r3.wait_request(p, hattn::runtime::Deadline::max(), &stop)) return;
      const auto b = r3.buffers(p);
      if (b.q[0] != static_cast<float>(p) || b.q[63] != static_cast<float>(p)) ++bad;
      b.o[0] = static_cast<float>(2 * p);
      r3.publish_response(p);
    }
  });
  std::thread consumer([&] {
    for (std::int64_t p = 0; p < kN; ++p) {
      if (!r3.wait_response(p, hattn::runtime::deadline_after(std::chrono::seconds(30)))) {
        ++bad;
        return;
      }
      if (r3.buffers(p).o[0] != static_cast<float>(2 * p)) ++bad;
      r3.release(p);
    }
  });
  for (std::int64_t p = 0; p < kN; ++p) {
    REQUIRE(r3.acquire(p, hattn::runtime::deadline_after(std::chrono::seconds(30))));
    const auto b = r3.buffers(p);
    for (int i = 0; i < 64; ++i) b.q[i] = static_cast<float>(p);
    r3.publish_request(p);
  }
  consumer.join();
  stop = true;
  r3.wake();
  cpu.join();
  CHECK(bad == 0);
}

TEST_CASE("Orchestrated steps are bitwise equal to the stages run in sequence", "[runtime]") {
  struct Case {
    std::int32_t layers, mbs;
    std::vector<std::int64_t> lens;
  };
  std::mt19937_64 rng = hattn_test::make_rng("orchestrator equality");
  std::uniform_int_distribution<std::int64_t> len(1, 300);
  auto ragged = [&](int n) {
    std::vector<std::int64_t> v(static_cast<std::size_t>(n));
    for (auto& x : v) x = len(rng);
    return v;
  };
  std::vector<Case> cases;
  for (std::int32_t layers : {1, 3, 8})
    for (std::int32_t mbs : {1, 2, 3, 4})
      for (int b : {1, 5, 8}) cases.push_back({layers, mbs, ragged(b)});
  cases.push_back({2, 2, {15, 16, 17, 1}});  // around the page size

  const std::pair<const char*, PartitionPolicy> policies[] = {
      {"all_cpu", PartitionPolicy::all_cpu()},
      {"device_tail", PartitionPolicy::device_tail(5, 1)},
      {"all_device", PartitionPolicy::all_device()}};
  hattn::CpuExecutor executor(kAttentionThreads);
  int ci = 0;
  for (const Case& c : cases) {
    for (const auto& [pname, policy] : policies) {
      ToyConfig cfg;
      cfg.num_layers = c.layers;
      cfg.num_micro_batches = c.mbs;
      cfg.prefix_lens = c.lens;
      cfg.kv_dtype = ci % 2 ? hattn::DType::kBF16 : hattn::DType::kF32;
      // Every third case with the smallest ring (one slot per micro-batch):
      // each slot is taken again right after its response is copied out.
      OrchestratorOptions opt = options_for(cfg);
      if (ci % 3 == 1) opt.ring_slots = c.mbs;
      INFO("layers=" << c.layers << " mbs=" << c.mbs << " batch=" << c.lens.size()
                     << " policy=" << pname << " ring_slots=" << opt.ring_slots << " "
                     << hattn_test::seed_note());
      Pair p(cfg, rng());
      const auto seqs = iota_seqs(static_cast<std::int32_t>(c.lens.size()));
      {
        HostStream compute, copy;
        DecodeOrchestrator<HostStream, DenseCpuAttention> orch(opt, compute, copy, p.orch_kv,
                                                               p.orch_backend, executor, policy);
        const Stages st = p.orch_engine.stages<HostStream*>();
        for (std::int32_t step = 0; step < 2; ++step) {
          const Status s = orch.step(seqs, p.orch_engine.io(), st);
          INFO("step " << step << ": " << s.message());
          REQUIRE(s);
          REQUIRE(hattn_test::run_sequential(p.ref_engine, p.ref_kv, p.ref_backend, executor,
                                             policy, c.layers, c.mbs, step));
          CHECK(bitwise_equal(p.orch_engine.x(), p.ref_engine.x()));
        }
        // Every stage of every (layer, micro-batch) is in the timeline, in order.
        hattn_test::check_timeline(
            orch.timeline().entries(), 2, c.layers,
            static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(c.mbs), c.lens.size())),
            0);
      }
      for (std::int32_t l = 0; l < c.layers; ++l)
        for (std::int32_t b = 0; b < static_cast<std::int32_t>(c.lens.size()); ++b)
          CHECK(p.orch_kv.seq_len(l, b) == c.lens[static_cast<std::size_t>(b)] + 2);
    }
    ++ci;
  }
}

TEST_CASE("The timeline shows CPU attention of one micro-batch during compute of another",
          "[runtime]") {
  // A rendezvous makes the overlap certain when the pipeline allows it and
  // impossible when it does not: stage A of (layer 0, mb 1) and the CPU
  // attention of (layer 0, mb 0) each wait (10 s at most) for the other to
  // have started. An orchestrator that ran them one after the other would
  // miss the rendezvous.
  ToyConfig cfg;
  cfg.num_layers = 3;
  cfg.num_micro_batches = 2;
  cfg.prefix_lens = {40, 70, 90, 20};
  Pair p(cfg, hattn_test::make_rng("overlap")());
  Flag a_started, cpu_started;
  std::atomic<bool> a_saw_cpu{false}, cpu_saw_a{false};
  std::atomic<int> new_kv_mismatches{0};
  Hooked<DenseCpuAttention> backend{
      &p.orch_backend, [&](const auto& t) {
        // new_k/new_v are the last token of the host KV
        // (all-CPU policy: the view is whole).
        const auto& kv = t.kv;
        const std::size_t es = hattn::size_of(kv.dtype);
        for (std::int32_t b = 0; b < kv.batch_size; ++b) {
          const std::int64_t page = kv.indices[kv.indptr[b + 1] - 1];
          const std::int64_t off = kv.last_page_len[b] - 1;
          for (std::int32_t h = 0; h < kv.num_kv_heads; ++h) {
            const std::int64_t at =
                page * kv.k_strides.outer + off * kv.k_strides.token + h * kv.k_strides.head;
            const std::int64_t src = (std::int64_t{b} * kv.num_kv_heads + h) * kv.head_dim;
            const auto* k = static_cast<const std::byte*>(kv.k);
            const auto* v = static_cast<const std::byte*>(kv.v);
            const auto* nk = static_cast<const std::byte*>(t.new_k);
            const auto* nv = static_cast<const std::byte*>(t.new_v);
            if (std::memcmp(k + at * es, nk + src * es, kv.head_dim * es) != 0 ||
                std::memcmp(v + at * es, nv + src * es, kv.head_dim * es) != 0)
              ++new_kv_mismatches;
          }
        }
        if (t.layer == 0 && t.micro_batch == 0) {
          cpu_started.raise();
          cpu_saw_a = a_started.wait(std::chrono::seconds(10));
        }
        return Status::ok();
      }};
  Stages st = p.orch_engine.stages<HostStream*>();
  auto a = st.stage_a;
  st.stage_a = [&, a](const hattn::runtime::StageContext& c, HostStream* h) {
    if (c.layer == 0 && c.micro_batch == 1) {
      a_started.raise();
      a_saw_cpu = cpu_started.wait(std::chrono::seconds(10));
    }
    return a(c, h);
  };
  hattn::CpuExecutor executor(1);
  HostStream compute, copy;
  DecodeOrchestrator<HostStream, Hooked<DenseCpuAttention>> orch(options_for(cfg), compute, copy,
                                                                 p.orch_kv, backend, executor);
  const auto seqs = iota_seqs(4);
  REQUIRE(orch.step(seqs, p.orch_engine.io(), st));
  CHECK(a_saw_cpu);
  CHECK(cpu_saw_a);
  CHECK(new_kv_mismatches == 0);
  const auto es = orch.timeline().entries();
  bool found = false;
  for (const TimelineEntry& c : es)
    for (const TimelineEntry& g : es)
      if (c.phase == Phase::kCpuAttention &&
          (g.phase == Phase::kStageA || g.phase == Phase::kStageB) &&
          c.micro_batch != g.micro_batch && overlaps(c, g))
        found = true;
  CHECK(found);

  // The Chrome trace is valid JSON with one complete event per entry.
  const auto j = nlohmann::json::parse(orch.timeline().to_chrome_trace());
  std::size_t complete = 0;
  for (const auto& ev : j.at("traceEvents"))
    if (ev.at("ph") == "X") {
      ++complete;
      CHECK(ev.at("dur").get<double>() >= 0.0);
    }
  CHECK(complete == es.size());
}

TEST_CASE("Failures return a Status and the next step succeeds", "[runtime]") {
  ToyConfig cfg;
  cfg.num_layers = 4;
  cfg.num_micro_batches = 2;
  cfg.prefix_lens = {33, 64, 5, 100, 17};
  const auto seqs = iota_seqs(5);
  hattn::CpuExecutor executor(kAttentionThreads);

  enum class Kind { kThrowingStage, kFailingStage, kBackendError, kStalledStage };
  const Kind kinds[] = {Kind::kThrowingStage, Kind::kFailingStage, Kind::kBackendError,
                        Kind::kStalledStage};
  static constexpr char kInjected[] = "injected backend error";
  for (const Kind kind : kinds) {
    INFO("failure kind " << static_cast<int>(kind));
    Pair p(cfg, hattn_test::make_rng("failures")());
    std::atomic<bool> armed{true};
    Flag release_stall;
    Hooked<DenseCpuAttention> backend{
        &p.orch_backend, [&](const auto& t) -> Status {
          if (kind == Kind::kBackendError && armed && t.layer == 2 && t.micro_batch == 1)
            return {StatusCode::kInvalidArgument, kInjected};
          return Status::ok();
        }};
    Stages st = p.orch_engine.stages<HostStream*>();
    auto b = st.stage_b;
    st.stage_b = [&, b](const hattn::runtime::StageContext& c, HostStream* h) -> Status {
      if (armed && c.layer == 1 && c.micro_batch == 1) {
        if (kind == Kind::kThrowingStage) throw std::runtime_error("stage B failed");
        if (kind == Kind::kFailingStage) return {StatusCode::kOutOfMemory, "engine out of memory"};
        if (kind == Kind::kStalledStage) release_stall.wait(std::chrono::seconds(20));
      }
      return b(c, h);
    };
    OrchestratorOptions opt = options_for(cfg);
    opt.step_timeout = std::chrono::milliseconds(kind == Kind::kStalledStage ? 300 : 20000);
    HostStream compute, copy;
    DecodeOrchestrator<HostStream, Hooked<DenseCpuAttention>> orch(opt, compute, copy, p.orch_kv,
                                                                   backend, executor);
    p.orch_engine.save();
    const Status s = orch.step(seqs, p.orch_engine.io(), st);
    REQUIRE_FALSE(s);
    switch (kind) {
      case Kind::kThrowingStage: CHECK(s == StatusCode::kInternal); break;
      case Kind::kFailingStage: CHECK(s == StatusCode::kOutOfMemory); break;
      case Kind::kBackendError: CHECK(s.message() == kInjected); break;
      case Kind::kStalledStage:
        CHECK(s == StatusCode::kInternal);
        CHECK(std::string(s.message()).find("deadline") != std::string::npos);
        break;
    }
    armed = false;
    release_stall.raise();
    // Once the orchestrator is idle (the stalled stage has finished), the
    // engine undoes its side; the orchestrator has undone the host KV.
    REQUIRE(orch.wait_idle(hattn::runtime::deadline_after(std::chrono::seconds(20))));
    p.orch_engine.restore();
    const Status next = orch.step(seqs, p.orch_engine.io(), st);
    INFO(next.message());
    REQUIRE(next);
    p.check_one_sequential_step(executor, 5);
  }
}

TEST_CASE("An allocation failure on the issuing thread fails the step with a Status, rolled back",
          "[runtime][errors]") {
  // Step k fails the k-th allocation step() makes on this thread (its inputs'
  // copies, the queued work, the streams' events), for k = 0, 1, ... until a
  // step makes fewer. Each failed step must return a Status, not throw, and
  // be undone: the one step that succeeds at the end must equal a single step
  // run in sequence. (Found: the events drain and finish wait on let
  // bad_alloc out of step(), with the step not rolled back.)
  ToyConfig cfg;
  cfg.num_layers = 3;
  cfg.num_micro_batches = 2;
  cfg.prefix_lens = {33, 64, 5};
  const auto seqs = iota_seqs(3);
  hattn::CpuExecutor executor(kAttentionThreads);
  Pair p(cfg, hattn_test::make_rng("alloc-failures")());
  const Stages st = p.orch_engine.stages<HostStream*>();
  HostStream compute, copy;
  DecodeOrchestrator<HostStream, DenseCpuAttention> orch(options_for(cfg), compute, copy, p.orch_kv,
                                                         p.orch_backend, executor);
  long failed = 0;
  for (long k = 0;; ++k) {
    INFO("allocation " << k << " failed");
    p.orch_engine.save();
    hattn_test::fail_allocation_in(k);
    Status s;
    bool threw = false;
    try {
      s = orch.step(seqs, p.orch_engine.io(), st);
    } catch (...) {
      threw = true;
    }
    hattn_test::fail_allocation_in(-1);
    REQUIRE_FALSE(threw);
    if (s) break;
    ++failed;
    CHECK(s == StatusCode::kOutOfMemory);
    REQUIRE(orch.wait_idle(hattn::runtime::deadline_after(std::chrono::seconds(20))));
    p.orch_engine.restore();
  }
  CHECK(failed > 0);
  p.check_one_sequential_step(executor, 3);
}

TEST_CASE("Orchestrator rejects bad input with a Status", "[runtime]") {
  ToyConfig cfg;
  cfg.prefix_lens = {10, 20, 30};
  Pair p(cfg, 7);
  hattn::CpuExecutor executor(1);
  HostStream compute, copy;
  DecodeOrchestrator<HostStream, DenseCpuAttention> orch(options_for(cfg), compute, copy, p.orch_kv,
                                                         p.orch_backend, executor);
  const Stages st = p.orch_engine.stages<HostStream*>();
  const std::vector<std::int32_t> unknown{0, 1, 9}, twice{0, 1, 1}, none{};
  CHECK(orch.step(unknown, p.orch_engine.io(), st) == StatusCode::kInvalidArgument);
  CHECK(orch.step(none, p.orch_engine.io(), st) == StatusCode::kInvalidArgument);
  CHECK(orch.step(twice, p.orch_engine.io(), st) == StatusCode::kInvalidArgument);
  Stages missing = st;
  missing.stage_b = nullptr;
  CHECK(orch.step(iota_seqs(3), p.orch_engine.io(), missing) == StatusCode::kInvalidArgument);
  // Still usable, and the failed steps left the KV as it was.
  REQUIRE(orch.step(iota_seqs(3), p.orch_engine.io(), st));
  REQUIRE(hattn_test::run_sequential(p.ref_engine, p.ref_kv, p.ref_backend, executor,
                                     PartitionPolicy::all_cpu(), cfg.num_layers,
                                     cfg.num_micro_batches, 0));
  CHECK(bitwise_equal(p.orch_engine.x(), p.ref_engine.x()));
}

namespace {

using hattn::runtime::LshCpuAttention;

// Small LSH settings so short test sequences have sink, indexed and tail
// parts, and every other step moves a tail token into the index.
hattn::cpu::LshConfig small_lsh() {
  hattn::cpu::LshConfig c;
  c.K = 6;
  c.L = 30;
  c.min_collisions = 2;
  c.sink = 4;
  c.window = 8;
  c.max_exact_tail = 9;
  return c;
}

hattn::cpu::LshShape lsh_shape(const ToyConfig& c) {
  std::int64_t tokens = 0;
  for (std::int64_t len : c.prefix_lens) tokens += len + 16;
  return {.num_q_heads = c.q_heads,
          .num_kv_heads = c.kv_heads,
          .head_dim = c.head_dim,
          .kv_dtype = c.kv_dtype,
          .layer = 0,
          .max_tokens = 2 * tokens,  // room for a rebuilt sequence next to the old one
          .max_sequences = static_cast<std::int32_t>(c.prefix_lens.size()) + 1,
          .page_size = 16,
          .sm_scale = std::nullopt};
}

struct LshPair {
  ToyConfig cfg;
  ToyEngine orch_engine, ref_engine;
  HostKvCache orch_kv, ref_kv;
  LshCpuAttention orch_backend, ref_backend;
  LshPair(const ToyConfig& c, std::uint64_t seed, const hattn::CpuExecutor& ex)
      : cfg(c),
        orch_engine(c, seed),
        ref_engine(c, seed),
        orch_kv(orch_engine.make_host_cache()),
        ref_kv(ref_engine.make_host_cache()),
        orch_backend(small_lsh(), lsh_shape(c), orch_kv, options_for(c).slot.max_batch),
        ref_backend(small_lsh(), lsh_shape(c), ref_kv, options_for(c).slot.max_batch) {
    if (!orch_backend.prefill_from_cache(ex) || !ref_backend.prefill_from_cache(ex))
      throw std::runtime_error("LSH prefill failed");
  }
};

}  // namespace

TEST_CASE("Orchestrated steps with the LSH backend are bitwise equal to the sequence",
          "[runtime][lsh]") {
  std::mt19937_64 rng = hattn_test::make_rng("orchestrator lsh equality");
  std::uniform_int_distribution<std::int64_t> len(1, 300);
  hattn::CpuExecutor executor(kAttentionThreads);
  int ci = 0;
  for (std::int32_t layers : {1, 3})
    for (std::int32_t mbs : {1, 2, 3})
      for (int b : {1, 5}) {
        ToyConfig cfg;
        cfg.num_layers = layers;
        cfg.num_micro_batches = mbs;
        for (int i = 0; i < b; ++i) cfg.prefix_lens.push_back(len(rng));
        cfg.kv_dtype = ci++ % 2 ? hattn::DType::kBF16 : hattn::DType::kF32;
        for (const char* pname : {"all_cpu", "lsh_split", "all_device"}) {
          INFO("layers=" << layers << " mbs=" << mbs << " batch=" << b << " policy=" << pname << " "
                         << hattn_test::seed_note());
          LshPair p(cfg, rng(), executor);
          const std::string pn = pname;
          auto policy_of = [&](const LshCpuAttention& a) {
            return pn == "all_cpu"     ? PartitionPolicy::all_cpu()
                   : pn == "lsh_split" ? a.policy(1)
                                       : PartitionPolicy::all_device();
          };
          const PartitionPolicy orch_policy = policy_of(p.orch_backend);
          const PartitionPolicy ref_policy = policy_of(p.ref_backend);
          const auto seqs = iota_seqs(b);
          HostStream compute, copy;
          DecodeOrchestrator<HostStream, LshCpuAttention> orch(
              options_for(cfg), compute, copy, p.orch_kv, p.orch_backend, executor, orch_policy);
          const Stages st = p.orch_engine.stages<HostStream*>();
          std::int64_t split_seen = 0;
          for (std::int32_t step = 0; step < 3; ++step) {
            // The split policy gives the device the LSH tail: count how often.
            for (std::int32_t l = 0; l < layers; ++l)
              for (std::int32_t s = 0; s < b; ++s) {
                const std::int64_t n = p.orch_kv.seq_len(l, s) + 1;
                const std::int64_t c = orch_policy.cpu_tokens(l, s, n);
                split_seen += c > 0 && c < n;
              }
            const Status s = orch.step(seqs, p.orch_engine.io(), st);
            INFO("step " << step << ": " << s.message());
            REQUIRE(s);
            REQUIRE(hattn_test::run_sequential(p.ref_engine, p.ref_kv, p.ref_backend, executor,
                                               ref_policy, layers, mbs, step));
            CHECK(bitwise_equal(p.orch_engine.x(), p.ref_engine.x()));
          }
          if (pn == "lsh_split" && layers > 1)
            for (std::int64_t l : cfg.prefix_lens)
              if (l > 16) CHECK(split_seen > 0);
          // The LSH copy holds what the host KV holds.
          for (std::int32_t l = 0; l < layers; ++l)
            for (std::int32_t s = 0; s < b; ++s) {
              hattn::cpu::LshPartition part;
              REQUIRE(p.orch_backend.layer(l).partition(s, &part));
              CHECK(part.length == p.orch_kv.seq_len(l, s));
            }
        }
      }
}

TEST_CASE("LSH backend: a failed step is rolled back and the next equals the sequence",
          "[runtime][lsh]") {
  ToyConfig cfg;
  cfg.num_layers = 3;
  cfg.num_micro_batches = 2;
  cfg.prefix_lens = {33, 64, 5, 100, 17};
  const auto seqs = iota_seqs(5);
  hattn::CpuExecutor executor(kAttentionThreads);
  static constexpr char kInjected[] = "injected LSH error";
  for (const bool split : {false, true})
    for (const bool backend_error : {false, true}) {
      INFO("split=" << split << " backend_error=" << backend_error);
      LshPair p(cfg, hattn_test::make_rng("lsh failures")(), executor);
      const PartitionPolicy orch_policy =
          split ? p.orch_backend.policy(1) : PartitionPolicy::all_cpu();
      const PartitionPolicy ref_policy =
          split ? p.ref_backend.policy(1) : PartitionPolicy::all_cpu();
      std::atomic<bool> armed{true};
      Hooked<LshCpuAttention> backend{
          &p.orch_backend, [&](const auto& t) -> Status {
            if (backend_error && armed && t.layer == 2 && t.micro_batch == 1)
              return {StatusCode::kInvalidArgument, kInjected};
            return Status::ok();
          }};
      Stages st = p.orch_engine.stages<HostStream*>();
      auto b = st.stage_b;
      st.stage_b = [&, b](const hattn::runtime::StageContext& c, HostStream* h) -> Status {
        if (!backend_error && armed && c.layer == 2 && c.micro_batch == 1)
          throw std::runtime_error("stage B failed");
        return b(c, h);
      };
      HostStream compute, copy;
      DecodeOrchestrator<HostStream, Hooked<LshCpuAttention>> orch(
          options_for(cfg), compute, copy, p.orch_kv, backend, executor, orch_policy);
      p.orch_engine.save();
      const Status s = orch.step(seqs, p.orch_engine.io(), st);
      REQUIRE_FALSE(s);
      if (backend_error) CHECK(s.message() == std::string(kInjected));
      armed = false;
      REQUIRE(orch.wait_idle(hattn::runtime::deadline_after(std::chrono::seconds(20))));
      p.orch_engine.restore();
      // Before resync some LSH copies are a token ahead of the host KV.
      REQUIRE(p.orch_backend.resync(executor));
      for (std::int32_t step = 0; step < 2; ++step) {
        const Status next = orch.step(seqs, p.orch_engine.io(), st);
        INFO(next.message());
        REQUIRE(next);
        REQUIRE(hattn_test::run_sequential(p.ref_engine, p.ref_kv, p.ref_backend, executor,
                                           ref_policy, cfg.num_layers, cfg.num_micro_batches,
                                           step));
        CHECK(bitwise_equal(p.orch_engine.x(), p.ref_engine.x()));
      }
    }
}

TEST_CASE("Thread placement hooks run on the stream and CPU attention threads", "[runtime]") {
  CHECK(hattn::runtime::pin_this_thread(-1) == StatusCode::kInvalidArgument);
  std::atomic<bool> pinned_ok{false};
  std::thread t([&] {
    if (!hattn::runtime::pin_this_thread(0)) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    pinned_ok = pthread_getaffinity_np(pthread_self(), sizeof(set), &set) == 0 &&
                CPU_COUNT(&set) == 1 && CPU_ISSET(0, &set);
  });
  t.join();
  CHECK(pinned_ok);

  std::atomic<std::thread::id> init_thread{}, work_thread{};
  {
    HostStream s([&] { init_thread = std::this_thread::get_id(); });
    REQUIRE(s.enqueue([&](HostStream*) {
      work_thread = std::this_thread::get_id();
      return Status::ok();
    }));
    REQUIRE(s.synchronize());
  }
  CHECK(init_thread.load() == work_thread.load());
  CHECK(init_thread.load() != std::this_thread::get_id());

  ToyConfig cfg;
  cfg.prefix_lens = {10, 20};
  Pair p(cfg, 11);
  hattn::CpuExecutor executor(1);
  std::atomic<int> inits{0};
  OrchestratorOptions opt = options_for(cfg);
  opt.cpu_thread_init = [&] { ++inits; };
  HostStream compute, copy;
  {
    DecodeOrchestrator<HostStream, DenseCpuAttention> orch(opt, compute, copy, p.orch_kv,
                                                           p.orch_backend, executor);
    REQUIRE(orch.step(iota_seqs(2), p.orch_engine.io(), p.orch_engine.stages<HostStream*>()));
  }
  CHECK(inits == 1);
}
