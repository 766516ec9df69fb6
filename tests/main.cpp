// The suite's main: a Catch session that prints the seed of this run before
// any test (but not when Catch only lists tests, which ctest discovery parses).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <tbb/global_control.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <string>

#include "common/check.hpp"
#include "common/seed.hpp"

int main(int argc, char** argv) {
  // HATTN_TEST_ONE_TBB_THREAD=1: no TBB worker threads (every arena's work
  // runs on the thread that enters it). The ThreadSanitizer run of the
  // orchestrated model tests uses it: TBB is not instrumented, so TSan would
  // report its task hand-offs between workers as races; the threads hattn
  // itself starts (streams, the orchestrator's CPU thread) are still there.
  std::unique_ptr<tbb::global_control> one_thread;
  if (const char* e = std::getenv("HATTN_TEST_ONE_TBB_THREAD"); e && std::string(e) == "1")
    one_thread =
        std::make_unique<tbb::global_control>(tbb::global_control::max_allowed_parallelism, 1);
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
