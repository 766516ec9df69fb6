#pragma once
// Waiting that spins briefly, then blocks: a waiter that is woken within a few
// microseconds pays no syscall, and an idle one burns no core. Every wait has
// a deadline; Deadline::max() waits forever.

#include <chrono>
#include <condition_variable>
#include <mutex>

namespace hattn::runtime {

using Clock = std::chrono::steady_clock;
using Deadline = Clock::time_point;

inline Deadline deadline_after(Clock::duration d) noexcept {
  const Deadline now = Clock::now();
  return d >= Deadline::max() - now ? Deadline::max() : now + d;
}

namespace detail {
inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}
}  // namespace detail

// A condition variable with a spin phase. Waiters evaluate `ready` (which must
// read atomics or state guarded by nothing else); notifiers change that state
// and then call notify(). Taking the mutex in notify() orders the change before
// a blocked waiter's re-check, so no wake-up is lost.
class SpinThenBlock {
 public:
  static constexpr int kSpinIterations = 256;  // a few microseconds of pause instructions

  // True when ready() held before the deadline.
  template <class Ready>
  bool wait_until(Ready ready, Deadline deadline) {
    for (int i = 0; i < kSpinIterations; ++i) {
      if (ready()) return true;
      detail::cpu_relax();
    }
    std::unique_lock<std::mutex> lock(mutex_);
    if (deadline == Deadline::max()) {
      cv_.wait(lock, ready);
      return true;
    }
    return cv_.wait_until(lock, deadline, ready);
  }

  // noexcept: std::mutex::lock throws only if pthread_mutex_lock fails, which
  // a default mutex that is never locked recursively does not. The ring's
  // noexcept publish and release call this.
  void notify() noexcept {
    { std::lock_guard<std::mutex> lock(mutex_); }
    cv_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
};

}  // namespace hattn::runtime
