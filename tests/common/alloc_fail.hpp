#pragma once
// Allocation failure on demand, for the all-or-nothing tests. The test
// binary replaces the global operator new, plain and aligned
// (common/alloc_fail.cpp), with one
// that, after fail_allocation_in(k), throws std::bad_alloc at the k-th call
// from then on (0: the next one) on the calling thread, once; k = -1 (the
// default) never fails.

namespace hattn_test {

void fail_allocation_in(long k) noexcept;

}  // namespace hattn_test
