#pragma once
// Owners of device and pinned host memory: move-only RAII, no exceptions.
//
//   hattn::cuda::DeviceBuffer kv;
//   if (hattn::Status s = kv.allocate(bytes); !s) return s;
//   hattn::cuda::PinnedBuffer staging;
//   staging.allocate(bytes);        // pinned, or pageable when pinning fails
//   if (!staging.pinned()) log(staging.pin_status().message());
//
// Headers under hattn/cuda include only <cuda_runtime_api.h>, so a host
// engine compiles them with a plain C++ compiler.

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdlib>
#include <utility>

#include "hattn/core/status.hpp"

namespace hattn::cuda {

// A Status for a CUDA error (the message is CUDA's static string). A failed
// call also leaves its error pending for cudaGetLastError(); it is cleared
// here (it is reported through the Status), so a later, unrelated check does
// not see it again. Sticky errors (a faulted context) cannot be cleared and
// keep failing every call, as they should.
inline Status cuda_status(cudaError_t e) noexcept {
  if (e == cudaSuccess) return Status::ok();
  (void)cudaGetLastError();
  return {StatusCode::kCudaError, cudaGetErrorString(e)};
}

// Device memory from cudaMalloc.
class DeviceBuffer {
 public:
  DeviceBuffer() noexcept = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      reset();
      ptr_ = std::exchange(o.ptr_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~DeviceBuffer() { reset(); }

  // Frees what it held, then allocates `bytes` (0: holds nothing). On failure
  // it holds nothing and the sticky-free CUDA error is cleared.
  Status allocate(std::size_t bytes) noexcept {
    reset();
    if (bytes == 0) return Status::ok();
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      return e == cudaErrorMemoryAllocation
                 ? Status(StatusCode::kOutOfMemory, "cudaMalloc: out of device memory")
                 : cuda_status(e);
    }
    ptr_ = p;
    size_ = bytes;
    return Status::ok();
  }
  void reset() noexcept {
    if (ptr_ != nullptr) (void)cudaFree(ptr_);
    ptr_ = nullptr;
    size_ = 0;
  }

  void* data() const noexcept { return ptr_; }
  template <class T>
  T* as() const noexcept {
    return static_cast<T*>(ptr_);
  }
  std::size_t size() const noexcept { return size_; }

 private:
  void* ptr_ = nullptr;
  std::size_t size_ = 0;
};

// Host memory for transfers: page-locked (cudaHostAlloc) when possible. When
// pinning fails (no device, locked-memory limit) the CUDA error is cleared
// and the buffer falls back to pageable memory: still usable, only slower to
// copy and never truly asynchronous. pinned() and pin_status() say which.
class PinnedBuffer {
 public:
  PinnedBuffer() noexcept = default;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  PinnedBuffer(PinnedBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)),
        size_(std::exchange(o.size_, 0)),
        pinned_(std::exchange(o.pinned_, false)),
        pin_status_(std::exchange(o.pin_status_, Status::ok())) {}
  PinnedBuffer& operator=(PinnedBuffer&& o) noexcept {
    if (this != &o) {
      reset();
      ptr_ = std::exchange(o.ptr_, nullptr);
      size_ = std::exchange(o.size_, 0);
      pinned_ = std::exchange(o.pinned_, false);
      pin_status_ = std::exchange(o.pin_status_, Status::ok());
    }
    return *this;
  }
  ~PinnedBuffer() { reset(); }

  // Frees what it held, then allocates `bytes`. Fails (kOutOfMemory) only when
  // the pageable fallback fails too; a pinning failure alone is success with
  // pinned() == false and the reason in pin_status().
  Status allocate(std::size_t bytes, unsigned int flags = cudaHostAllocDefault) noexcept {
    reset();
    if (bytes == 0) return Status::ok();
    void* p = nullptr;
    const cudaError_t e = cudaHostAlloc(&p, bytes, flags);
    if (e == cudaSuccess) {
      ptr_ = p;
      size_ = bytes;
      pinned_ = true;
      return Status::ok();
    }
    (void)cudaGetLastError();  // clear it: the fallback is not an error
    pin_status_ = cuda_status(e);
    p = std::malloc(bytes);
    if (p == nullptr) {
      return {StatusCode::kOutOfMemory, "PinnedBuffer: out of host memory"};
    }
    ptr_ = p;
    size_ = bytes;
    return Status::ok();
  }
  void reset() noexcept {
    if (ptr_ != nullptr) {
      if (pinned_)
        (void)cudaFreeHost(ptr_);
      else
        std::free(ptr_);
    }
    ptr_ = nullptr;
    size_ = 0;
    pinned_ = false;
    pin_status_ = Status::ok();
  }

  void* data() const noexcept { return ptr_; }
  template <class T>
  T* as() const noexcept {
    return static_cast<T*>(ptr_);
  }
  std::size_t size() const noexcept { return size_; }
  bool pinned() const noexcept { return pinned_; }
  // Why the last allocate() fell back to pageable memory (ok when it did not).
  Status pin_status() const noexcept { return pin_status_; }

 private:
  void* ptr_ = nullptr;
  std::size_t size_ = 0;
  bool pinned_ = false;
  Status pin_status_{};
};

}  // namespace hattn::cuda
