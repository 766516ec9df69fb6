#pragma once
// The one source of randomness of the suite. The seed is fresh each run
// (std::random_device) unless HATTN_TEST_SEED is set; main() prints it, and
// every failure message repeats it, so a failure can be reproduced with
//   HATTN_TEST_SEED=<seed> ./hattn_tests "<test name>"
// Each test derives its own generator from the seed and a tag (its name and
// case index), so a test draws the same inputs whether it runs alone or in the
// whole suite.

#include <cstdint>
#include <random>
#include <string>
#include <string_view>

namespace hattn_test {

std::uint64_t test_seed();
std::mt19937_64 make_rng(std::string_view tag);
// "seed=<n> (HATTN_TEST_SEED=<n> reproduces)", for failure messages.
std::string seed_note();

}  // namespace hattn_test
