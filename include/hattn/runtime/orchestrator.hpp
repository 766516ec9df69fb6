#pragma once
// DecodeOrchestrator: one decode step, layer by layer, with the engine's
// compute overlapped with CPU attention (NEO's asymmetric pipelining, Lamina's
// staggered pipelining). For each layer l and micro-batch m:
//
//   compute stream:  stage A(l,m) [device attn]   ... wait(slot answered) o,lse2 in [merge] B(l,m)
//   copy stream:        wait(A) q,k,v -> ring slot, publish
//   CPU thread:                         append k,v + attend, answer
//
// Work is issued in the order A(0,0..M-1), then for each (l, m): the back
// half of (l,m) (B), then A(l+1,m). So while the CPU attends micro-batch m,
// the compute stream runs B and the next layer's A of the other micro-batches:
// with M >= 2 and compute ~ attention both stay busy; with M = 1 they
// alternate (the baseline). Only the thread calling step() uses the streams'
// API, and it never waits for the CPU (only for a free slot when the ring is
// full): the compute stream itself waits for the CPU's answer (a blocking
// wait on the slot's sequence word: Stream::wait_value, a memory wait on CUDA,
// after an event on the request's publish). host_fn
// callbacks and the CPU thread touch host memory and atomics only.
//
// The engine supplies the stages (EngineStages) and its device buffers
// (MicroBatchIo); hattn owns the ring, the events, the CPU thread and the
// merges. Errors: a stage that fails or throws, a backend error or a wait past
// the step's deadline make step() return that Status. The step's host KV
// appends are then rolled back, the ring drained and the streams' errors
// cleared, so the next step starts clean; when a stalled stage prevents the
// drain, the next step() finishes it first (and fails again if it cannot).
// Until then the engine's buffers and stage callables must stay alive.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <span>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include "hattn/core/dtype.hpp"
#include "hattn/core/kv_view.hpp"
#include "hattn/core/page_pool.hpp"
#include "hattn/core/problem.hpp"
#include "hattn/core/status.hpp"
#include "hattn/cpu/executor.hpp"
#include "hattn/runtime/cpu_attention.hpp"
#include "hattn/runtime/host_kv_cache.hpp"
#include "hattn/runtime/partition.hpp"
#include "hattn/runtime/slot_ring.hpp"
#include "hattn/runtime/stream.hpp"
#include "hattn/runtime/timeline.hpp"
#include "hattn/runtime/wait.hpp"

namespace hattn::runtime {

// The engine's device buffers of one micro-batch (host memory on host
// streams). Shapes for B sequences: q, o f32 [B][Hq][D]; k, v [B][Hkv][D] in
// the KV dtype; lse2 f32 [B][Hq]; codes [B][code_bytes_per_seq].
struct MicroBatchIo {
  const float* q = nullptr;                // written by stage A
  const void* k = nullptr;                 // written by stage A
  const void* v = nullptr;                 // written by stage A
  const std::byte* query_codes = nullptr;  // written by stage A when the slot has codes
  float* attn_o = nullptr;                 // the attention output stage B reads
  float* attn_lse2 = nullptr;
  // Used only when the partition policy gives the device tokens: the CPU
  // partial lands in cpu_*, the device_attention stage writes device_*, and
  // their merge goes to attn_*.
  float* cpu_o = nullptr;
  float* cpu_lse2 = nullptr;
  float* device_o = nullptr;
  float* device_lse2 = nullptr;
};

// What a stage is called with.
struct StageContext {
  std::int32_t step = 0;
  std::int32_t layer = 0;
  std::int32_t micro_batch = 0;
  std::int32_t first_seq = 0;                // index of seqs[0] in the step's batch
  std::span<const std::int32_t> seqs;        // host KV cache sequence indices
  std::span<const std::int64_t> seq_lens;    // this layer's lengths, this step's token included
  std::span<const std::int64_t> cpu_tokens;  // the device attends [cpu_tokens[b], seq_lens[b])
  const MicroBatchIo* io = nullptr;
};

// The engine's stages, called with the stream's handle (runtime/stream.hpp: on
// a device stream they launch work; on a HostStream they are the work).
template <class Handle>
struct EngineStages {
  using Fn = std::function<Status(const StageContext&, Handle)>;
  Fn stage_a;           // norm + QKV GEMM + RoPE: writes io.q, io.k, io.v (, codes)
  Fn device_attention;  // the device's share; needed only if the policy gives it tokens
  Fn stage_b;           // O-proj + MLP: reads io.attn_o
};

struct OrchestratorOptions {
  std::int32_t num_layers = 0;
  std::int32_t num_micro_batches = 2;
  // Largest micro-batch (slot.max_batch), heads, head dim, KV dtype, codes.
  SlotShape slot{};
  // 0: 2 * num_micro_batches, so the issuing thread can run a layer ahead of
  // the streams. At least num_micro_batches.
  std::int32_t ring_slots = 0;
  std::chrono::nanoseconds step_timeout = std::chrono::seconds(30);
  bool record_timeline = true;
  // Runs first on the CPU attention thread (e.g. runtime/affinity.hpp's
  // pin_this_thread), before it takes any request. Must not throw.
  std::function<void()> cpu_thread_init;
};

// Micro-batch m of M over B sequences: contiguous, sizes differ by at most one.
struct MicroBatchRange {
  std::int32_t begin = 0;
  std::int32_t size = 0;
};
constexpr MicroBatchRange micro_batch_range(std::int32_t batch, std::int32_t num_micro_batches,
                                            std::int32_t m) noexcept {
  const std::int32_t base = batch / num_micro_batches, extra = batch % num_micro_batches;
  return {m * base + std::min(m, extra), base + (m < extra ? 1 : 0)};
}

template <Stream S, CpuAttentionBackend Backend>
class DecodeOrchestrator {
 public:
  using Handle = typename S::Handle;
  using Stages = EngineStages<Handle>;

  // Borrows the streams, the host KV, the backend and the executor: all must
  // outlive the orchestrator. Starts the CPU attention thread. Throws
  // std::invalid_argument for bad options (or a KV cache that does not match
  // them), std::bad_alloc / std::system_error when resources cannot be had.
  DecodeOrchestrator(const OrchestratorOptions& options, S& compute, S& copy, HostKvCache& kv,
                     Backend& backend, const CpuExecutor& executor,
                     PartitionPolicy policy = PartitionPolicy::all_cpu(),
                     HostMemoryResource slot_memory = page_aligned_host_memory())
      : opt_(checked(options, kv)),
        compute_(compute),
        copy_(copy),
        kv_(kv),
        backend_(backend),
        executor_(executor),
        policy_(std::move(policy)),
        ring_(opt_.slot, opt_.ring_slots > 0 ? opt_.ring_slots : 2 * opt_.num_micro_batches,
              slot_memory),
        jobs_(static_cast<std::size_t>(ring_.capacity())),
        published_(static_cast<std::size_t>(ring_.capacity())),
        consumed_(static_cast<std::size_t>(ring_.capacity())),
        a_done_(static_cast<std::size_t>(opt_.num_micro_batches)) {
    if (ring_.capacity() < opt_.num_micro_batches)
      throw std::invalid_argument("DecodeOrchestrator: fewer ring slots than micro-batches");
    cpu_thread_ = std::thread([this] { cpu_loop(); });
  }

  // Waits for the streams and the CPU thread to finish what was issued. A
  // drain that ran out of memory (recording a host stream's event) is tried
  // again a few times, then this terminates: stopping anyway would leave work
  // queued on the streams pointing at this object. Other errors (a device's)
  // stop as they are.
  ~DecodeOrchestrator() {
    for (int tries = 0;; ++tries) {
      const Status s = drain(Deadline::max());
      if (s || s.code() != StatusCode::kOutOfMemory) break;
      if (tries == 100) std::terminate();
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    stop_.store(true, std::memory_order_release);
    ring_.wake();
    cpu_thread_.join();
  }
  DecodeOrchestrator(const DecodeOrchestrator&) = delete;
  DecodeOrchestrator& operator=(const DecodeOrchestrator&) = delete;

  // Wait until everything issued has run (streams idle, ring drained) and,
  // after a failed step, undo its host KV appends. step() does this itself
  // first; an engine calls it after a failed step before it touches the
  // buffers or state its stages use, since a stalled stage may still run.
  Status wait_idle(Deadline deadline = Deadline::max()) { return drain(deadline); }

  const OrchestratorOptions& options() const noexcept { return opt_; }
  Timeline& timeline() noexcept { return timeline_; }
  const Timeline& timeline() const noexcept { return timeline_; }
  std::int32_t steps_done() const noexcept { return step_; }

  // One decode step over `seqs` (host KV cache indices; each gets one token
  // per layer). io[m] holds micro-batch m's buffers, for
  // m < min(num_micro_batches, seqs.size()); see micro_batch_range.
  Status step(std::span<const std::int32_t> seqs, std::span<const MicroBatchIo> io,
              const Stages& stages) {
    const Deadline deadline = deadline_after(opt_.step_timeout);
    if (needs_drain_) HATTN_RETURN_IF_ERROR(drain(deadline));
    HATTN_RETURN_IF_ERROR(prepare(seqs, io, stages));
    Status s = issue_step(deadline);
    if (s) s = finish(deadline);
    if (!s) {
      // Drain now if it can be done by the deadline (or at once when it has
      // passed); otherwise the next step() does.
      cancelled_.store(true, std::memory_order_release);
      rollback_ = true;
      const Deadline d = std::max(deadline, Clock::now());
      (void)drain(d);
    }
    ++step_;
    return s;
  }

 private:
  struct Job {  // one slot's work, written before its request is published
    std::int32_t step = 0;
    std::int32_t layer = 0;
    std::int32_t micro_batch = 0;
    MicroBatchRange range{};
    Status status = Status::ok();
  };

  static const OrchestratorOptions& checked(const OrchestratorOptions& o, const HostKvCache& kv) {
    if (o.num_layers < 1 || o.num_micro_batches < 1)
      throw std::invalid_argument("DecodeOrchestrator: num_layers and num_micro_batches >= 1");
    if (kv.num_layers() != o.num_layers)
      throw std::invalid_argument("DecodeOrchestrator: KV cache has a different layer count");
    const PagePoolOptions& p = kv.options();
    if (p.num_kv_heads != o.slot.num_kv_heads || p.head_dim != o.slot.head_dim ||
        p.dtype != o.slot.kv_dtype)
      throw std::invalid_argument("DecodeOrchestrator: KV cache and slot shapes differ");
    if (o.slot.num_q_heads % o.slot.num_kv_heads != 0)
      throw std::invalid_argument("DecodeOrchestrator: q heads must be a multiple of KV heads");
    return o;
  }

  std::int32_t batch() const noexcept { return static_cast<std::int32_t>(seqs_.size()); }
  std::size_t lens_at(std::int32_t layer, std::int32_t first) const noexcept {
    return static_cast<std::size_t>(layer) * seqs_.size() + static_cast<std::size_t>(first);
  }
  std::size_t phase_index(Phase p, std::int32_t layer, std::int32_t m) const noexcept {
    return (static_cast<std::size_t>(layer) * static_cast<std::size_t>(mbs_) +
            static_cast<std::size_t>(m)) *
               kNumPhases +
           static_cast<std::size_t>(p);
  }

  // Validate, copy the step's inputs into members (queued work may outlive
  // the caller's spans when a step fails), compute lengths and the partition.
  Status prepare(std::span<const std::int32_t> seqs, std::span<const MicroBatchIo> io,
                 const Stages& stages) {
    if (seqs.empty()) return {StatusCode::kInvalidArgument, "DecodeOrchestrator: empty batch"};
    const auto mbs = static_cast<std::int32_t>(
        std::min<std::size_t>(static_cast<std::size_t>(opt_.num_micro_batches), seqs.size()));
    if (io.size() < static_cast<std::size_t>(mbs))
      return {StatusCode::kInvalidArgument,
              "DecodeOrchestrator: fewer io buffers than micro-batches"};
    if (micro_batch_range(static_cast<std::int32_t>(seqs.size()), mbs, 0).size >
        opt_.slot.max_batch)
      return {StatusCode::kInvalidArgument,
              "DecodeOrchestrator: a micro-batch is larger than slot.max_batch"};
    if (!stages.stage_a || !stages.stage_b)
      return {StatusCode::kInvalidArgument, "DecodeOrchestrator: stage_a and stage_b are required"};
    for (std::size_t m = 0; m < static_cast<std::size_t>(mbs); ++m)
      if (!io[m].q || !io[m].k || !io[m].v || !io[m].attn_o || !io[m].attn_lse2 ||
          (opt_.slot.code_bytes_per_seq > 0 && !io[m].query_codes))
        return {StatusCode::kInvalidArgument, "DecodeOrchestrator: null io buffer"};
    for (std::int32_t s : seqs)
      for (std::int32_t l = 0; l < opt_.num_layers; ++l)
        if (kv_.seq_len(l, s) < 0)
          return {StatusCode::kInvalidArgument, "DecodeOrchestrator: unknown sequence"};
    try {
      std::vector<std::int32_t> sorted(seqs.begin(), seqs.end());
      std::sort(sorted.begin(), sorted.end());
      if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end())
        return {StatusCode::kInvalidArgument,
                "DecodeOrchestrator: a sequence appears twice in the batch"};
      seqs_.assign(seqs.begin(), seqs.end());
      io_.assign(io.begin(), io.begin() + mbs);
      stages_ = stages;
      mbs_ = mbs;
      const std::size_t n = static_cast<std::size_t>(opt_.num_layers) * seqs_.size();
      lens_before_.resize(n);
      lens_.resize(n);
      cpu_tokens_.resize(n);
      split_.assign(static_cast<std::size_t>(opt_.num_layers) * mbs_, 0);
      if (opt_.record_timeline) {
        begin_ns_.assign(static_cast<std::size_t>(opt_.num_layers) * mbs_ * kNumPhases, 0);
        end_ns_.assign(begin_ns_.size(), 0);
        stamps_pending_ = true;
        stamps_step_ = step_;
      }
      for (std::int32_t l = 0; l < opt_.num_layers; ++l)
        for (std::int32_t b = 0; b < batch(); ++b) {
          const std::size_t i = lens_at(l, b);
          lens_before_[i] = kv_.seq_len(l, seqs_[b]);
          lens_[i] = lens_before_[i] + 1;
          cpu_tokens_[i] = policy_.cpu_tokens(l, seqs_[b], lens_[i]);
        }
      for (std::int32_t l = 0; l < opt_.num_layers; ++l)
        for (std::int32_t m = 0; m < mbs_; ++m) {
          const MicroBatchRange r = micro_batch_range(batch(), mbs_, m);
          for (std::int32_t b = r.begin; b < r.begin + r.size; ++b)
            if (cpu_tokens_[lens_at(l, b)] < lens_[lens_at(l, b)])
              split_[static_cast<std::size_t>(l * mbs_ + m)] = 1;
        }
      if (opt_.record_timeline)
        timeline_.reserve(timeline_.size() +
                          static_cast<std::size_t>(opt_.num_layers) * mbs_ * kNumPhases);
    } catch (...) {
      return {StatusCode::kOutOfMemory, "DecodeOrchestrator: cannot allocate step state"};
    }
    for (std::size_t m = 0; m < io_.size(); ++m)
      for (std::int32_t l = 0; l < opt_.num_layers; ++l)
        if (split_[static_cast<std::size_t>(l * mbs_) + m] &&
            (!stages_.device_attention || !io_[m].cpu_o || !io_[m].cpu_lse2 || !io_[m].device_o ||
             !io_[m].device_lse2))
          return {StatusCode::kInvalidArgument,
                  "DecodeOrchestrator: the partition gives the device tokens but the "
                  "device_attention stage or the cpu_/device_ buffers are missing"};
    cancelled_.store(false, std::memory_order_release);
    std::lock_guard<std::mutex> lock(error_mutex_);
    step_error_ = Status::ok();
    return Status::ok();
  }

  StageContext context(std::int32_t layer, std::int32_t m) const noexcept {
    const MicroBatchRange r = micro_batch_range(batch(), mbs_, m);
    const auto n = static_cast<std::size_t>(r.size);
    StageContext c;
    c.step = step_;
    c.layer = layer;
    c.micro_batch = m;
    c.first_seq = r.begin;
    c.seqs = {seqs_.data() + r.begin, n};
    c.seq_lens = {lens_.data() + lens_at(layer, r.begin), n};
    c.cpu_tokens = {cpu_tokens_.data() + lens_at(layer, r.begin), n};
    c.io = &io_[static_cast<std::size_t>(m)];
    return c;
  }

  // Timeline brackets: stream stamps (runtime/stream.hpp), so the times are
  // when the stream reached the work; read once the streams are idle.
  Status mark_begin(S& s, Phase p, std::int32_t layer, std::int32_t m) {
    if (!opt_.record_timeline) return Status::ok();
    return s.stamp(&begin_ns_[phase_index(p, layer, m)]);
  }
  Status mark_end(S& s, Phase p, std::int32_t layer, std::int32_t m) {
    if (!opt_.record_timeline) return Status::ok();
    return s.stamp(&end_ns_[phase_index(p, layer, m)]);
  }
  // The step's stream phases into the timeline (after both streams'
  // synchronize(), which resolves device stamps); unwritten ones are skipped.
  void record_stamps() {
    if (!stamps_pending_) return;
    stamps_pending_ = false;
    const std::int64_t origin =
        std::chrono::duration_cast<std::chrono::nanoseconds>(timeline_.origin().time_since_epoch())
            .count();
    for (std::int32_t l = 0; l < opt_.num_layers; ++l)
      for (std::int32_t m = 0; m < mbs_; ++m)
        for (std::size_t p = 0; p < kNumPhases; ++p) {
          const std::size_t i = phase_index(static_cast<Phase>(p), l, m);
          if (begin_ns_[i] != 0 && end_ns_[i] != 0)
            timeline_.record({static_cast<Phase>(p), stamps_step_, l, m, begin_ns_[i] - origin,
                              end_ns_[i] - origin});
        }
  }

  // An engine stage on the compute stream, skipped once the step is cancelled.
  Status run_stage(Phase p, const typename Stages::Fn* fn, std::int32_t layer, std::int32_t m) {
    HATTN_RETURN_IF_ERROR(mark_begin(compute_, p, layer, m));
    HATTN_RETURN_IF_ERROR(compute_.enqueue([this, fn, ctx = context(layer, m)](Handle h) -> Status {
      if (cancelled_.load(std::memory_order_acquire)) return Status::ok();
      return (*fn)(ctx, h);
    }));
    return mark_end(compute_, p, layer, m);
  }

  // Stage A (and the device's attention), then q, k, v into a ring slot and
  // the request published to the CPU thread.
  Status issue_front(std::int32_t layer, std::int32_t m, Deadline deadline) {
    HATTN_RETURN_IF_ERROR(run_stage(Phase::kStageA, &stages_.stage_a, layer, m));
    if (split_[static_cast<std::size_t>(layer * mbs_ + m)])
      HATTN_RETURN_IF_ERROR(
          run_stage(Phase::kDeviceAttention, &stages_.device_attention, layer, m));
    auto& a_done = a_done_[static_cast<std::size_t>(m)];
    HATTN_RETURN_IF_ERROR(a_done.record(compute_));
    HATTN_RETURN_IF_ERROR(a_done.wait(copy_));

    const std::int64_t pos = next_acquire_;
    HATTN_RETURN_IF_ERROR(release_consumed(pos - ring_.capacity() + 1, deadline));
    HATTN_RETURN_IF_ERROR(ring_.acquire(pos, deadline));
    ++next_acquire_;
    bool published = false;
    const Status s = fill_slot(layer, m, pos, &published);
    if (!s && !published) {
      // Every acquired position must be answered (drain waits for it): the
      // CPU thread sees the step cancelled and answers without attending.
      fail(s);
      ring_.publish_request(pos);
    }
    return s;
  }

  // q, k, v (and codes) into the slot on the copy stream, then the request is
  // published there. *published: the publish was enqueued.
  Status fill_slot(std::int32_t layer, std::int32_t m, std::int64_t pos, bool* published) {
    const MicroBatchRange r = micro_batch_range(batch(), mbs_, m);
    jobs_[static_cast<std::size_t>(pos % ring_.capacity())] = {step_, layer, m, r, Status::ok()};
    const SlotShape& sh = opt_.slot;
    const SlotBuffers sb = ring_.buffers(pos);
    const MicroBatchIo& io = io_[static_cast<std::size_t>(m)];
    const auto n = static_cast<std::size_t>(r.size);
    const std::size_t q_bytes = sizeof(float) * n * sh.num_q_heads * sh.head_dim;
    const std::size_t kv_bytes = size_of(sh.kv_dtype) * n * sh.num_kv_heads * sh.head_dim;
    HATTN_RETURN_IF_ERROR(mark_begin(copy_, Phase::kCopyToHost, layer, m));
    HATTN_RETURN_IF_ERROR(copy_.copy(sb.q, io.q, q_bytes));
    HATTN_RETURN_IF_ERROR(copy_.copy(sb.k, io.k, kv_bytes));
    HATTN_RETURN_IF_ERROR(copy_.copy(sb.v, io.v, kv_bytes));
    if (sh.code_bytes_per_seq > 0)
      HATTN_RETURN_IF_ERROR(copy_.copy(sb.codes, io.query_codes, sh.code_bytes_per_seq * n));
    HATTN_RETURN_IF_ERROR(mark_end(copy_, Phase::kCopyToHost, layer, m));
    HATTN_RETURN_IF_ERROR(copy_.host_fn([this, pos] { ring_.publish_request(pos); }));
    *published = true;
    // The compute stream's memory wait for the answer comes after this event:
    // the order is then visible to the device scheduler, which must not put
    // the publish behind that wait (cuStreamWaitValue32's caveat).
    return published_[static_cast<std::size_t>(pos % ring_.capacity())].record(copy_);
  }

  // Wait for the CPU partial of (layer, m), copy it back, merge, stage B.
  // The compute stream waits for the CPU partial of (layer, m), copies it in,
  // merges, runs stage B. Nothing here blocks the calling thread: the wait is
  // the stream's (on CUDA a stream wait on the slot's sequence word), so the
  // hand-off from the CPU thread to the compute stream wakes only the thread
  // that is about to work, and this thread runs ahead until the ring is full.
  Status issue_back(std::int32_t layer, std::int32_t m) {
    // Counted as answered-and-released only once the release is queued: if a
    // call before it fails, drain() still waits for the slot and frees it.
    const std::int64_t pos = next_response_;
    const bool split = split_[static_cast<std::size_t>(layer * mbs_ + m)] != 0;
    const SlotShape& sh = opt_.slot;
    const SlotBuffers sb = ring_.buffers(pos);
    const MicroBatchIo& io = io_[static_cast<std::size_t>(m)];
    const auto n = static_cast<std::size_t>(micro_batch_range(batch(), mbs_, m).size);
    float* o = split ? io.cpu_o : io.attn_o;
    float* lse2 = split ? io.cpu_lse2 : io.attn_lse2;
    HATTN_RETURN_IF_ERROR(
        published_[static_cast<std::size_t>(pos % ring_.capacity())].wait(compute_));
    HATTN_RETURN_IF_ERROR(
        compute_.wait_value(ring_.response_word(pos), SlotRing::response_value(pos)));
    HATTN_RETURN_IF_ERROR(mark_begin(compute_, Phase::kCopyToDevice, layer, m));
    HATTN_RETURN_IF_ERROR(compute_.copy(o, sb.o, sizeof(float) * n * sh.num_q_heads * sh.head_dim));
    HATTN_RETURN_IF_ERROR(compute_.copy(lse2, sb.lse2, sizeof(float) * n * sh.num_q_heads));
    HATTN_RETURN_IF_ERROR(mark_end(compute_, Phase::kCopyToDevice, layer, m));
    // The slot is free once these copies ran: the issuing thread releases it
    // when it needs the slot again (release_consumed), not a host callback
    // in the compute stream's path.
    HATTN_RETURN_IF_ERROR(
        consumed_[static_cast<std::size_t>(pos % ring_.capacity())].record(compute_));
    ++next_response_;
    if (split) {
      const auto b = static_cast<std::int32_t>(n);
      const std::int32_t H = sh.num_q_heads, D = sh.head_dim;
      HATTN_RETURN_IF_ERROR(mark_begin(compute_, Phase::kMerge, layer, m));
      HATTN_RETURN_IF_ERROR(
          compute_.merge(make_partial_view(io.cpu_o, DType::kF32, io.cpu_lse2, b, H, D),
                         make_partial_view(io.device_o, DType::kF32, io.device_lse2, b, H, D),
                         make_partial_view(io.attn_o, DType::kF32, io.attn_lse2, b, H, D)));
      HATTN_RETURN_IF_ERROR(mark_end(compute_, Phase::kMerge, layer, m));
    }
    return run_stage(Phase::kStageB, &stages_.stage_b, layer, m);
  }

  // A backend error seen by the compute stream: the step fails with it and
  // its remaining engine stages are skipped.
  void fail(const Status& s) {
    {
      std::lock_guard<std::mutex> lock(error_mutex_);
      if (step_error_.is_ok()) step_error_ = s;
    }
    cancelled_.store(true, std::memory_order_release);
  }
  Status step_error() {
    std::lock_guard<std::mutex> lock(error_mutex_);
    return step_error_;
  }

  Status issue_step(Deadline deadline) {
    for (std::int32_t m = 0; m < mbs_; ++m) HATTN_RETURN_IF_ERROR(issue_front(0, m, deadline));
    for (std::int32_t l = 0; l < opt_.num_layers; ++l)
      for (std::int32_t m = 0; m < mbs_; ++m) {
        if (cancelled_.load(std::memory_order_acquire)) return step_error();
        HATTN_RETURN_IF_ERROR(compute_.query());
        HATTN_RETURN_IF_ERROR(copy_.query());
        HATTN_RETURN_IF_ERROR(issue_back(l, m));
        if (l + 1 < opt_.num_layers) HATTN_RETURN_IF_ERROR(issue_front(l + 1, m, deadline));
      }
    return Status::ok();
  }

  // Wait until both streams have run everything issued (events complete even
  // after an error), then collect their errors.
  Status streams_idle(Deadline deadline) {
    typename S::Event c, k;
    HATTN_RETURN_IF_ERROR(c.record(compute_));
    HATTN_RETURN_IF_ERROR(k.record(copy_));
    if (!c.synchronize(deadline) || !k.synchronize(deadline))
      return {StatusCode::kInternal,
              "DecodeOrchestrator: deadline exceeded waiting for the streams (a stage is stalled)"};
    return Status::ok();
  }
  Status finish(Deadline deadline) {
    HATTN_RETURN_IF_ERROR(streams_idle(deadline));
    HATTN_RETURN_IF_ERROR(step_error());
    const Status a = compute_.synchronize(deadline);
    const Status b = copy_.synchronize(deadline);
    record_stamps();
    HATTN_RETURN_IF_ERROR(release_consumed(next_response_, deadline));
    return a ? b : a;
  }

  // Releases the slots of positions below `upto` whose responses the compute
  // stream has copied out (waiting for those copies).
  Status release_consumed(std::int64_t upto, Deadline deadline) {
    for (upto = std::min(upto, next_response_); next_release_ < upto; ++next_release_) {
      if (!consumed_[static_cast<std::size_t>(next_release_ % ring_.capacity())].synchronize(
              deadline))
        return {StatusCode::kInternal,
                "DecodeOrchestrator: deadline exceeded waiting for a ring slot (a stage is "
                "stalled)"};
      ring_.release(next_release_);
    }
    return Status::ok();
  }

  // Let the streams finish, take back every slot still in flight and clear
  // the streams' errors; after a failed step, undo its KV appends.
  Status drain(Deadline deadline) {
    needs_drain_ = true;
    HATTN_RETURN_IF_ERROR(streams_idle(deadline));
    (void)compute_.synchronize(deadline);  // errors of the failed step
    (void)copy_.synchronize(deadline);
    record_stamps();
    HATTN_RETURN_IF_ERROR(release_consumed(next_response_, deadline));
    while (next_response_ < next_acquire_) {
      HATTN_RETURN_IF_ERROR(ring_.wait_response(next_response_, deadline));
      ring_.release(next_response_);
      ++next_response_;
      ++next_release_;
    }
    for (std::int32_t l = 0; l < opt_.num_layers && rollback_; ++l)
      for (std::int32_t b = 0; b < batch(); ++b) {
        const std::int64_t want = lens_before_[lens_at(l, b)];
        if (kv_.seq_len(l, seqs_[b]) > want) HATTN_RETURN_IF_ERROR(kv_.truncate(l, seqs_[b], want));
      }
    needs_drain_ = false;
    rollback_ = false;
    return Status::ok();
  }

  // The CPU attention thread: slots in position order, until stopped.
  void cpu_loop() {
    if (opt_.cpu_thread_init) opt_.cpu_thread_init();
    for (std::int64_t pos = 0;; ++pos) {
      if (!ring_.wait_request(pos, Deadline::max(), &stop_)) return;
      Job& job = jobs_[static_cast<std::size_t>(pos % ring_.capacity())];
      const std::int64_t t0 = opt_.record_timeline ? timeline_.now_ns() : 0;
      job.status = cancelled_.load(std::memory_order_acquire) ? Status::ok() : attend(job, pos);
      if (opt_.record_timeline)
        timeline_.record(
            {Phase::kCpuAttention, job.step, job.layer, job.micro_batch, t0, timeline_.now_ns()});
      // Before the answer: the stages after it are then skipped (cancelled_).
      if (!job.status) fail(job.status);
      ring_.publish_response(pos);
    }
  }

  Status attend(const Job& job, std::int64_t pos) noexcept {
    const SlotShape& sh = opt_.slot;
    const SlotBuffers sb = ring_.buffers(pos);
    const std::int32_t B = job.range.size;
    const std::size_t first = lens_at(job.layer, job.range.begin);
    const std::size_t kv_row = size_of(sh.kv_dtype) * sh.num_kv_heads * sh.head_dim;
    try {
      for (std::int32_t b = 0; b < B; ++b) {
        const std::int32_t seq = seqs_[static_cast<std::size_t>(job.range.begin + b)];
        HATTN_RETURN_IF_ERROR(kv_.append(job.layer, seq,
                                         static_cast<const std::byte*>(sb.k) + b * kv_row,
                                         static_cast<const std::byte*>(sb.v) + b * kv_row, 1));
      }
      HATTN_RETURN_IF_ERROR(kv_.build_page_table(job.layer, seqs_.data() + job.range.begin,
                                                 cpu_tokens_.data() + first, B, &table_));
    } catch (...) {
      return {StatusCode::kOutOfMemory, "DecodeOrchestrator: host KV append failed"};
    }
    CpuAttentionTask t;
    t.step = job.step;
    t.layer = job.layer;
    t.micro_batch = job.micro_batch;
    t.problem = {.batch_size = B,
                 .num_q_heads = sh.num_q_heads,
                 .num_kv_heads = sh.num_kv_heads,
                 .head_dim = sh.head_dim,
                 .kv_dtype = sh.kv_dtype,
                 .q_dtype = DType::kF32,
                 .o_dtype = DType::kF32,
                 .sm_scale = std::nullopt};
    t.q = make_query_view(sb.q, DType::kF32, B, sh.num_q_heads, sh.head_dim);
    t.kv = kv_.pool(job.layer).view(table_);
    t.seqs = {seqs_.data() + job.range.begin, static_cast<std::size_t>(B)};
    t.seq_lens = {lens_.data() + first, static_cast<std::size_t>(B)};
    t.appended_tokens = 1;
    t.new_k = sb.k;
    t.new_v = sb.v;
    t.query_codes = sb.codes;
    t.code_bytes_per_seq = sh.code_bytes_per_seq;
    t.out = make_partial_view(sb.o, DType::kF32, sb.lse2, B, sh.num_q_heads, sh.head_dim);
    return backend_.attend(t, executor_);
  }

  OrchestratorOptions opt_;
  S& compute_;
  S& copy_;
  HostKvCache& kv_;
  Backend& backend_;
  const CpuExecutor& executor_;
  PartitionPolicy policy_;
  SlotRing ring_;
  std::vector<Job> jobs_;                     // per slot
  std::vector<typename S::Event> published_;  // per slot: request published (copy stream)
  std::vector<typename S::Event> consumed_;   // per slot: response copied out (compute stream)
  std::vector<typename S::Event> a_done_;     // per micro-batch: stage A issued
  Timeline timeline_;

  // The step in flight (read by queued work and the CPU thread).
  std::vector<std::int32_t> seqs_;
  std::vector<MicroBatchIo> io_;
  Stages stages_;
  std::int32_t mbs_ = 1;
  std::vector<std::int64_t> lens_before_;  // [layer][b]
  std::vector<std::int64_t> lens_;         // [layer][b], this step's token included
  std::vector<std::int64_t> cpu_tokens_;   // [layer][b]
  std::vector<char> split_;                // [layer][m]: the device attends some tokens
  std::vector<std::int64_t> begin_ns_;     // [layer][m][phase]: stream stamps (steady ns)
  std::vector<std::int64_t> end_ns_;       // [layer][m][phase]
  bool stamps_pending_ = false;            // begin_ns_/end_ns_ not yet in the timeline
  std::int32_t stamps_step_ = 0;           // the step they belong to (a failed step's are
                                           // recorded by the next step's drain)
  PageTable table_;                        // CPU thread scratch

  std::int32_t step_ = 0;
  std::int64_t next_acquire_ = 0;  // ring positions, owned by the step() thread
  std::int64_t next_response_ = 0;
  std::int64_t next_release_ = 0;  // positions below it are released
  bool needs_drain_ = false;
  bool rollback_ = false;  // the last step failed: undo its KV appends
  std::atomic<bool> cancelled_{false};
  std::mutex error_mutex_;
  Status step_error_ = Status::ok();  // a backend error, guarded by error_mutex_
  std::atomic<bool> stop_{false};
  std::thread cpu_thread_;  // last: started in the constructor body
};

}  // namespace hattn::runtime
