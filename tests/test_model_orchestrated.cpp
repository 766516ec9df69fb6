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
#include "hattn/model/lsh_kv_attention.hpp"
#include "hattn/model/orchestrated_runner.hpp"
#include "hattn/model/runner.hpp"
#include "hattn/model/sampler.hpp"

namespace {

using Expected = hattn_test::LlamaExpected;
using hattn_test::read_llama_expected;
constexpr const auto& kFixtures = hattn_test::kLlamaFixtures;

namespace fs = std::filesystem;
namespace hm = hattn::model;

constexpr hattn_test::Tolerance kLogitTolerance = hattn_test::kLlamaLogitTolerance;
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
  // Five different prompts (lengths 1..13), bf16 KV, greedy continuation fed
  // back, in 2, 3 and 4 micro-batches (uneven splits): the orchestrated steps
  // and LlamaRunner::decode_step compute the same stages and attention per
  // sequence, so every sequence's logits agree to rounding. Dense against
  // DenseKvAttention, and LSH (every 2nd layer dense, sampling forced to every
  // key) against the sequential LshKvAttention with the same settings.
  const fs::path dir = fs::path(HATTN_FIXTURE_DIR) / "gqa_llama3_tied_bf16";
  hm::LlamaModel model;
  REQUIRE(hm::LlamaModel::load(dir, &model).is_ok());
  const auto vocab = static_cast<std::size_t>(model.config().vocab_size);
  const hattn::CpuExecutor executor(2);
  const std::vector<std::vector<std::int32_t>> prompts = {
      {1, 2, 3, 4, 5, 6, 7},
      {9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12, 13},
      {42, 17},
      {5},
      {60, 61, 62, 63, 64, 65, 66, 67, 68, 69}};
  const auto B = static_cast<std::int32_t>(prompts.size());
  constexpr int kSteps = 10;
  constexpr std::int64_t kMaxLen = 64;
  for (const bool lsh : {false, true}) {
    // The sequential reference.
    std::unique_ptr<hm::KvAttention> ref_kv;
    if (lsh) {
      hm::LshKvAttentionOptions lo;
      lo.lsh = lsh_options(1, {}).lsh;
      lo.kv_dtype = hattn::DType::kBF16;
      lo.num_sequences = B;
      lo.max_seq_len = kMaxLen;
      lo.max_prefill_tokens = 64;
      lo.dense_layers = std::vector<std::int32_t>{0};
      ref_kv = std::make_unique<hm::LshKvAttention>(model.config(), lo, executor);
    } else {
      ref_kv = std::make_unique<hm::DenseKvAttention>(
          model.config(), kv_options(B, kMaxLen, hattn::DType::kBF16), executor);
    }
    std::vector<std::vector<float>> want;
    std::vector<std::vector<std::int32_t>> fed;
    {
      hm::LlamaRunner runner(model, *ref_kv, executor);
      std::vector<float> logits(vocab * static_cast<std::size_t>(B));
      std::vector<std::int32_t> next(static_cast<std::size_t>(B));
      for (std::int32_t b = 0; b < B; ++b) {
        REQUIRE(runner.prefill(b, prompts[static_cast<std::size_t>(b)], 4, logits.data()).is_ok());
        next[static_cast<std::size_t>(b)] = hm::argmax(std::span(logits.data(), vocab));
      }
      for (int s = 0; s < kSteps; ++s) {
        fed.push_back(next);
        REQUIRE(runner.decode_step(next, logits.data()).is_ok());
        want.push_back(logits);
        for (std::int32_t b = 0; b < B; ++b)
          next[static_cast<std::size_t>(b)] =
              hm::argmax(std::span(logits.data() + b * vocab, vocab));
      }
    }
    for (const int mbs : {2, 3, 4}) {
      INFO((lsh ? "lsh" : "dense") << ", " << mbs << " micro-batches");
      hm::DenseKvAttention kv(model.config(), kv_options(B, kMaxLen, hattn::DType::kBF16),
                              executor);
      hm::LlamaRunner prefill(model, kv, executor);
      std::vector<float> logits(vocab * static_cast<std::size_t>(B));
      for (std::int32_t b = 0; b < B; ++b)
        REQUIRE(prefill.prefill(b, prompts[static_cast<std::size_t>(b)], 4, logits.data()).is_ok());
      hm::OrchestratedRunnerOptions o =
          lsh ? lsh_options(mbs, {0}) : hm::OrchestratedRunnerOptions{};
      o.num_micro_batches = mbs;
      std::unique_ptr<hm::OrchestratedRunner> run;
      REQUIRE(hm::OrchestratedRunner::create(model, kv, o, executor, executor, &run).is_ok());
      for (int s = 0; s < kSteps; ++s) {
        REQUIRE(run->decode_step(fed[static_cast<std::size_t>(s)], logits.data()).is_ok());
        const std::vector<double> got(logits.begin(), logits.end());
        const std::vector<double> ref(want[static_cast<std::size_t>(s)].begin(),
                                      want[static_cast<std::size_t>(s)].end());
        const std::string err =
            hattn_test::compare("logits", got, ref, kLogitTolerance,
                                "orchestrated vs sequential, step " + std::to_string(s),
                                [&](std::size_t i) { return "seq " + std::to_string(i / vocab); });
        CHECK(err.empty());
        if (!err.empty()) FAIL_CHECK(err);
      }
    }
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
  // The refused steps appended nothing; a good step still runs.
  CHECK(kv.seq_len(0, 0) == 3);
  REQUIRE(run->decode_step(two, logits.data()).is_ok());
  CHECK(kv.seq_len(0, 0) == 4);
  CHECK(kv.seq_len(1, 1) == 5);
  for (float x : logits) REQUIRE(std::isfinite(x));

  // A step that would take a sequence past max_seq_len is refused up front.
  hm::DenseKvAttention small(model.config(), kv_options(2, 4), executor);
  hm::LlamaRunner fill(model, small, executor);
  REQUIRE(fill.prefill(0, prompt, 8, logits.data()).is_ok());
  REQUIRE(fill.prefill(1, prompt, 8, logits.data()).is_ok());
  std::unique_ptr<hm::OrchestratedRunner> tight;
  REQUIRE(hm::OrchestratedRunner::create(model, small, {}, executor, executor, &tight).is_ok());
  REQUIRE(tight->decode_step(two, logits.data()).is_ok());  // 4 tokens: full
  CHECK(tight->decode_step(two, logits.data()).code() == hattn::StatusCode::kOutOfMemory);
  CHECK(small.seq_len(1, 0) == 4);
  CHECK(small.seq_len(1, 1) == 4);
}
