#pragma once
// Thread placement for the orchestrator's threads. On a host whose cores are
// few (or shared), a woken thread may be queued behind its waker on the
// waker's core while another core idles, and the compute and CPU-attention
// tracks then alternate instead of overlapping. Pinning the compute stream's
// worker and the CPU attention thread to different cores avoids that:
//
//   HostStream compute([] { (void)pin_this_thread(0); });
//   options.cpu_thread_init = [] { (void)pin_this_thread(1); };

#include "hattn/core/status.hpp"

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

namespace hattn::runtime {

// Restricts the calling thread to one CPU. kNotSupported off Linux,
// kInvalidArgument when the CPU does not exist or is not allowed.
inline Status pin_this_thread(int cpu) noexcept {
#if defined(__linux__)
  if (cpu < 0 || cpu >= CPU_SETSIZE)
    return {StatusCode::kInvalidArgument, "pin_this_thread: cpu out of range"};
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  if (pthread_setaffinity_np(pthread_self(), sizeof(set), &set) != 0)
    return {StatusCode::kInvalidArgument, "pin_this_thread: the CPU is not available"};
  return Status::ok();
#else
  (void)cpu;
  return {StatusCode::kNotSupported, "pin_this_thread: only on Linux"};
#endif
}

}  // namespace hattn::runtime
