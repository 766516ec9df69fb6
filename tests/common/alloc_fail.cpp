// The test binary's global operator new and delete (see alloc_fail.hpp).
// Kept in their own translation unit so no caller sees their bodies.
#include "common/alloc_fail.hpp"

#include <cstddef>
#include <cstdlib>
#include <new>

namespace {
thread_local long g_fail_in = -1;
}  // namespace

namespace hattn_test {
void fail_allocation_in(long k) noexcept { g_fail_in = k; }
}  // namespace hattn_test

void* operator new(std::size_t n) {
  if (g_fail_in >= 0 && g_fail_in-- == 0) throw std::bad_alloc();
  if (void* p = std::malloc(n != 0 ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
