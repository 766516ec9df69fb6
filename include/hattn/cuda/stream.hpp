#pragma once
// CUDA streams and events: Stream owns a stream, StreamRef borrows one (the
// engine's, or the default stream), Event marks a point in a stream.
//
//   hattn::cuda::Stream s;  s.create();
//   hattn::cuda::Event a, b;  a.create(/*timing=*/true);  b.create(true);
//   a.record(s);  ... work on s ...;  b.record(s);
//   b.synchronize();  float ms;  Event::elapsed_ms(a, b, &ms);

#include <cuda_runtime_api.h>

#include <utility>

#include "hattn/core/status.hpp"
#include "hattn/cuda/buffer.hpp"

namespace hattn::cuda {

// A non-owning stream handle, passed by value. Default: the legacy default stream.
class StreamRef {
 public:
  constexpr StreamRef() noexcept = default;
  constexpr StreamRef(cudaStream_t s) noexcept : s_(s) {}  // NOLINT: implicit by design

  constexpr cudaStream_t get() const noexcept { return s_; }
  Status synchronize() const noexcept { return cuda_status(cudaStreamSynchronize(s_)); }

 private:
  cudaStream_t s_ = nullptr;
};

class Stream {
 public:
  Stream() noexcept = default;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  Stream(Stream&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}
  Stream& operator=(Stream&& o) noexcept {
    if (this != &o) {
      reset();
      s_ = std::exchange(o.s_, nullptr);
    }
    return *this;
  }
  ~Stream() { reset(); }

  // A stream that does not synchronize with the legacy default stream.
  Status create(unsigned int flags = cudaStreamNonBlocking) noexcept {
    reset();
    cudaStream_t s = nullptr;
    if (const cudaError_t e = cudaStreamCreateWithFlags(&s, flags); e != cudaSuccess) {
      (void)cudaGetLastError();
      return cuda_status(e);
    }
    s_ = s;
    return Status::ok();
  }
  void reset() noexcept {
    if (s_ != nullptr) (void)cudaStreamDestroy(s_);
    s_ = nullptr;
  }

  cudaStream_t get() const noexcept { return s_; }
  StreamRef ref() const noexcept { return {s_}; }
  operator StreamRef() const noexcept { return {s_}; }  // NOLINT: implicit by design
  Status synchronize() const noexcept { return ref().synchronize(); }

 private:
  cudaStream_t s_ = nullptr;
};

class Event {
 public:
  Event() noexcept = default;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  Event(Event&& o) noexcept : e_(std::exchange(o.e_, nullptr)) {}
  Event& operator=(Event&& o) noexcept {
    if (this != &o) {
      reset();
      e_ = std::exchange(o.e_, nullptr);
    }
    return *this;
  }
  ~Event() { reset(); }

  // timing = false makes record/wait cheaper (no timestamp).
  Status create(bool timing = false) noexcept {
    reset();
    cudaEvent_t e = nullptr;
    const unsigned int flags = timing ? cudaEventDefault : cudaEventDisableTiming;
    if (const cudaError_t err = cudaEventCreateWithFlags(&e, flags); err != cudaSuccess) {
      (void)cudaGetLastError();
      return cuda_status(err);
    }
    e_ = e;
    return Status::ok();
  }
  void reset() noexcept {
    if (e_ != nullptr) (void)cudaEventDestroy(e_);
    e_ = nullptr;
  }

  cudaEvent_t get() const noexcept { return e_; }
  // Marks the current end of `stream`'s work.
  Status record(StreamRef stream) const noexcept {
    return cuda_status(cudaEventRecord(e_, stream.get()));
  }
  // Work enqueued on `stream` after this call waits for the recorded point.
  Status wait(StreamRef stream) const noexcept {
    return cuda_status(cudaStreamWaitEvent(stream.get(), e_, 0));
  }
  // Blocks the host until the recorded point has passed.
  Status synchronize() const noexcept { return cuda_status(cudaEventSynchronize(e_)); }
  // Whether the recorded point has passed (without blocking).
  // (cudaErrorNotReady, or any other error, is cleared, not left pending.)
  bool done() const noexcept {
    const cudaError_t e = cudaEventQuery(e_);
    if (e != cudaSuccess) (void)cudaGetLastError();
    return e == cudaSuccess;
  }
  // Milliseconds between two completed timing events.
  static Status elapsed_ms(const Event& start, const Event& stop, float* ms) noexcept {
    if (ms == nullptr) return {StatusCode::kInvalidArgument, "elapsed_ms: result is null"};
    return cuda_status(cudaEventElapsedTime(ms, start.e_, stop.e_));
  }

 private:
  cudaEvent_t e_ = nullptr;
};

}  // namespace hattn::cuda
