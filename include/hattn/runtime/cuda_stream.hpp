#pragma once
// CudaStream and CudaEvent: the Stream concept (runtime/stream.hpp) on CUDA,
// so DecodeOrchestrator drives a GPU. Only with HATTN_ENABLE_CUDA.
//
//   enqueue(f)      f(cudaStream_t) runs now, on the calling thread, and
//                   launches the engine's kernels / cuBLAS calls on the stream.
//   copy            cudaMemcpyAsync(cudaMemcpyDefault): ring slots must be
//                   pinned (cuda_pinned_host_memory()) for it to be async.
//   host_fn         cudaLaunchHostFunc; the callable must not call CUDA and
//                   must not block (CUDA's callback thread is shared by all
//                   streams: the orchestrator's callbacks only store atomics,
//                   notify, and read the timeline clock).
//   wait_value      cuStreamWaitValue32 on the low half of the host word
//                   (cyclic >=), taken from the driver through
//                   cudaGetDriverEntryPointByVersion (no libcuda link). The
//                   word must be pinned and mapped: the SlotRing's sequence
//                   words are, when its memory is cuda_pinned_host_memory().
//   stamp(t)        records a timing event (from a pool the stream keeps);
//                   synchronize() converts every pending stamp to the host
//                   clock: it records one more event on the idle stream, waits
//                   for it, reads steady_clock, and subtracts each event's
//                   elapsed time to it (so all stamps of a synchronize run
//                   late by the same amount: the time from that event's
//                   completion to the host reading its clock).
//   merge           cuda::merge_partials on the stream.
//   synchronize(d)  polls cudaStreamQuery until done or the deadline, then
//                   resolves the stamps.
//
// Errors are sticky like HostStream's: once an enqueued engine callable
// returns an error (or throws), later enqueue/copy/merge calls are skipped
// (and return OK) until synchronize() returns and clears it; host_fn, waits
// and events are always issued, so the pipeline's bookkeeping drains. CUDA
// errors from the stream itself (a failed kernel) are reported by query() and
// synchronize() as kCudaError.
//
// Only the orchestrator's issuing thread calls these (DESIGN.md section 3).

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "hattn/core/problem.hpp"
#include "hattn/core/status.hpp"
#include "hattn/cuda/buffer.hpp"
#include "hattn/cuda/merge.hpp"
#include "hattn/cuda/stream.hpp"
#include "hattn/runtime/slot_ring.hpp"
#include "hattn/runtime/stream.hpp"
#include "hattn/runtime/wait.hpp"

namespace hattn::runtime {

// Pinned, device-mapped host memory for SlotRing (slots and sequence words).
// No pageable fallback: the device must be able to read the sequence words,
// so a failure is a null pointer (SlotRing throws std::bad_alloc).
inline HostMemoryResource cuda_pinned_host_memory() noexcept {
  return {
      [](std::size_t bytes, void*) -> void* {
        void* p = nullptr;
        if (cudaHostAlloc(&p, bytes, cudaHostAllocPortable | cudaHostAllocMapped) != cudaSuccess) {
          (void)cudaGetLastError();
          return nullptr;
        }
        return p;
      },
      [](void* p, void*) { (void)cudaFreeHost(p); }, nullptr};
}

namespace detail {

using WaitValue32Fn = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);

// cuStreamWaitValue32 from the driver, looked up once; null when the driver
// lacks it.
inline WaitValue32Fn wait_value32() noexcept {
  static const WaitValue32Fn fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuStreamWaitValue32", &p, 12000, cudaEnableDefault, &q) !=
            cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return WaitValue32Fn{nullptr};
    }
    return reinterpret_cast<WaitValue32Fn>(p);
  }();
  return fn;
}

// Polls `done` (a CUDA query: cudaSuccess, cudaErrorNotReady or an error)
// until it is not NotReady or the deadline passes: spins briefly, then sleeps
// in short steps (a CUDA blocking sync cannot take a deadline).
template <class Query>
cudaError_t poll_until(Query done, Deadline deadline, bool* timed_out) {
  *timed_out = false;
  for (int i = 0;; ++i) {
    const cudaError_t e = done();
    if (e != cudaErrorNotReady) return e;
    if (Clock::now() >= deadline) {
      *timed_out = true;
      return cudaErrorNotReady;
    }
    if (i < 1024)
      hattn::runtime::detail::cpu_relax();
    else
      std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

}  // namespace detail

class CudaEvent;

class CudaStream {
 public:
  using Handle = cudaStream_t;
  using Event = CudaEvent;

  // A new non-blocking stream; throws std::runtime_error when CUDA cannot
  // create one (no device).
  CudaStream() {
    if (const Status s = owned_.create(); !s)
      throw std::runtime_error(std::string("CudaStream: ") + s.message());
    stream_ = owned_.get();
  }
  // Borrows the engine's stream (which must outlive this).
  explicit CudaStream(cuda::StreamRef borrowed) noexcept : stream_(borrowed.get()) {}
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;

  Handle handle() const noexcept { return stream_; }

  template <class F>
  Status enqueue(F&& f) noexcept {
    if (!error_.is_ok()) return Status::ok();  // skipped, like HostStream
    Status s = Status::ok();
    try {
      s = std::forward<F>(f)(stream_);
    } catch (...) {
      s = {StatusCode::kInternal, "CudaStream: an enqueued callable threw an exception"};
    }
    if (!s) error_ = s;
    return s;
  }

  Status copy(void* dst, const void* src, std::size_t bytes) noexcept {
    if (!error_.is_ok() || bytes == 0) return Status::ok();
    return cuda::cuda_status(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_));
  }

  template <class F>
  Status host_fn(F&& f) noexcept {
    std::unique_ptr<std::function<void()>> fn;
    try {
      fn = std::make_unique<std::function<void()>>(std::forward<F>(f));
    } catch (...) {
      return {StatusCode::kOutOfMemory, "CudaStream: cannot enqueue a host function"};
    }
    const cudaError_t e = cudaLaunchHostFunc(
        stream_,
        [](void* p) {
          std::unique_ptr<std::function<void()>> g(static_cast<std::function<void()>*>(p));
          (*g)();
        },
        fn.get());
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      return cuda::cuda_status(e);
    }
    (void)fn.release();  // the callback owns it now
    return Status::ok();
  }

  Status wait_value(HostWord w, std::uint64_t value) noexcept {
    if (w.word == nullptr)
      return {StatusCode::kInvalidArgument, "CudaStream::wait_value: null word"};
    const detail::WaitValue32Fn wait = detail::wait_value32();
    if (wait == nullptr)
      return {StatusCode::kNotSupported,
              "CudaStream::wait_value: the driver has no cuStreamWaitValue32"};
    void* dev = nullptr;
    // The low half of the little-endian 64-bit word.
    void* host = const_cast<void*>(static_cast<const void*>(w.word));
    if (const cudaError_t e = cudaHostGetDevicePointer(&dev, host, 0); e != cudaSuccess) {
      (void)cudaGetLastError();
      return {StatusCode::kCudaError,
              "CudaStream::wait_value: the word is not pinned, mapped host memory (give the "
              "SlotRing cuda_pinned_host_memory())"};
    }
    const CUresult r = wait(reinterpret_cast<CUstream>(stream_), reinterpret_cast<CUdeviceptr>(dev),
                            static_cast<cuuint32_t>(value), CU_STREAM_WAIT_VALUE_GEQ);
    return r == CUDA_SUCCESS ? Status::ok()
                             : Status{StatusCode::kCudaError,
                                      "CudaStream::wait_value: cuStreamWaitValue32 failed"};
  }

  Status stamp(std::int64_t* t) noexcept {
    try {
      if (stamps_used_ == stamp_events_.size()) {
        cuda::Event e;
        HATTN_RETURN_IF_ERROR(e.create(/*timing=*/true));
        stamp_events_.push_back(std::move(e));
      }
      stamp_targets_.reserve(stamp_events_.size());
    } catch (...) {
      return {StatusCode::kOutOfMemory, "CudaStream::stamp: cannot grow the event pool"};
    }
    HATTN_RETURN_IF_ERROR(stamp_events_[stamps_used_].record(stream_));
    stamp_targets_.push_back(t);
    ++stamps_used_;
    return Status::ok();
  }

  Status merge(const PartialView& a, const PartialView& b, const PartialView& out) noexcept {
    if (!error_.is_ok()) return Status::ok();
    return cuda::merge_partials(a, b, out, stream_);
  }

  Status query() const noexcept {
    if (!error_.is_ok()) return error_;
    const cudaError_t e = cudaStreamQuery(stream_);
    return e == cudaErrorNotReady ? Status::ok() : cuda::cuda_status(e);
  }

  Status synchronize(Deadline deadline = Deadline::max()) noexcept {
    bool timed_out = false;
    const cudaError_t e =
        detail::poll_until([this] { return cudaStreamQuery(stream_); }, deadline, &timed_out);
    if (timed_out)
      return {StatusCode::kInternal,
              "CudaStream::synchronize: deadline exceeded (a stage is stalled)"};
    if (e == cudaSuccess) resolve_stamps();
    stamps_used_ = 0;
    stamp_targets_.clear();
    Status s = std::exchange(error_, Status::ok());
    if (s && e != cudaSuccess) s = cuda::cuda_status(e);
    return s;
  }

 private:
  // The stream is idle: every stamp event has completed.
  void resolve_stamps() noexcept {
    if (stamps_used_ == 0) return;
    if ((now_event_.get() == nullptr && !now_event_.create(/*timing=*/true)) ||
        !now_event_.record(stream_) || cudaEventSynchronize(now_event_.get()) != cudaSuccess) {
      (void)cudaGetLastError();
      return;
    }
    const std::int64_t now = steady_now_ns();
    for (std::size_t i = 0; i < stamps_used_; ++i) {
      float ms = 0.0f;
      if (cudaEventElapsedTime(&ms, stamp_events_[i].get(), now_event_.get()) == cudaSuccess)
        *stamp_targets_[i] = now - static_cast<std::int64_t>(static_cast<double>(ms) * 1e6);
      else
        (void)cudaGetLastError();
    }
  }

  std::vector<cuda::Event> stamp_events_;  // timing events, reused every step
  std::vector<std::int64_t*> stamp_targets_;
  std::size_t stamps_used_ = 0;
  cuda::Event now_event_;  // resolve_stamps' reference point
  cuda::Stream owned_;
  cudaStream_t stream_ = nullptr;
  Status error_ = Status::ok();  // sticky engine error, the issuing thread's
};

// A CUDA event without timing, created on first use (so a default-constructed
// one never throws and an unrecorded wait is a no-op, like HostEvent's).
class CudaEvent {
 public:
  CudaEvent() noexcept = default;

  Status record(CudaStream& stream) noexcept {
    HATTN_RETURN_IF_ERROR(ensure());
    recorded_ = true;
    return event_.record(stream.handle());
  }
  Status wait(CudaStream& stream) noexcept {
    if (!recorded_) return Status::ok();
    return event_.wait(stream.handle());
  }
  Status synchronize(Deadline deadline = Deadline::max()) noexcept {
    if (!recorded_) return Status::ok();
    bool timed_out = false;
    const cudaError_t e =
        detail::poll_until([this] { return cudaEventQuery(event_.get()); }, deadline, &timed_out);
    if (timed_out) return {StatusCode::kInternal, "CudaEvent::synchronize: deadline exceeded"};
    return cuda::cuda_status(e);
  }
  bool query() const noexcept { return !recorded_ || event_.done(); }

 private:
  Status ensure() noexcept { return event_.get() != nullptr ? Status::ok() : event_.create(false); }
  cuda::Event event_;
  bool recorded_ = false;
};

static_assert(Stream<CudaStream>);

}  // namespace hattn::runtime
