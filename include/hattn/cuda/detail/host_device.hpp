#pragma once
// HATTN_HOST_DEVICE marks small math helpers that the CUDA kernels and the
// host (plan, tests) share, so both sides run the same code. Under a plain C++
// compiler it expands to nothing.

#if defined(__CUDACC__)
#define HATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HATTN_HOST_DEVICE inline
#endif
