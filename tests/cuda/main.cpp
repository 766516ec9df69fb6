// hattn_tests_cuda: the GPU tests. Exits 77 (ctest: skipped) when there is
// no usable CUDA device, so CPU-only machines still build and "pass" them.
#define CATCH_CONFIG_RUNNER
#include <cuda_runtime_api.h>
#include <catch2/catch.hpp>

#include <cstdio>
#include <exception>

#include "common/check.hpp"
#include "common/seed.hpp"

int main(int argc, char** argv) {
  Catch::Session session;
  if (const int rc = session.applyCommandLine(argc, argv); rc != 0) return rc;
  const Catch::ConfigData& cfg = session.configData();
  const bool listing =
      cfg.listTests || cfg.listTestNamesOnly || cfg.listTags || cfg.listReporters || cfg.showHelp;
  if (!listing) {
    int devices = 0;
    const cudaError_t e = cudaGetDeviceCount(&devices);
    if (e != cudaSuccess || devices == 0) {
      std::printf("hattn_tests_cuda: no CUDA device (%s): skipped\n",
                  e != cudaSuccess ? cudaGetErrorString(e) : "device count 0");
      return 77;
    }
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess)
      std::printf("hattn_tests_cuda: device 0: %s, %d SMs, sm_%d%d\n", prop.name,
                  prop.multiProcessorCount, prop.major, prop.minor);
    try {
      std::printf("hattn_tests_cuda: %s\n", hattn_test::seed_note().c_str());
    } catch (const std::exception& ex) {
      std::fprintf(stderr, "hattn_tests_cuda: %s\n", ex.what());
      return 2;
    }
    std::fflush(stdout);
  }
  const int failed = session.run();
  if (hattn_test::worst_tolerance_ratio() > 0.0)
    std::printf("hattn_tests_cuda: worst |diff| / allowed over all comparisons: %.3g\n",
                hattn_test::worst_tolerance_ratio());
  return failed;
}
