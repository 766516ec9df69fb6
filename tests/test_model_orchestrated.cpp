// Decode driven by the orchestrator (model::OrchestratedRunner): the stages on
// a host compute stream, attention on the orchestrator's CPU thread, with 1..3
// micro-batches. Against the transformers fixtures (same oracle and tolerance
// as test_model_fixtures.cpp: see the derivation there), for cpu-dense and for
// LSH with sampling forced to every key, and against the sequential
// LlamaRunner on a batch of different prompts.

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/check.hpp"
#include "common/llama_fixture.hpp"
#include "hattn/cpu/executor.hpp"
#include "hattn/model/attention.hpp"
#include "hattn/model/llama.hpp"
#include "hattn/model/orchestrated_runner.hpp"
#include "hattn/model/runner.hpp"
#include "hattn/model/sampler.hpp"

namespace {

using Expected = hattn_test::LlamaExpected;
using hattn_test::read_llama_expected;
constexpr const auto& kFixtures = hattn_test::kLlamaFixtures;

namespace fs = std::filesystem;
namespace hm = hattn::model;

constexpr hattn_test::Tolerance kLogitTolerance{1e-4, 1e-4, 1e-9};
hm::DenseKvAttentionOptions kv_options(std::int32_t seqs, std::int64_t max_len,
                                       hattn::DType dtype = hattn::DType::kF32) {
  return {.kv_dtype = dtype,
          .page_size = 16,
          .num_sequences = seqs,
          .max_seq_len = max_len,
          .max_prefill_tokens = 64,
          .precision = hattn::cpu::DenseDecode::Precision::kF32};
}

// LSH that indexes the fixtures' short prompts (see test_model_fixtures.cpp).
hm::OrchestratedRunnerOptions lsh_options(std::int32_t mbs, std::vector<std::int32_t> dense) {
  hm::OrchestratedRunnerOptions o;
  o.num_micro_batches = mbs;
  o.attention = hm::CpuAttentionKind::kLsh;
  o.lsh.sink = 1;
  o.lsh.window = 2;
  o.lsh.max_exact_tail = 4;
  o.lsh.sample_all = true;
  o.lsh_dense_layers = std::move(dense);
  return o;
}

// `batch` copies of the fixture's prompt, decoded through the orchestrator
// with the oracle's tokens fed back: every sequence must give the oracle's
// logits at every step, and its greedy tokens.
void run_fixture(const std::string& name, std::int32_t batch,
                 const hm::OrchestratedRunnerOptions& options, bool two_executors) {
  const fs::path dir = fs::path(HATTN_FIXTURE_DIR) / name;
  const Expected e = read_llama_expected(dir);
  hm::LlamaModel model;
  REQUIRE(hm::LlamaModel::load(dir, &model).is_ok());
  const auto vocab = static_cast<std::size_t>(model.config().vocab_size);
  INFO("fixture " << name << ", batch " << batch << ", micro-batches " << options.num_micro_batches
                  << ", " << (options.attention == hm::CpuAttentionKind::kLsh ? "lsh" : "dense")
                  << (two_executors ? ", two executors" : ""));
  const hattn::CpuExecutor executor(two_executors ? 1 : 2);
  const hattn::CpuExecutor attention_executor(1);
  hm::DenseKvAttention kv(
      model.config(),
      kv_options(batch, static_cast<std::int64_t>(e.prompt.size() + e.generated.size())), executor);
  hm::LlamaRunner prefill(model, kv, executor);
  std::vector<float> logits(vocab * static_cast<std::size_t>(batch));
  for (std::int32_t b = 0; b < batch; ++b)
    REQUIRE(prefill.prefill(b, e.prompt, 5, logits.data() + b * vocab).is_ok());
  std::unique_ptr<hm::OrchestratedRunner> run;
  std::string detail;
  const hattn::Status s = hm::OrchestratedRunner::create(
      model, kv, options, executor, two_executors ? attention_executor : executor, &run, &detail);
  INFO(detail);
  REQUIRE(s.is_ok());
  CHECK(run->num_micro_batches() == std::min(options.num_micro_batches, batch));
  run->set_sampling_stats(true);
  for (std::size_t step = 0; step < e.generated.size(); ++step) {
    for (std::int32_t b = 0; b < batch; ++b) {
      const std::vector<double> got(logits.begin() + static_cast<std::ptrdiff_t>(b * vocab),
                                    logits.begin() + static_cast<std::ptrdiff_t>((b + 1) * vocab));
      const std::string err =
          hattn_test::compare("logits", got, e.logits[step], kLogitTolerance,
                              name + " step " + std::to_string(step) + " seq " + std::to_string(b),
                              [](std::size_t i) { return std::to_string(i); });
      CHECK(err.empty());
      if (!err.empty()) FAIL_CHECK(err);
      CHECK(hm::argmax(std::span(logits.data() + b * vocab, vocab)) == e.generated[step]);
    }
    if (step + 1 < e.generated.size()) {
      const std::vector<std::int32_t> feed(static_cast<std::size_t>(batch), e.generated[step]);
      REQUIRE(run->decode_step(feed, logits.data()).is_ok());
    }
  }
  // Every layer of every sequence holds prompt + fed tokens.
  for (std::int32_t l = 0; l < model.config().num_layers; ++l)
    for (std::int32_t b = 0; b < batch; ++b)
      CHECK(kv.seq_len(l, b) ==
            static_cast<std::int64_t>(e.prompt.size() + e.generated.size() - 1));
  CHECK(run->wall_s() > 0.0);
  CHECK(run->attention_busy_s() > 0.0);
  CHECK(run->compute_busy_s() > 0.0);
  if (options.attention == hm::CpuAttentionKind::kLsh) {
    CHECK(run->index_bytes() > 0);
    // sample_all: every indexed key is sampled.
    CHECK(run->mean_sampled_fraction() == Approx(1.0));
  }
}

}  // namespace

TEST_CASE("orchestrated decode: fixtures match transformers (cpu-dense)",
          "[model][fixture][orchestrated]") {
  for (const char* name : kFixtures) {
    hm::OrchestratedRunnerOptions o;
    o.num_micro_batches = 1;
    run_fixture(name, 1, o, false);
    o.num_micro_batches = 2;
    run_fixture(name, 3, o, true);  // micro-batches of 2 and 1 sequences
    o.num_micro_batches = 3;
    run_fixture(name, 3, o, false);
  }
}

TEST_CASE("orchestrated decode: fixtures match transformers (lsh, sampling forced to every key)",
          "[model][fixture][orchestrated][lsh]") {
  for (const char* name : kFixtures) {
    run_fixture(name, 1, lsh_options(1, {}), false);
    run_fixture(name, 3, lsh_options(2, {0}), true);  // layer 0 dense, layer 1 sampled
  }
}

TEST_CASE("orchestrated decode equals the sequential runner", "[model][orchestrated]") {
  // Different prompts, bf16 KV, greedy continuation: the orchestrated steps
  // (2 micro-batches) and LlamaRunner::decode_step compute the same stages
  // and the same attention, so their logits agree to rounding and the tokens
  // are the same.
  const fs::path dir = fs::path(HATTN_FIXTURE_DIR) / "gqa_llama3_tied_bf16";
  hm::LlamaModel model;
  REQUIRE(hm::LlamaModel::load(dir, &model).is_ok());
  const auto vocab = static_cast<std::size_t>(model.config().vocab_size);
  const hattn::CpuExecutor executor(2);
  const std::vector<std::vector<std::int32_t>> prompts = {
      {1, 2, 3, 4, 5, 6, 7}, {9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12, 13}, {42, 17}, {5}};
  const auto B = static_cast<std::int32_t>(prompts.size());
  constexpr int kSteps = 12;
  std::vector<std::vector<float>> ref_logits, orch_logits;
  for (const bool orchestrated : {false, true}) {
    hm::DenseKvAttention kv(model.config(), kv_options(B, 64, hattn::DType::kBF16), executor);
    hm::LlamaRunner runner(model, kv, executor);
    std::vector<float> logits(vocab * static_cast<std::size_t>(B));
    std::vector<std::int32_t> next(static_cast<std::size_t>(B));
    for (std::int32_t b = 0; b < B; ++b) {
      REQUIRE(runner.prefill(b, prompts[static_cast<std::size_t>(b)], 4, logits.data()).is_ok());
      next[static_cast<std::size_t>(b)] = hm::argmax(std::span(logits.data(), vocab));
    }
    std::unique_ptr<hm::OrchestratedRunner> run;
    if (orchestrated) {
      hm::OrchestratedRunnerOptions o;
      o.num_micro_batches = 2;
      REQUIRE(hm::OrchestratedRunner::create(model, kv, o, executor, executor, &run).is_ok());
    }
    auto& out = orchestrated ? orch_logits : ref_logits;
    for (int s = 0; s < kSteps; ++s) {
      REQUIRE((orchestrated ? run->decode_step(next, logits.data())
                            : runner.decode_step(next, logits.data()))
                  .is_ok());
      out.push_back(logits);
      for (std::int32_t b = 0; b < B; ++b)
        next[static_cast<std::size_t>(b)] = hm::argmax(std::span(logits.data() + b * vocab, vocab));
    }
  }
  for (int s = 0; s < kSteps; ++s) {
    const std::vector<double> a(ref_logits[s].begin(), ref_logits[s].end());
    const std::vector<double> b(orch_logits[s].begin(), orch_logits[s].end());
    const std::string err = hattn_test::compare(
        "logits", b, a, kLogitTolerance, "orchestrated vs sequential, step " + std::to_string(s));
    CHECK(err.empty());
    if (!err.empty()) FAIL_CHECK(err);
  }
}

TEST_CASE("orchestrated decode: bad input gives a Status", "[model][orchestrated]") {
  const fs::path dir = fs::path(HATTN_FIXTURE_DIR) / "mha_f32";
  hm::LlamaModel model;
  REQUIRE(hm::LlamaModel::load(dir, &model).is_ok());
  const hattn::CpuExecutor executor(1);
  hm::DenseKvAttention kv(model.config(), kv_options(2, 32), executor);
  hm::LlamaRunner prefill(model, kv, executor);
  std::vector<float> logits(2 * static_cast<std::size_t>(model.config().vocab_size));
  const std::vector<std::int32_t> prompt = {1, 2, 3};
  REQUIRE(prefill.prefill(0, prompt, 8, logits.data()).is_ok());
  REQUIRE(prefill.prefill(1, prompt, 8, logits.data()).is_ok());
  std::unique_ptr<hm::OrchestratedRunner> run;
  std::string detail;

  hm::OrchestratedRunnerOptions o;
  o.num_micro_batches = 0;
  CHECK(hm::OrchestratedRunner::create(model, kv, o, executor, executor, &run, &detail).code() ==
        hattn::StatusCode::kInvalidArgument);
  CHECK(detail.find("num_micro_batches") != std::string::npos);
  CHECK(run == nullptr);

  o = lsh_options(1, {});
  o.lsh.K = 0;
  CHECK(!hm::OrchestratedRunner::create(model, kv, o, executor, executor, &run, &detail));
  CHECK(detail.find("LSH config") != std::string::npos);
  o = lsh_options(1, {7});  // the fixture has 2 layers
  CHECK(!hm::OrchestratedRunner::create(model, kv, o, executor, executor, &run, &detail));
  CHECK(detail.find("dense layer") != std::string::npos);

  // Layers out of step (a prefill that stopped half way) are refused.
  const std::vector<float> kvrow(static_cast<std::size_t>(model.config().kv_dim()), 0.5f);
  REQUIRE(kv.append(0, 1, kvrow.data(), kvrow.data(), 1).is_ok());
  CHECK(!hm::OrchestratedRunner::create(model, kv, {}, executor, executor, &run, &detail));
  CHECK(detail.find("different lengths") != std::string::npos);
  REQUIRE(kv.append(1, 1, kvrow.data(), kvrow.data(), 1).is_ok());

  REQUIRE(hm::OrchestratedRunner::create(model, kv, {}, executor, executor, &run).is_ok());
  const std::int32_t one[] = {1};
  CHECK(run->decode_step(one, logits.data()).code() == hattn::StatusCode::kInvalidArgument);
  const std::int32_t two[] = {1, 2};
  CHECK(run->decode_step(two, nullptr).code() == hattn::StatusCode::kInvalidArgument);
  const std::int32_t bad_id[] = {1, model.config().vocab_size};
  CHECK(run->decode_step(bad_id, logits.data()).code() == hattn::StatusCode::kInvalidArgument);
  // Nothing was appended by the failed steps; a good step still runs.
  CHECK(kv.seq_len(0, 0) == 3);
  REQUIRE(run->decode_step(two, logits.data()).is_ok());
  CHECK(kv.seq_len(0, 0) == 4);
  CHECK(kv.seq_len(1, 1) == 5);
  for (float x : logits) REQUIRE(std::isfinite(x));
}
