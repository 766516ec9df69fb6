#pragma once
// The stream/event concept the orchestrator is written against. A stream is an
// in-order queue of device work; an event marks a point in one stream that
// another stream (or the host) can wait for, with CUDA's semantics:
//
//   e.record(s)        e completes when s has finished everything enqueued so far
//   e.wait(s2)         work enqueued on s2 afterwards starts only once e completed
//   e.synchronize(d)   the host waits for e, until deadline d
//
// Operations a stream offers (all enqueue and return at once):
//   s.enqueue(f)       f(s.handle()) -> Status: the engine's work. On a device
//                      stream f runs now, on the calling thread, and launches
//                      asynchronous kernels on the handle; on a host stream f
//                      itself is the work and runs on the stream's thread.
//   s.copy(d, src, n)  n bytes, device<->pinned host (cudaMemcpyAsync); on a host
//                      stream, a memcpy.
//   s.host_fn(f)       f() runs on a host thread when the stream reaches it
//                      (cudaLaunchHostFunc). f must not call any stream API; it
//                      may touch host memory and atomics. Runs even after an error.
//   s.wait_value(w, v) work enqueued afterwards starts once the host word
//                      *w.word >= v (a host thread stores it, release, then
//                      calls w.waiter->notify()). On CUDA a stream memory wait
//                      (cuStreamWaitValue32 on the word's low half, a cyclic
//                      compare: v must be within 2^31 of the word), so the word
//                      must be pinned, device-mapped memory; on a host stream a
//                      blocking wait of the worker.
//   s.stamp(t)         *t = when the stream reached this point, in steady_clock
//                      nanoseconds since its epoch (for the timeline). A host
//                      stream writes it then (a host_fn); a CUDA stream records
//                      a timing event, converted by the next synchronize(), so
//                      nothing runs on the host mid-stream. Read *t only after
//                      synchronize(); it stays unwritten if the stream failed.
//   s.merge(a, b, out) out = merge of two partials that live on the device
//                      (core/merge.hpp semantics).
//   s.query()          the stream's first error since the last synchronize, if any
//   s.synchronize(d)   wait for all enqueued work; returns and clears the error
//
// HostStream (runtime/host_stream.hpp) implements it with a worker thread, so
// the same pipeline runs, concurrently and for real, without a GPU.

#include <atomic>
#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>

#include "hattn/core/problem.hpp"
#include "hattn/core/status.hpp"
#include "hattn/runtime/wait.hpp"

namespace hattn::runtime {

// steady_clock now, in nanoseconds since its epoch (Stream::stamp's unit).
inline std::int64_t steady_now_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// A 64-bit counter in host memory that streams can wait on, and the waiter
// its writers notify.
struct HostWord {
  const std::atomic<std::uint64_t>* word = nullptr;
  SpinThenBlock* waiter = nullptr;
};

template <class S>
concept Stream = requires(S& s, void* dst, const void* src, std::size_t n, const PartialView& p,
                          Deadline d, std::function<Status(typename S::Handle)> work, HostWord w,
                          std::function<void()> fn, std::int64_t* t) {
  typename S::Handle;
  typename S::Event;
  { s.handle() } -> std::same_as<typename S::Handle>;
  { s.enqueue(work) } -> std::same_as<Status>;
  { s.copy(dst, src, n) } -> std::same_as<Status>;
  { s.host_fn(fn) } -> std::same_as<Status>;
  { s.wait_value(w, std::uint64_t{1}) } -> std::same_as<Status>;
  { s.stamp(t) } -> std::same_as<Status>;
  { s.merge(p, p, p) } -> std::same_as<Status>;
  { s.query() } -> std::same_as<Status>;
  { s.synchronize(d) } -> std::same_as<Status>;
}
&&requires(typename S::Event& e, S& s, Deadline d) {
  { e.record(s) } -> std::same_as<Status>;
  { e.wait(s) } -> std::same_as<Status>;
  { e.synchronize(d) } -> std::same_as<Status>;
};

}  // namespace hattn::runtime
