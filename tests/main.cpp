// The suite's main: a Catch session that prints the seed of this run before
// any test (but not when Catch only lists tests, which ctest discovery parses).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>
#include <exception>

#include "common/check.hpp"
#include "common/seed.hpp"

int main(int argc, char** argv) {
  Catch::Session session;
  if (const int rc = session.applyCommandLine(argc, argv); rc != 0) return rc;
  const Catch::ConfigData& cfg = session.configData();
  if (!cfg.listTests && !cfg.listTestNamesOnly && !cfg.listTags && !cfg.listReporters &&
      !cfg.showHelp) {
    try {
      std::printf("hattn_tests: %s\n", hattn_test::seed_note().c_str());
    } catch (const std::exception& e) {
      std::fprintf(stderr, "hattn_tests: %s\n", e.what());
      return 2;
    }
    std::fflush(stdout);
  }
  const int failed = session.run();
  if (hattn_test::worst_tolerance_ratio() > 0.0)
    std::printf("hattn_tests: worst |diff| / allowed over all comparisons: %.3g\n",
                hattn_test::worst_tolerance_ratio());
  return failed;
}
