// hattn::model against Hugging Face transformers: the tiny Llama fixtures of
// tests/fixtures/llama (made by make_llama_fixtures.py) are run through
// LlamaModel + DenseKvAttention, and every step's logits must match the
// oracle's and the greedy tokens must be the same.
//
// Logit tolerance: both sides compute in f32 from the same stored weights;
// they differ only in summation order (Eigen/AVX blocking vs PyTorch's, the
// online softmax of DenseDecode vs eager softmax, RoPE angles in double vs
// f32). Each logit is a dot product of length 64 over activations that went
// through 2 layers of ~100-long dot products: a few hundred roundings of
// u = 6e-8 relative to values of order 1-10, i.e. ~1e-5 absolute at worst.
// atol 1e-4 + rtol 1e-4 is several times that and far below any real bug (a
// wrong RoPE pair, a skipped norm weight or a wrong GQA head moves logits by
// ~1e-1). Fixtures are made with a greedy margin >= 1e-2, so identical tokens
// are a fair requirement.

#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/check.hpp"
#include "hattn/cpu/executor.hpp"
#include "hattn/cpu/isa.hpp"
#include "hattn/model/attention.hpp"
#include "hattn/model/llama.hpp"
#include "hattn/model/runner.hpp"
#include "hattn/model/sampler.hpp"

namespace {

namespace fs = std::filesystem;
namespace hm = hattn::model;

constexpr hattn_test::Tolerance kLogitTolerance{1e-4, 1e-4, 1e-9};

struct Expected {
  std::vector<std::int32_t> prompt;
  std::vector<std::int32_t> generated;
  std::vector<std::vector<double>> logits;
};

Expected read_expected(const fs::path& dir) {
  std::ifstream in(dir / "expected.json");
  REQUIRE(in);
  const nlohmann::json j = nlohmann::json::parse(in);
  Expected e;
  e.prompt = j.at("prompt").get<std::vector<std::int32_t>>();
  e.generated = j.at("generated").get<std::vector<std::int32_t>>();
  e.logits = j.at("logits").get<std::vector<std::vector<double>>>();
  return e;
}

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// Makes the attention a fixture runs with (one sequence of up to max_len tokens).
// Another backend (LSH with sampling forced to every key) joins these tests by
// passing its own factory to run_fixture.
using AttentionFactory = std::function<std::unique_ptr<hm::KvAttention>(
    const hm::LlamaConfig&, std::int64_t max_len, const hattn::CpuExecutor&)>;

AttentionFactory dense_f32(hattn::CpuIsa isa) {
  return [isa](const hm::LlamaConfig& config, std::int64_t max_len,
               const hattn::CpuExecutor& executor) {
    return std::make_unique<hm::DenseKvAttention>(
        config,
        hm::DenseKvAttentionOptions{.kv_dtype = hattn::DType::kF32,
                                    .page_size = 16,
                                    .num_sequences = 1,
                                    .max_seq_len = max_len,
                                    .max_prefill_tokens = 64,
                                    .precision = hattn::cpu::DenseDecode::Precision::kF32},
        executor, isa);
  };
}

// Runs one fixture: prefill in chunks of `chunk`, then decode with the
// oracle's tokens fed back, checking each step's logits and greedy token.
void run_fixture(const std::string& name, std::int64_t chunk, hattn::CpuIsa isa, int threads,
                 const AttentionFactory& make_attention) {
  const fs::path dir = fs::path(HATTN_FIXTURE_DIR) / name;
  const Expected e = read_expected(dir);
  hm::LlamaModel model;
  std::string detail;
  INFO("fixture " << name << ", prefill chunk " << chunk << ", ISA " << hattn::to_string(isa)
                  << ", threads " << threads);
  REQUIRE(hm::LlamaModel::load(dir, &model, &detail).is_ok());
  const auto vocab = static_cast<std::size_t>(model.config().vocab_size);
  REQUIRE(e.logits.size() == e.generated.size());

  const hattn::CpuExecutor executor(threads);
  const std::unique_ptr<hm::KvAttention> attention = make_attention(
      model.config(), static_cast<std::int64_t>(e.prompt.size() + e.generated.size()), executor);
  hm::LlamaRunner runner(model, *attention, executor);
  std::vector<float> logits(vocab);
  REQUIRE(runner.prefill(0, e.prompt, chunk, logits.data()).is_ok());
  std::vector<std::int32_t> got;
  for (std::size_t step = 0; step < e.generated.size(); ++step) {
    const std::string err = hattn_test::compare(
        "logits", to_double(logits), e.logits[step], kLogitTolerance,
        name + " step " + std::to_string(step), [](std::size_t i) { return std::to_string(i); });
    CHECK(err.empty());
    if (!err.empty()) FAIL_CHECK(err);
    const std::int32_t tok = hm::argmax(logits);
    got.push_back(tok);
    if (step + 1 < e.generated.size()) {
      // Feed the oracle's token so one early mismatch does not hide the rest.
      const std::int32_t feed[] = {e.generated[step]};
      REQUIRE(runner.decode_step(feed, logits.data()).is_ok());
    }
  }
  CHECK(got == e.generated);
}

const char* const kFixtures[] = {"mha_f32", "gqa_llama3_tied_bf16", "gqa8_sharded_f16"};

}  // namespace

TEST_CASE("model: fixtures match transformers (cpu-dense, f32 KV)", "[model][fixture]") {
  for (const char* name : kFixtures) {
    // Whole prompt in one chunk, and in chunks of 5 (12 = 5 + 5 + 2) so that
    // chunked prefill's causal boundaries are exercised.
    run_fixture(name, 64, hattn::cpu_isa_default(), 0, dense_f32(hattn::cpu_isa_default()));
    run_fixture(name, 5, hattn::cpu_isa_default(), 1, dense_f32(hattn::cpu_isa_default()));
  }
}

TEST_CASE("model: fixtures match transformers on every CPU ISA", "[model][fixture]") {
  for (hattn::CpuIsa isa : {hattn::CpuIsa::kScalar, hattn::CpuIsa::kAvx2, hattn::CpuIsa::kAvx512}) {
    if (!hattn::cpu_isa_available(isa)) continue;
    for (const char* name : kFixtures) run_fixture(name, 7, isa, 2, dense_f32(isa));
  }
}

TEST_CASE("model: batched decode equals one-sequence decode", "[model]") {
  // Two sequences with different prompts decoded together give each the
  // logits it gets alone (attention is per sequence; GEMMs are row-wise).
  const fs::path dir = fs::path(HATTN_FIXTURE_DIR) / "gqa_llama3_tied_bf16";
  const Expected e = read_expected(dir);
  hm::LlamaModel model;
  REQUIRE(hm::LlamaModel::load(dir, &model).is_ok());
  const auto vocab = static_cast<std::size_t>(model.config().vocab_size);
  const hattn::CpuExecutor executor(2);
  const std::vector<std::int32_t> other = {5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19};
  const hm::DenseKvAttentionOptions opt{.kv_dtype = hattn::DType::kF32,
                                        .page_size = 16,
                                        .num_sequences = 2,
                                        .max_seq_len = 40,
                                        .max_prefill_tokens = 64,
                                        .precision = hattn::cpu::DenseDecode::Precision::kF32};
  hm::DenseKvAttention both(model.config(), opt, executor);
  hm::LlamaRunner runner(model, both, executor);
  std::vector<float> logits(2 * vocab), last(vocab);
  REQUIRE(runner.prefill(0, e.prompt, 64, last.data()).is_ok());
  REQUIRE(runner.prefill(1, other, 4, last.data()).is_ok());
  const std::int32_t feed[] = {e.generated[0], 3};
  REQUIRE(runner.decode_step(feed, logits.data()).is_ok());
  // Sequence 0 must reproduce the oracle's second step.
  const std::vector<float> first(logits.begin(),
                                 logits.begin() + static_cast<std::ptrdiff_t>(vocab));
  const std::string err =
      hattn_test::compare("logits", to_double(first), e.logits[1], kLogitTolerance, "batched");
  CHECK(err.empty());
  if (!err.empty()) FAIL_CHECK(err);
}
