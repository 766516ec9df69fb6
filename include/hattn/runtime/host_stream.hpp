#pragma once
// HostStream and HostEvent: the Stream concept (runtime/stream.hpp) on the
// host. A stream is one worker thread running its queue in order; it sleeps on
// a condition variable when the queue is empty. Used for tests, benchmarks and
// hosts without a GPU: the orchestrator's pipeline runs concurrently for real.
//
// Errors are sticky like CUDA's: once an enqueued callable fails (returns an
// error Status or throws), later engine work and copies on the stream are
// skipped until synchronize() returns and clears the error. host_fn callables
// and event records/waits always run, so the pipeline's bookkeeping drains.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <thread>
#include <utility>

#include "hattn/core/merge.hpp"
#include "hattn/core/problem.hpp"
#include "hattn/core/status.hpp"
#include "hattn/runtime/stream.hpp"
#include "hattn/runtime/wait.hpp"

namespace hattn::runtime {

class HostEvent;

class HostStream {
 public:
  using Handle = HostStream*;
  using Event = HostEvent;

  // Starts the worker thread; throws std::system_error if it cannot.
  HostStream() : worker_([this] { run(); }) {}
  // thread_init() runs first on the worker thread (placement, naming). It
  // must not throw: it runs outside any handler, so that would terminate.
  explicit HostStream(std::function<void()> thread_init)
      : worker_([this, init = std::move(thread_init)] {
          if (init) init();
          run();
        }) {}
  // Finishes everything enqueued, then joins the worker.
  ~HostStream() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    work_cv_.notify_all();
    worker_.join();
  }
  HostStream(const HostStream&) = delete;
  HostStream& operator=(const HostStream&) = delete;

  Handle handle() noexcept { return this; }

  // f(handle()) runs on the worker thread; an exception becomes kInternal.
  template <class F>
  Status enqueue(F&& f) {
    return push([this, f = std::forward<F>(f)]() mutable -> Status { return f(this); }, false);
  }
  Status copy(void* dst, const void* src, std::size_t bytes) {
    return push(
        [dst, src, bytes]() -> Status {
          if (bytes > 0) std::memcpy(dst, src, bytes);
          return Status::ok();
        },
        false);
  }
  template <class F>
  Status host_fn(F&& f) {
    return push(
        [f = std::forward<F>(f)]() mutable -> Status {
          f();
          return Status::ok();
        },
        true);
  }
  // Blocks the worker until *w.word >= value (runs even after an error, so
  // the pipeline drains; the writer always gets there).
  Status wait_value(HostWord w, std::uint64_t value) {
    if (w.word == nullptr || w.waiter == nullptr)
      return {StatusCode::kInvalidArgument, "HostStream::wait_value: null word or waiter"};
    return host_fn([w, value] {
      w.waiter->wait_until([&] { return w.word->load(std::memory_order_acquire) >= value; },
                           Deadline::max());
    });
  }
  // The worker writes the time when it gets here (runs even after an error).
  Status stamp(std::int64_t* t) {
    return host_fn([t] { *t = steady_now_ns(); });
  }
  Status merge(const PartialView& a, const PartialView& b, const PartialView& out) {
    return push([a, b, out]() -> Status { return merge_partials(a, b, out); }, false);
  }

  Status query() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return error_;
  }

  Status synchronize(Deadline deadline = Deadline::max()) {
    std::uint64_t target = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      target = submitted_;
    }
    const bool done = waiter_.wait_until(
        [&] { return completed_.load(std::memory_order_acquire) >= target; }, deadline);
    if (!done)
      return {StatusCode::kInternal,
              "HostStream::synchronize: deadline exceeded (a stage is stalled)"};
    std::lock_guard<std::mutex> lock(mutex_);
    return std::exchange(error_, Status::ok());
  }

 private:
  struct Item {
    std::function<Status()> fn;
    bool always;  // runs even after an error
  };

  // Never throws: a callable that cannot be stored is an error Status.
  template <class F>
  Status push(F&& fn, bool always) noexcept {
    try {
      Item item{std::function<Status()>(std::forward<F>(fn)), always};
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(std::move(item));
      ++submitted_;
    } catch (...) {
      return {StatusCode::kOutOfMemory, "HostStream: cannot enqueue"};
    }
    work_cv_.notify_one();
    return Status::ok();
  }

  void run() {
    for (;;) {
      Item item;
      bool skip = false;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        work_cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stop_ and drained
        item = std::move(queue_.front());
        queue_.pop_front();
        skip = !item.always && !error_.is_ok();
      }
      Status s = Status::ok();
      if (!skip) {
        try {
          s = item.fn();
        } catch (...) {
          s = {StatusCode::kInternal, "HostStream: an enqueued callable threw an exception"};
        }
      }
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!s && error_.is_ok()) error_ = s;
      }
      completed_.fetch_add(1, std::memory_order_release);
      waiter_.notify();
    }
  }

  mutable std::mutex mutex_;
  std::condition_variable work_cv_;
  std::deque<Item> queue_;
  std::uint64_t submitted_ = 0;
  std::atomic<std::uint64_t> completed_{0};
  Status error_ = Status::ok();
  bool stop_ = false;
  SpinThenBlock waiter_;
  std::thread worker_;  // last: starts after every other member exists
};

// Records a point in a HostStream; other streams or the host wait for it.
// Copyable handles to one shared state, so a stream's queued items keep it
// alive.
// Its state is made on the first record() (so a default-constructed one never
// throws and an unrecorded wait is a no-op, like CudaEvent's); move-only.
class HostEvent {
 public:
  HostEvent() noexcept = default;
  HostEvent(HostEvent&&) noexcept = default;
  HostEvent& operator=(HostEvent&&) noexcept = default;

  Status record(HostStream& stream) {
    if (!state_) {
      try {
        state_ = std::make_shared<State>();
      } catch (const std::bad_alloc&) {
        return {StatusCode::kOutOfMemory, "HostEvent::record: out of memory"};
      }
    }
    const std::uint64_t gen = ++state_->recorded;  // only the issuing thread records
    return stream.host_fn([s = state_, gen] {
      s->completed.store(gen, std::memory_order_release);
      s->waiter.notify();
    });
  }
  // Later work on `stream` waits until the last record() has completed.
  Status wait(HostStream& stream) {
    if (!state_) return Status::ok();
    const std::uint64_t gen = state_->recorded;
    return stream.host_fn([s = state_, gen] {
      s->waiter.wait_until([&] { return s->completed.load(std::memory_order_acquire) >= gen; },
                           Deadline::max());
    });
  }
  Status synchronize(Deadline deadline = Deadline::max()) {
    if (!state_) return Status::ok();
    const std::uint64_t gen = state_->recorded;
    const bool done = state_->waiter.wait_until(
        [&] { return state_->completed.load(std::memory_order_acquire) >= gen; }, deadline);
    return done ? Status::ok()
                : Status{StatusCode::kInternal, "HostEvent::synchronize: deadline exceeded"};
  }
  bool query() const noexcept {
    return !state_ || state_->completed.load(std::memory_order_acquire) >= state_->recorded;
  }

 private:
  struct State {
    std::uint64_t recorded = 0;  // touched by the issuing thread only
    std::atomic<std::uint64_t> completed{0};
    SpinThenBlock waiter;
  };
  std::shared_ptr<State> state_;
};

static_assert(Stream<HostStream>);

}  // namespace hattn::runtime
