#pragma once
// Software prefetches the compiler keeps. GCC 12 at -O1 and above deletes a
// __builtin_prefetch (and an _mm_prefetch) that sits under a condition in
// some inlined contexts: until session 6 the dense kernels carried none of
// the prefetches their source asked for (docs/cpu-dense.md). On x86 these are
// asm volatile, which the optimizer must emit; the operand is an address, not
// a load, so a prefetch past the end of a buffer cannot fault.

namespace hattn::cpu::detail {

// Towards L1 (and L2).
inline void prefetch_l1(const void* p) noexcept {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

// Towards L2 only on CPUs that honour the hint (Zen 4, Intel cores);
// the line does not take an L1 miss buffer while it is fetched there.
inline void prefetch_l2(const void* p) noexcept {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

}  // namespace hattn::cpu::detail
