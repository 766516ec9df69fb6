#pragma once
// The transformers fixtures of tests/fixtures/llama (make_llama_fixtures.py):
// their names and what each expects (prompt, greedy continuation, and the
// logits of every step), shared by the CPU, orchestrated and CUDA model tests.

#include <catch2/catch.hpp>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "common/check.hpp"

namespace hattn_test {

inline const char* const kLlamaFixtures[] = {"mha_f32", "gqa_llama3_tied_bf16", "gqa8_sharded_f16"};

// Logits against the oracle with f32 arithmetic on both sides (the
// derivation is at the top of tests/test_model_fixtures.cpp).
inline constexpr Tolerance kLlamaLogitTolerance{1e-4, 1e-4, 1e-9};

struct LlamaExpected {
  std::vector<std::int32_t> prompt;
  std::vector<std::int32_t> generated;
  std::vector<std::vector<double>> logits;  // [step][vocab]
};

// <dir>/expected.json.
inline LlamaExpected read_llama_expected(const std::filesystem::path& dir) {
  std::ifstream in(dir / "expected.json");
  REQUIRE(in);
  const nlohmann::json j = nlohmann::json::parse(in);
  LlamaExpected e;
  e.prompt = j.at("prompt").get<std::vector<std::int32_t>>();
  e.generated = j.at("generated").get<std::vector<std::int32_t>>();
  e.logits = j.at("logits").get<std::vector<std::vector<double>>>();
  return e;
}

}  // namespace hattn_test
