#pragma once
// SlotRing: a ring of fixed slots in pinned host memory through which a
// micro-batch travels from the device to the CPU and back. Each slot holds
// the request (q, the new k and v, optional LSH query codes) and the response
// (partial o and lse2) of one micro-batch of one layer.
//
// Position p (0, 1, 2, ...) uses slot p % capacity and moves through three
// phases, kept in that slot's sequence number seq = 3p + phase:
//
//   3p     free for p      producer: acquire(p) waits for it (backpressure)
//   3p+1   request ready   publish_request(p); the CPU side waits for it
//   3p+2   response ready  publish_response(p); the consumer waits for it
//   3(p+C) released        release(p): free for position p + capacity
//
// One thread (or one in-order stream) owns each transition, so every slot has
// a single writer at a time: stores are release, the matching waits acquire,
// and the buffers need no other synchronization. Waits spin briefly, then
// block, and take a deadline.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <stdexcept>
#include <vector>

#include "hattn/core/dtype.hpp"
#include "hattn/core/status.hpp"
#include "hattn/runtime/stream.hpp"
#include "hattn/runtime/wait.hpp"

namespace hattn::runtime {

// Where slot memory comes from: page-aligned host memory by default; a CUDA
// host supplies cudaHostAlloc/cudaFreeHost so copies are truly asynchronous.
struct HostMemoryResource {
  void* (*allocate)(std::size_t bytes, void* context) = nullptr;
  void (*deallocate)(void* p, void* context) = nullptr;
  void* context = nullptr;
};

inline HostMemoryResource page_aligned_host_memory() noexcept {
  return {[](std::size_t bytes, void*) -> void* {
            constexpr std::size_t kPage = 4096;
            return std::aligned_alloc(kPage, (bytes + kPage - 1) / kPage * kPage);
          },
          [](void* p, void*) { std::free(p); }, nullptr};
}

// The largest micro-batch a slot holds. q and o are f32 [B][Hq][D], k and v
// [B][Hkv][D] in the KV dtype, lse2 f32 [B][Hq], codes [B][code_bytes_per_seq].
struct SlotShape {
  std::int32_t max_batch = 0;
  std::int32_t num_q_heads = 0;
  std::int32_t num_kv_heads = 0;
  std::int32_t head_dim = 0;
  DType kv_dtype = DType::kBF16;
  std::size_t code_bytes_per_seq = 0;  // 0: no LSH query codes

  std::size_t q_bytes() const noexcept {
    return sizeof(float) * static_cast<std::size_t>(max_batch) * num_q_heads * head_dim;
  }
  std::size_t kv_bytes() const noexcept {  // one of k, v
    return size_of(kv_dtype) * static_cast<std::size_t>(max_batch) * num_kv_heads * head_dim;
  }
  std::size_t codes_bytes() const noexcept { return code_bytes_per_seq * max_batch; }
  std::size_t lse_bytes() const noexcept {
    return sizeof(float) * static_cast<std::size_t>(max_batch) * num_q_heads;
  }
};

// Pointers into one slot's pinned memory.
struct SlotBuffers {
  float* q = nullptr;
  void* k = nullptr;
  void* v = nullptr;
  std::byte* codes = nullptr;  // null without codes
  float* o = nullptr;
  float* lse2 = nullptr;
};

class SlotRing {
 public:
  // Throws std::invalid_argument for a bad shape or capacity, std::bad_alloc
  // when the memory cannot be had.
  SlotRing(const SlotShape& shape, std::int32_t capacity,
           HostMemoryResource memory = page_aligned_host_memory())
      : shape_(shape), capacity_(capacity), memory_(memory) {
    if (capacity < 1 || shape.max_batch < 1 || shape.num_q_heads < 1 || shape.num_kv_heads < 1 ||
        shape.head_dim < 1)
      throw std::invalid_argument("SlotRing: capacity and shape must be positive");
    if (!memory.allocate || !memory.deallocate)
      throw std::invalid_argument("SlotRing: memory resource is incomplete");
    stride_ = round_up(shape.q_bytes()) + 2 * round_up(shape.kv_bytes()) +
              round_up(shape.codes_bytes()) + round_up(shape.q_bytes()) +
              round_up(shape.lse_bytes());
    // The sequence words follow the slots in the same (pinned) memory, one per
    // cache line: a device stream can wait on them (cuStreamWaitValue32).
    const std::size_t words = kWordStride * static_cast<std::size_t>(capacity);
    base_ = static_cast<std::byte*>(memory.allocate(stride_ * capacity + words, memory.context));
    if (!base_) throw std::bad_alloc();
    words_ = base_ + stride_ * capacity;
    for (std::int32_t i = 0; i < capacity; ++i)
      new (words_ + kWordStride * static_cast<std::size_t>(i))
          std::atomic<std::uint64_t>(3 * std::uint64_t(i));
  }
  ~SlotRing() { memory_.deallocate(base_, memory_.context); }
  SlotRing(const SlotRing&) = delete;
  SlotRing& operator=(const SlotRing&) = delete;

  std::int32_t capacity() const noexcept { return capacity_; }
  const SlotShape& shape() const noexcept { return shape_; }

  SlotBuffers buffers(std::int64_t pos) const noexcept {
    std::byte* p = base_ + stride_ * index(pos);
    SlotBuffers b;
    b.q = reinterpret_cast<float*>(p);
    p += round_up(shape_.q_bytes());
    b.k = p;
    p += round_up(shape_.kv_bytes());
    b.v = p;
    p += round_up(shape_.kv_bytes());
    b.codes = shape_.code_bytes_per_seq ? p : nullptr;
    p += round_up(shape_.codes_bytes());
    b.o = reinterpret_cast<float*>(p);
    p += round_up(shape_.q_bytes());
    b.lse2 = reinterpret_cast<float*>(p);
    return b;
  }

  // Producer: wait until slot of `pos` is free (its previous occupant released).
  Status acquire(std::int64_t pos, Deadline deadline) {
    return wait_phase(pos, 0, deadline) ? Status::ok()
                                        : Status{StatusCode::kInternal,
                                                 "SlotRing: deadline exceeded waiting for a free "
                                                 "slot (the ring is full)"};
  }
  void publish_request(std::int64_t pos) noexcept { set_phase(pos, 1); }

  // CPU side: wait for the request of `pos`; false on deadline or when
  // `*stop` becomes true (checked on every wake-up; call wake() after setting it).
  bool wait_request(std::int64_t pos, Deadline deadline, const std::atomic<bool>* stop = nullptr) {
    const std::uint64_t want = 3 * std::uint64_t(pos) + 1;
    auto& s = seq(index(pos));
    return waiter_.wait_until(
               [&] {
                 return s.load(std::memory_order_acquire) == want ||
                        (stop && stop->load(std::memory_order_acquire));
               },
               deadline) &&
           s.load(std::memory_order_acquire) == want;
  }
  void publish_response(std::int64_t pos) noexcept { set_phase(pos, 2); }

  // Consumer: wait for the response of `pos`.
  Status wait_response(std::int64_t pos, Deadline deadline) {
    return wait_phase(pos, 2, deadline)
               ? Status::ok()
               : Status{StatusCode::kInternal,
                        "SlotRing: deadline exceeded waiting for CPU attention"};
  }
  // Consumer: the slot is free for position pos + capacity.
  void release(std::int64_t pos) noexcept {
    seq(index(pos)).store(3 * std::uint64_t(pos + capacity_), std::memory_order_release);
    waiter_.notify();
  }

  // The phase pos is in (0 free, 1 request, 2 response), or -1 when the slot
  // belongs to another position. For tests and assertions.
  int phase(std::int64_t pos) const noexcept {
    const std::uint64_t s = seq(index(pos)).load(std::memory_order_acquire);
    const std::uint64_t base = 3 * std::uint64_t(pos);
    return s >= base && s < base + 3 ? static_cast<int>(s - base) : -1;
  }

  // The sequence word of pos's slot and the value it reaches when pos's
  // response is ready (it only grows while pos holds the slot), for streams
  // that wait on memory (Stream::wait_value). The word lives in the ring's
  // memory resource: pinned and device-mapped with a CUDA resource.
  HostWord response_word(std::int64_t pos) noexcept { return {&seq(index(pos)), &waiter_}; }
  static std::uint64_t response_value(std::int64_t pos) noexcept {
    return 3 * std::uint64_t(pos) + 2;
  }

  // Wake every waiter so it re-checks its stop flag.
  void wake() { waiter_.notify(); }

 private:
  static std::size_t round_up(std::size_t n) noexcept { return (n + 63) / 64 * 64; }
  std::size_t index(std::int64_t pos) const noexcept {
    return static_cast<std::size_t>(pos % capacity_);
  }
  bool wait_phase(std::int64_t pos, int phase, Deadline deadline) {
    const std::uint64_t want = 3 * std::uint64_t(pos) + phase;
    auto& s = seq(index(pos));
    return waiter_.wait_until([&] { return s.load(std::memory_order_acquire) == want; }, deadline);
  }
  void set_phase(std::int64_t pos, int phase) noexcept {
    seq(index(pos)).store(3 * std::uint64_t(pos) + phase, std::memory_order_release);
    waiter_.notify();
  }

  static constexpr std::size_t kWordStride = 64;
  static_assert(std::atomic<std::uint64_t>::is_always_lock_free &&
                sizeof(std::atomic<std::uint64_t>) == sizeof(std::uint64_t));
  std::atomic<std::uint64_t>& seq(std::size_t i) const noexcept {
    return *std::launder(reinterpret_cast<std::atomic<std::uint64_t>*>(words_ + kWordStride * i));
  }

  SlotShape shape_;
  std::int32_t capacity_;
  HostMemoryResource memory_;
  std::size_t stride_ = 0;
  std::byte* base_ = nullptr;
  std::byte* words_ = nullptr;  // capacity sequence words, kWordStride apart
  SpinThenBlock waiter_;
};

}  // namespace hattn::runtime
