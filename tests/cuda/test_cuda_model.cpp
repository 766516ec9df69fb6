// hattn::model on CUDA: CudaLlamaModel's stages against LlamaModel's on the
// same inputs, and CudaDenseDecoder (prefill + decode, all on the GPU)
// against the Hugging Face fixtures of tests/fixtures/llama.
//
// Tolerances.
//  - f32 device weights: the GPU computes what the CPU model computes, in
//    f32, up to summation order (cuBLAS blocking, tree reductions in RMSNorm,
//    FMA contraction in RoPE): the CPU fixture tests' reasoning holds and
//    their tolerance is used, atol 1e-4 + rtol 1e-4, NMSE 1e-9, for stages,
//    logits and the fixture decode, with identical greedy tokens.
//  - bf16 device weights: every GEMM input (activation, and weight unless
//    the file is bf16) is rounded to bf16 (8 significant bits, unit
//    roundoff u = 2^-8 = 3.9e-3; a rounding error is uniform-ish, rms about
//    u / 2.3 ~ 1.7e-3 relative). A GEMM output y = sum w_i x_i then carries
//    independent relative errors of rms ~ 2.4e-3 per term (two operands),
//    i.e. ~2.4e-3 of rms(y) (random weights: rms(y) ~ sqrt(K) rms(w x)). The
//    fixtures chain at most 8 GEMMs (2 layers of qkv, o, gate/up, down, then
//    lm_head) whose errors add at most in quadrature through the residual
//    stream: ~7e-3 of rms, and the largest of a few hundred elements ~3.5
//    sigma ~ 2.4e-2 of rms. Bound: |diff| <= 0.08 rms(ref) per element (3x),
//    NMSE <= 5e-4 (10x the ~5e-5 expected). Real bugs in this path (a wrong
//    cuBLAS type or transpose, a bad cast kernel) give NMSE ~1. Greedy tokens
//    must match where the oracle's margin between its two best logits
//    exceeds twice the bound; the others are reported.
//  - Rounding k, v (or the embedding table) to bf16 once: rtol u = 2^-8 and
//    NMSE 5e-5 (the tolerance table's bf16 output row) on top.

#include <cuda_runtime_api.h>
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include <memory>
#include "common/catch_print.hpp"
#include "common/check.hpp"
#include "common/llama_fixture.hpp"
#include "common/seed.hpp"
#include "hattn/cpu/executor.hpp"
#include "hattn/cuda/buffer.hpp"
#include "hattn/model/attention.hpp"
#include "hattn/model/cuda_decoder.hpp"
#include "hattn/model/cuda_llama.hpp"
#include "hattn/model/cuda_orchestrated_runner.hpp"
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
using hattn::DType;
using hattn::StatusCode;
using hattn::cuda::DeviceBuffer;
using hattn_test::Tolerance;

constexpr Tolerance kF32Tolerance = hattn_test::kLlamaLogitTolerance;
constexpr double kBf16RmsFraction = 0.08;
constexpr double kBf16Nmse = 5e-4;
constexpr double kBf16RoundRtol = 1.0 / 256.0;
constexpr double kBf16RoundNmse = 5e-5;

double rms(const std::vector<double>& v) {
  double s = 0.0;
  for (double x : v) s += x * x;
  return v.empty() ? 0.0 : std::sqrt(s / static_cast<double>(v.size()));
}

// The tolerance of a result of the given weight dtype against `ref`.
Tolerance tolerance_for(DType weights, const std::vector<double>& ref) {
  if (weights == DType::kF32) return kF32Tolerance;
  return {kBf16RmsFraction * rms(ref), 0.0, kBf16Nmse};
}

template <class T>
std::vector<double> to_double(const std::vector<T>& v) {
  return {v.begin(), v.end()};
}

void check_close(const char* what, const std::vector<double>& got, const std::vector<double>& ref,
                 const Tolerance& tol, const std::string& context) {
  REQUIRE(got.size() == ref.size());
  for (double x : got) REQUIRE(std::isfinite(x));
  const std::string err = hattn_test::compare(what, got, ref, tol, context);
  CHECK(err.empty());
  if (!err.empty()) FAIL_CHECK(err);
}

template <class T>
void to_device(DeviceBuffer& d, const std::vector<T>& h) {
  REQUIRE(d.allocate(h.size() * sizeof(T)).is_ok());
  REQUIRE(cudaMemcpy(d.data(), h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice) ==
          cudaSuccess);
}

// Reads n elements of `dtype` from the device, widened to double.
std::vector<double> from_device(const DeviceBuffer& d, DType dtype, std::size_t n) {
  std::vector<unsigned char> raw(n * hattn::size_of(dtype));
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  REQUIRE(cudaMemcpy(raw.data(), d.data(), raw.size(), cudaMemcpyDeviceToHost) == cudaSuccess);
  std::vector<double> out(n);
  for (std::size_t i = 0; i < n; ++i)
    out[i] = hattn::load_as_float(raw.data(), dtype, static_cast<std::ptrdiff_t>(i));
  return out;
}

hm::LlamaModel load_host(const std::string& name) {
  hm::LlamaModel model;
  std::string detail;
  const hattn::Status s = hm::LlamaModel::load(fs::path(HATTN_FIXTURE_DIR) / name, &model, &detail);
  INFO("fixture " << name << ": " << detail);
  REQUIRE(s.is_ok());
  return model;
}

// Every stage of layer `layer` (and embed, logits) on the device against the
// CPU model, each fed the CPU's input, at positions starting at `pos0`.
void check_stages(const std::string& name, DType weights, std::int64_t pos0) {
  INFO("fixture " << name << ", weights " << hattn::to_string(weights) << ", positions from "
                  << pos0);
  const hm::LlamaModel host = load_host(name);
  const hm::LlamaConfig& c = host.config();
  hm::CudaLlamaModel dev;
  REQUIRE(hm::CudaLlamaModel::create(host, 0, &dev, {.weight_dtype = weights}).is_ok());
  CHECK(dev.device_bytes() > 0);
  const Expected e = read_llama_expected(fs::path(HATTN_FIXTURE_DIR) / name);
  const std::vector<std::int32_t>& tokens = e.prompt;
  const auto T = static_cast<std::int64_t>(tokens.size());
  const auto uT = static_cast<std::size_t>(T);
  std::vector<std::int64_t> positions(uT);
  for (std::size_t i = 0; i < uT; ++i) positions[i] = pos0 + static_cast<std::int64_t>(i);

  const hattn::CpuExecutor executor(2);
  hm::StageScratch cpu_scratch;
  hm::CudaStageScratch scratch;
  REQUIRE(scratch.reserve(dev, T + 4).is_ok());
  const auto h = static_cast<std::size_t>(c.hidden_size);
  const auto qd = static_cast<std::size_t>(c.q_dim());
  const auto kvd = static_cast<std::size_t>(c.kv_dim());
  const auto vocab = static_cast<std::size_t>(c.vocab_size);

  // embed
  std::vector<float> x0(uT * h);
  REQUIRE(host.embed(tokens, x0.data()).is_ok());
  DeviceBuffer d_tokens, d_pos, d_x, d_q, d_k, d_v, d_attn, d_logits;
  to_device(d_tokens, tokens);
  to_device(d_pos, positions);
  REQUIRE(d_x.allocate(uT * h * 4).is_ok());
  REQUIRE(dev.embed(d_tokens.as<std::int32_t>(), T, d_x.as<float>(), nullptr).is_ok());
  // Widening is exact for f32 weights; bf16 ones round the table once.
  const Tolerance emb_tol = weights == DType::kF32 ? Tolerance{0.0, 0.0, 0.0}
                                                   : Tolerance{0.0, kBf16RoundRtol, kBf16RoundNmse};
  check_close("embed", from_device(d_x, DType::kF32, uT * h), to_double(x0), emb_tol, name);
  REQUIRE(dev.device_errors(nullptr).is_ok());

  // stage_a of both layers, k/v in f32 and in bf16
  for (int layer = 0; layer < c.num_layers; ++layer) {
    INFO("layer " << layer);
    std::vector<float> q(uT * qd), k(uT * kvd), v(uT * kvd);
    host.stage_a(layer, x0.data(), T, positions.data(), q.data(), k.data(), v.data(), cpu_scratch,
                 executor);
    to_device(d_x, x0);
    REQUIRE(d_q.allocate(uT * qd * 4).is_ok());
    for (const DType kv : {DType::kF32, DType::kBF16}) {
      INFO("kv " << hattn::to_string(kv));
      REQUIRE(d_k.allocate(uT * kvd * hattn::size_of(kv)).is_ok());
      REQUIRE(d_v.allocate(uT * kvd * hattn::size_of(kv)).is_ok());
      REQUIRE(dev.stage_a(layer, d_x.as<float>(), T, d_pos.as<std::int64_t>(), d_q.as<float>(),
                          d_k.data(), d_v.data(), kv, scratch, nullptr)
                  .is_ok());
      const std::vector<double> rq = to_double(q), rk = to_double(k), rv = to_double(v);
      Tolerance tk = tolerance_for(weights, rk), tv = tolerance_for(weights, rv);
      if (kv == DType::kBF16) {
        tk.rtol += kBf16RoundRtol;
        tv.rtol += kBf16RoundRtol;
        tk.nmse += kBf16RoundNmse;
        tv.nmse += kBf16RoundNmse;
      }
      check_close("q", from_device(d_q, DType::kF32, uT * qd), rq, tolerance_for(weights, rq),
                  name);
      check_close("k", from_device(d_k, kv, uT * kvd), rk, tk, name);
      check_close("v", from_device(d_v, kv, uT * kvd), rv, tv, name);
    }
  }

  // stage_b of the last layer on a random attention output
  std::mt19937_64 rng = hattn_test::make_rng("cuda-model-stage-b-" + name);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> attn(uT * qd);
  for (float& a : attn) a = normal(rng);
  std::vector<float> x1 = x0;
  host.stage_b(c.num_layers - 1, attn.data(), T, x1.data(), cpu_scratch, executor);
  to_device(d_x, x0);
  to_device(d_attn, attn);
  REQUIRE(dev.stage_b(c.num_layers - 1, d_attn.as<float>(), T, d_x.as<float>(), scratch, nullptr)
              .is_ok());
  const std::vector<double> rx1 = to_double(x1);
  check_close("stage_b x", from_device(d_x, DType::kF32, uT * h), rx1, tolerance_for(weights, rx1),
              name);

  // logits
  std::vector<float> logits(uT * vocab);
  host.logits(x1.data(), T, logits.data(), cpu_scratch, executor);
  to_device(d_x, x1);
  REQUIRE(d_logits.allocate(uT * vocab * 4).is_ok());
  REQUIRE(dev.logits(d_x.as<float>(), T, d_logits.as<float>(), scratch, nullptr).is_ok());
  const std::vector<double> rl = to_double(logits);
  check_close("logits", from_device(d_logits, DType::kF32, uT * vocab), rl,
              tolerance_for(weights, rl), name);

  // More tokens than reserved, a bad layer: errors, not launches.
  CHECK(dev.stage_b(0, d_attn.as<float>(), T + 5, d_x.as<float>(), scratch, nullptr).code() ==
        StatusCode::kInvalidArgument);
  CHECK(dev.stage_a(c.num_layers, d_x.as<float>(), T, d_pos.as<std::int64_t>(), d_q.as<float>(),
                    d_k.data(), d_v.data(), DType::kF32, scratch, nullptr)
            .code() == StatusCode::kInvalidArgument);
  // An id outside the vocabulary is caught on the device.
  const std::vector<std::int32_t> bad = {1, c.vocab_size};
  to_device(d_tokens, bad);
  REQUIRE(dev.embed(d_tokens.as<std::int32_t>(), 2, d_x.as<float>(), nullptr).is_ok());
  CHECK(dev.device_errors(nullptr).code() == StatusCode::kInvalidArgument);
  CHECK(dev.device_errors(nullptr).is_ok());  // cleared
}

struct DecoderCase {
  DType weights = DType::kF32;
  DType kv = DType::kF32;
  std::int64_t chunk = 64;
  std::int32_t page_size = 16;
};

// Prefill + decode with the oracle's tokens fed back; every step's logits
// against the oracle's, and the greedy tokens.
void run_decoder_fixture(const std::string& name, const DecoderCase& dc) {
  INFO("fixture " << name << ", weights " << hattn::to_string(dc.weights) << ", kv "
                  << hattn::to_string(dc.kv) << ", chunk " << dc.chunk << ", page "
                  << dc.page_size);
  const hm::LlamaModel host = load_host(name);
  const Expected e = read_llama_expected(fs::path(HATTN_FIXTURE_DIR) / name);
  hm::CudaLlamaModel dev;
  REQUIRE(hm::CudaLlamaModel::create(host, 0, &dev, {.weight_dtype = dc.weights}).is_ok());
  hm::CudaDenseDecoder decoder;
  const auto max_len = static_cast<std::int64_t>(e.prompt.size() + e.generated.size());
  REQUIRE(hm::CudaDenseDecoder::create(dev,
                                       {.num_sequences = 1,
                                        .max_seq_len = max_len,
                                        .max_prefill_tokens = 64,
                                        .kv_dtype = dc.kv,
                                        .page_size = dc.page_size,
                                        .timing = true},
                                       &decoder)
              .is_ok());
  const auto vocab = static_cast<std::size_t>(host.config().vocab_size);
  std::vector<float> logits(vocab);
  REQUIRE(decoder.prefill(0, e.prompt, dc.chunk, logits.data()).is_ok());
  CHECK(decoder.seq_len(0) == static_cast<std::int64_t>(e.prompt.size()));
  int decided = 0, agreed_undecided = 0, undecided = 0;
  for (std::size_t step = 0; step < e.generated.size(); ++step) {
    const std::vector<double>& ref = e.logits[step];
    const Tolerance tol = tolerance_for(dc.weights, ref);
    check_close("logits", to_double(logits), ref, tol, name + " step " + std::to_string(step));
    const std::int32_t tok = hm::argmax(logits);
    // The oracle's margin between its best two logits.
    std::vector<double> sorted = ref;
    std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<>());
    const double margin = sorted[0] - sorted[1];
    const double bound = tol.atol + tol.rtol * std::abs(sorted[0]);
    if (margin > 2.0 * bound) {
      ++decided;
      CHECK(tok == e.generated[step]);
    } else {
      ++undecided;
      agreed_undecided += tok == e.generated[step] ? 1 : 0;
    }
    if (step + 1 < e.generated.size()) {
      const std::int32_t feed[] = {e.generated[step]};
      REQUIRE(decoder.decode_step(feed, logits.data()).is_ok());
    }
  }
  if (dc.weights == DType::kF32) CHECK(undecided == 0);
  if (undecided > 0)
    std::printf(
        "cuda decoder on %s (%s weights): %d steps decided, %d within the tolerance of "
        "a tie (%d of them agree with the oracle)\n",
        name.c_str(), std::string(hattn::to_string(dc.weights)).c_str(), decided, undecided,
        agreed_undecided);
  CHECK(decoder.seq_len(0) == max_len - 1);
  const std::size_t page_bytes = static_cast<std::size_t>(dc.page_size) *
                                 static_cast<std::size_t>(host.config().kv_dim()) *
                                 hattn::size_of(dc.kv);
  const auto pages = static_cast<std::size_t>((max_len - 1 + dc.page_size - 1) / dc.page_size);
  CHECK(decoder.kv_bytes() ==
        2 * pages * page_bytes * static_cast<std::size_t>(host.config().num_layers));
}

}  // namespace

TEST_CASE("cuda model: stages match the CPU model (f32 weights)", "[cuda][model]") {
  for (const char* name : kFixtures) {
    check_stages(name, DType::kF32, 0);
    check_stages(name, DType::kF32, 4090);  // long-context angles
  }
}

TEST_CASE("cuda model: stages match the CPU model (bf16 weights)", "[cuda][model]") {
  for (const char* name : kFixtures) {
    check_stages(name, DType::kBF16, 0);
    check_stages(name, DType::kBF16, 4090);
  }
}

TEST_CASE("cuda decoder: fixtures match transformers (f32 weights, f32 KV)",
          "[cuda][model][fixture]") {
  for (const char* name : kFixtures) {
    // Whole prompt in one chunk; chunks of 5 over pages of 4 (20 tokens: 5
    // pages, the causal cuts inside and across pages); chunks of 7, pages of 3.
    run_decoder_fixture(name, {.weights = DType::kF32, .kv = DType::kF32, .chunk = 64});
    run_decoder_fixture(name,
                        {.weights = DType::kF32, .kv = DType::kF32, .chunk = 5, .page_size = 4});
    run_decoder_fixture(name,
                        {.weights = DType::kF32, .kv = DType::kF32, .chunk = 7, .page_size = 3});
  }
}

TEST_CASE("cuda decoder: fixtures match transformers (bf16 weights, bf16 KV)",
          "[cuda][model][fixture]") {
  for (const char* name : kFixtures) {
    run_decoder_fixture(name, {.weights = DType::kBF16, .kv = DType::kBF16, .chunk = 64});
    run_decoder_fixture(name,
                        {.weights = DType::kBF16, .kv = DType::kBF16, .chunk = 5, .page_size = 4});
  }
}

TEST_CASE("cuda decoder: batched decode equals one-sequence decode", "[cuda][model]") {
  const std::string name = "gqa_llama3_tied_bf16";
  const hm::LlamaModel host = load_host(name);
  const Expected e = read_llama_expected(fs::path(HATTN_FIXTURE_DIR) / name);
  hm::CudaLlamaModel dev;
  REQUIRE(hm::CudaLlamaModel::create(host, 0, &dev, {.weight_dtype = DType::kF32}).is_ok());
  hm::CudaDenseDecoder decoder;
  REQUIRE(hm::CudaDenseDecoder::create(dev,
                                       {.num_sequences = 2,
                                        .max_seq_len = 40,
                                        .max_prefill_tokens = 8,
                                        .kv_dtype = DType::kF32,
                                        .page_size = 4},
                                       &decoder)
              .is_ok());
  const auto vocab = static_cast<std::size_t>(host.config().vocab_size);
  const std::vector<std::int32_t> other = {5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19};
  std::vector<float> logits(2 * vocab), last(vocab);
  // Sequence 0 first: a stray write of sequence 1's prefill into its pages
  // would then not be overwritten.
  REQUIRE(decoder.prefill(0, e.prompt, 64, last.data()).is_ok());  // cut to chunks of 8
  check_close("prefill logits", to_double(last), e.logits[0], kF32Tolerance, "batched");
  REQUIRE(decoder.prefill(1, other, 4, last.data()).is_ok());
  const std::int32_t feed[] = {e.generated[0], 3};
  REQUIRE(decoder.decode_step(feed, logits.data()).is_ok());
  const std::vector<float> first(logits.begin(),
                                 logits.begin() + static_cast<std::ptrdiff_t>(vocab));
  check_close("logits", to_double(first), e.logits[1], kF32Tolerance, "batched");
  // Sequence 1 against the same sequence decoded alone.
  hm::CudaDenseDecoder alone;
  REQUIRE(hm::CudaDenseDecoder::create(dev,
                                       {.num_sequences = 1,
                                        .max_seq_len = 40,
                                        .max_prefill_tokens = 8,
                                        .kv_dtype = DType::kF32,
                                        .page_size = 4},
                                       &alone)
              .is_ok());
  std::vector<float> solo(vocab);
  REQUIRE(alone.prefill(0, other, 4, last.data()).is_ok());
  const std::int32_t feed1[] = {3};
  REQUIRE(alone.decode_step(feed1, solo.data()).is_ok());
  const std::vector<float> second(logits.begin() + static_cast<std::ptrdiff_t>(vocab),
                                  logits.end());
  check_close("logits of sequence 1", to_double(second), to_double(solo), kF32Tolerance, "batched");
  CHECK(decoder.seq_len(0) == static_cast<std::int64_t>(e.prompt.size()) + 1);
  CHECK(decoder.seq_len(1) == static_cast<std::int64_t>(other.size()) + 1);
}

TEST_CASE("cuda decoder: synthetic prefill, errors", "[cuda][model]") {
  const hm::LlamaModel host = load_host("gqa8_sharded_f16");
  hm::CudaLlamaModel dev;
  REQUIRE(hm::CudaLlamaModel::create(host, 0, &dev).is_ok());
  CHECK(dev.weight_dtype() == DType::kBF16);
  hm::CudaDenseDecoder decoder;
  REQUIRE(hm::CudaDenseDecoder::create(dev, {.num_sequences = 3, .max_seq_len = 1100}, &decoder)
              .is_ok());
  const auto vocab = static_cast<std::size_t>(host.config().vocab_size);
  std::vector<float> logits(3 * vocab);
  REQUIRE(decoder.synthetic_prefill(1000, 7).is_ok());
  for (int b = 0; b < 3; ++b) CHECK(decoder.seq_len(b) == 1000);
  const std::int32_t feed[] = {1, 2, 3};
  REQUIRE(decoder.decode_step(feed, logits.data()).is_ok());
  for (float x : logits) REQUIRE(std::isfinite(x));
  CHECK(decoder.seq_len(2) == 1001);
  // 1001 tokens of page 16: 63 pages, K and V, 2 layers, 3 sequences.
  const std::size_t page_bytes = 16 * static_cast<std::size_t>(host.config().kv_dim()) * 2;
  CHECK(decoder.kv_bytes() == 3 * 2 * 2 * 63 * page_bytes);
  CHECK(decoder.times().total_s() > 0.0);

  const std::int32_t bad_token[] = {1, host.config().vocab_size, 3};
  CHECK(decoder.decode_step(bad_token, logits.data()).code() == StatusCode::kInvalidArgument);
  const std::int32_t two[] = {1, 2};
  CHECK(decoder.decode_step(two, logits.data()).code() == StatusCode::kInvalidArgument);
  const std::vector<std::int32_t> long_prompt(200, 1);
  CHECK(decoder.prefill(0, long_prompt, 64, nullptr).code() == StatusCode::kOutOfMemory);
  CHECK(decoder.prefill(3, long_prompt, 64, nullptr).code() == StatusCode::kInvalidArgument);
  CHECK(decoder.synthetic_prefill(100, 1).code() == StatusCode::kOutOfMemory);
  CHECK(decoder.seq_len(0) == 1001);  // failed calls change nothing
  // Still usable after the errors.
  REQUIRE(decoder.decode_step(feed, logits.data()).is_ok());
  for (float x : logits) REQUIRE(std::isfinite(x));

  hm::CudaDenseDecoder bad;
  CHECK(hm::CudaDenseDecoder::create(dev, {.num_sequences = 0, .max_seq_len = 10}, &bad).code() ==
        StatusCode::kInvalidArgument);
  CHECK(hm::CudaLlamaModel::create(host, 0, &dev, {.weight_dtype = DType::kF16}).code() ==
        StatusCode::kInvalidArgument);
}

TEST_CASE("cuda orchestrated decode: GPU stages, CPU attention, fixtures match transformers",
          "[cuda][model][orchestrated]") {
  // Prefill on the host (LlamaRunner over DenseKvAttention, f32 KV), then
  // decode through create_cuda_orchestrated_runner: CudaLlamaModel stages
  // with f32 weights on CUDA streams, q/k/v through pinned ring slots to the
  // CPU attention thread, the partial back by a stream memory wait. Three
  // sequences of different lengths (the fixture's prompt, and two shorter
  // prefixes of it) in 1, 2 and 3 micro-batches, dense and LSH with sampling
  // forced to every key. Sequence 0 must give the oracle's logits and tokens;
  // every sequence must give what the host runner gives for it on an
  // identical cache (so a row or position mix-up between sequences fails).
  // Again with bf16 weights and a bf16 KV cache (2-byte k/v rows through the
  // ring): against the host runner with the bf16 tolerance of the stage tests.
  for (const DType dt : {DType::kF32, DType::kBF16})
    for (const char* name : kFixtures) {
      const fs::path dir = fs::path(HATTN_FIXTURE_DIR) / name;
      const Expected e = read_llama_expected(dir);
      const hm::LlamaModel host = load_host(name);
      hm::CudaLlamaModel dev;
      REQUIRE(hm::CudaLlamaModel::create(host, 0, &dev, {.weight_dtype = dt}).is_ok());
      const auto vocab = static_cast<std::size_t>(host.config().vocab_size);
      constexpr int kBatch = 3;
      std::vector<std::vector<std::int32_t>> prompts;
      for (int b = 0; b < kBatch; ++b)
        prompts.emplace_back(e.prompt.begin(), e.prompt.end() - 3 * b);
      const hattn::CpuExecutor executor(2);
      const auto make_cache = [&] {
        auto kv = std::make_unique<hm::DenseKvAttention>(
            host.config(),
            hm::DenseKvAttentionOptions{
                .kv_dtype = dt,
                .page_size = 16,
                .num_sequences = kBatch,
                .max_seq_len = static_cast<std::int64_t>(e.prompt.size() + e.generated.size()),
                .max_prefill_tokens = 64,
                .precision = hattn::cpu::DenseDecode::Precision::kF32},
            executor);
        hm::LlamaRunner prefill(host, *kv, executor);
        std::vector<float> last(vocab);
        for (int b = 0; b < kBatch; ++b)
          REQUIRE(
              prefill.prefill(b, prompts[static_cast<std::size_t>(b)], 64, last.data()).is_ok());
        return kv;
      };
      // The host runner's logits for the same feeds.
      std::vector<std::vector<float>> want;
      {
        auto kv = make_cache();
        hm::LlamaRunner runner(host, *kv, executor);
        std::vector<float> logits(kBatch * vocab);
        for (std::size_t step = 1; step < e.generated.size(); ++step) {
          const std::vector<std::int32_t> feed(kBatch, e.generated[step - 1]);
          REQUIRE(runner.decode_step(feed, logits.data()).is_ok());
          want.push_back(logits);
        }
      }
      for (const int mbs : {1, 2, 3})
        for (const bool lsh : {false, true}) {
          INFO(name << ", " << mbs << " micro-batches, " << (lsh ? "lsh" : "dense") << ", "
                    << hattn::to_string(dt) << " weights and KV");
          auto kv = make_cache();
          hm::OrchestratedRunnerOptions o;
          o.num_micro_batches = mbs;
          if (lsh) {
            o.attention = hm::CpuAttentionKind::kLsh;
            o.lsh.sink = 1;
            o.lsh.window = 2;
            o.lsh.max_exact_tail = 4;
            o.lsh.sample_all = true;
          }
          std::unique_ptr<hm::OrchestratedRunner> run;
          std::string detail;
          const hattn::Status s =
              hm::create_cuda_orchestrated_runner(dev, *kv, o, executor, &run, &detail);
          INFO(detail);
          REQUIRE(s.is_ok());
          std::vector<float> logits(kBatch * vocab);
          for (std::size_t step = 1; step < e.generated.size(); ++step) {
            const std::vector<std::int32_t> feed(kBatch, e.generated[step - 1]);
            REQUIRE(run->decode_step(feed, logits.data()).is_ok());
            const std::string ctx = std::string(name) + " step " + std::to_string(step);
            const std::vector<double> ref = to_double(want[step - 1]);
            check_close("logits vs host runner", to_double(logits), ref, tolerance_for(dt, ref),
                        ctx);
            if (dt != DType::kF32) continue;  // bf16: the oracle's margins are not kept
            const std::vector<float> first(logits.begin(),
                                           logits.begin() + static_cast<std::ptrdiff_t>(vocab));
            check_close("logits vs transformers", to_double(first), e.logits[step], kF32Tolerance,
                        ctx);
            CHECK(hm::argmax(first) == e.generated[step]);
          }
          CHECK(run->times().gemm_s > 0.0);
          CHECK(run->attention_busy_s() > 0.0);
          // A bad id is refused before anything runs.
          const std::vector<std::int32_t> bad(kBatch, host.config().vocab_size);
          const std::int64_t len = kv->seq_len(0, 0);
          CHECK(run->decode_step(bad, logits.data()).code() == StatusCode::kInvalidArgument);
          CHECK(kv->seq_len(0, 0) == len);
        }
    }
}
