#pragma once
// CpuExecutor: where hattn's CPU work runs. It borrows the host's
// tbb::task_arena, or owns one; hattn never touches global TBB state.

#include <tbb/blocked_range.h>
#include <tbb/info.h>
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include <cstdint>
#include <memory>

#include "hattn/core/status.hpp"

namespace hattn {

class CpuExecutor {
 public:
  // Owns an arena of `max_concurrency` threads (0: tbb::info::default_concurrency()).
  explicit CpuExecutor(int max_concurrency = 0)
      : owned_(std::make_unique<tbb::task_arena>(
            max_concurrency > 0 ? max_concurrency : tbb::info::default_concurrency())),
        arena_(owned_.get()) {}
  // Borrows the host's arena, which must outlive the executor.
  explicit CpuExecutor(tbb::task_arena& borrowed) noexcept : arena_(&borrowed) {}

  CpuExecutor(CpuExecutor&&) noexcept = default;
  CpuExecutor& operator=(CpuExecutor&&) noexcept = default;

  int concurrency() const { return arena_->max_concurrency(); }
  tbb::task_arena& arena() const noexcept { return *arena_; }

  // Run f(i) for i in [0, n) on the arena and wait. An exception from f, or
  // from TBB itself (std::bad_alloc when it cannot allocate its tasks), comes
  // out of this call once the items that started have finished.
  template <class F>
  void parallel_for(std::int64_t n, const F& f) const {
    if (n <= 0) return;
    if (n == 1 || arena_->max_concurrency() == 1) {
      arena_->execute([&] {
        for (std::int64_t i = 0; i < n; ++i) f(i);
      });
      return;
    }
    arena_->execute([&] {
      tbb::parallel_for(tbb::blocked_range<std::int64_t>(0, n, 1),
                        [&](const tbb::blocked_range<std::int64_t>& r) {
                          for (std::int64_t i = r.begin(); i < r.end(); ++i) f(i);
                        });
    });
  }

  // parallel_for for noexcept callers: an exception becomes kOutOfMemory
  // (std::bad_alloc) or kInternal, and the items may then have run in part.
  template <class F>
  [[nodiscard]] Status try_parallel_for(std::int64_t n, const F& f) const noexcept {
    return detail::status_of(
        [&] {
          parallel_for(n, f);
          return Status::ok();
        },
        "parallel_for: out of memory", "parallel_for: a task threw");
  }

 private:
  std::unique_ptr<tbb::task_arena> owned_;
  tbb::task_arena* arena_;
};

}  // namespace hattn
