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

// Over-aligned types (hattn's 64-byte aligned vectors) come here.
void* operator new(std::size_t n, std::align_val_t al) {
  if (g_fail_in >= 0 && g_fail_in-- == 0) throw std::bad_alloc();
  const auto a = static_cast<std::size_t>(al);
  const std::size_t size = n == 0 ? a : (n + a - 1) / a * a;  // aligned_alloc: a multiple
  if (void* p = std::aligned_alloc(a, size)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
