// hattn::model loading: config.json parsing, safetensors reading and writing,
// clear errors for broken model folders, sampling, synthetic models.

#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "common/check.hpp"
#include "common/seed.hpp"
#include "hattn/core/dtype.hpp"
#include "hattn/cpu/executor.hpp"
#include "hattn/model/attention.hpp"
#include "hattn/model/config.hpp"
#include "hattn/model/llama.hpp"
#include "hattn/model/runner.hpp"
#include "hattn/model/safetensors.hpp"
#include "hattn/model/sampler.hpp"
#include "hattn/model/synthetic.hpp"

namespace {

namespace fs = std::filesystem;
namespace hm = hattn::model;
using hattn::StatusCode;

// A fresh directory, removed with everything in it at scope exit.
class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    path_ = fs::temp_directory_path() /
            ("hattn_model_test_" + std::to_string(rd()) + "_" + std::to_string(rd()));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

fs::path fixture(const char* name) { return fs::path(HATTN_FIXTURE_DIR) / name; }

// A copy of a fixture folder to corrupt.
fs::path copy_fixture(const char* name, const TempDir& tmp) {
  const fs::path dst = tmp.path() / name;
  fs::copy(fixture(name), dst, fs::copy_options::recursive);
  return dst;
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

// Loads `dir` and expects failure with `code` and a detail containing `needle`.
void expect_load_error(const fs::path& dir, StatusCode code, const std::string& needle) {
  hm::LlamaModel model;
  std::string detail;
  const hattn::Status s = hm::LlamaModel::load(dir, &model, &detail);
  INFO("status: " << s.message() << "; detail: " << detail);
  REQUIRE_FALSE(s.is_ok());
  CHECK(s.code() == code);
  CHECK(detail.find(needle) != std::string::npos);
}

// The tensors of a fixture, to rewrite with one change.
std::vector<hm::TensorToWrite> tensors_of(const hm::SafetensorsFile& file) {
  std::vector<hm::TensorToWrite> out;
  for (const auto& [name, t] : file.tensors()) out.push_back({name, t.dtype, t.shape, t.data, {}});
  return out;
}

constexpr const char* kLlama2Config = R"({
  "architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
  "num_hidden_layers": 32, "rms_norm_eps": 1e-05, "vocab_size": 32000,
  "max_position_embeddings": 4096, "rope_scaling": null, "tie_word_embeddings": false
})";

constexpr const char* kLlama31Config = R"({
  "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
  "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
  "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "vocab_size": 128256,
  "max_position_embeddings": 131072,
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}
})";

}  // namespace

TEST_CASE("model config: Llama 2 and Llama 3.1 config.json", "[model][config]") {
  hm::LlamaConfig c;
  std::string detail;
  REQUIRE(hm::parse_llama_config(kLlama2Config, &c, &detail).is_ok());
  CHECK(c.num_kv_heads == 32);  // absent: MHA
  CHECK(c.head_dim == 128);     // absent: hidden / heads
  CHECK(c.rope_theta == 10000.0);
  CHECK(c.rope_scaling == hm::RopeScaling::kNone);
  CHECK(c.num_parameters() == 6738415616);  // Llama 2 7B's published count

  REQUIRE(hm::parse_llama_config(kLlama31Config, &c, &detail).is_ok());
  CHECK(c.num_kv_heads == 8);
  CHECK(c.rope_scaling == hm::RopeScaling::kLlama3);
  CHECK(c.rope_factor == 8.0);
  CHECK(c.rope_original_max_position == 8192.0);
  CHECK(c.num_parameters() == 8030261248);  // Llama 3.1 8B's published count

  // to_config_json reads back to the same config.
  hm::LlamaConfig back;
  REQUIRE(hm::parse_llama_config(hm::to_config_json(c), &back).is_ok());
  CHECK(hm::to_config_json(back) == hm::to_config_json(c));
}

TEST_CASE("model config: llama3 RoPE scaling of the inverse frequencies", "[model][config]") {
  hm::LlamaConfig c;
  REQUIRE(hm::parse_llama_config(kLlama31Config, &c).is_ok());
  const std::vector<double> inv = hm::rope_inv_freq(c);
  REQUIRE(inv.size() == 64);
  const double pi = 3.14159265358979323846;
  for (std::size_t i = 0; i < inv.size(); ++i) {
    const double base = std::pow(500000.0, -2.0 * static_cast<double>(i) / 128.0);
    const double wavelen = 2 * pi / base;
    if (wavelen < 8192.0 / 4.0)
      CHECK(inv[i] == Approx(base).epsilon(1e-12));  // high frequency: kept
    else if (wavelen > 8192.0)
      CHECK(inv[i] == Approx(base / 8));  // low: divided by factor
    else
      CHECK((inv[i] < base && inv[i] > base / 8));  // band: in between
  }
}

TEST_CASE("model config: errors", "[model][config][errors]") {
  hm::LlamaConfig c;
  std::string detail;
  hattn::Status s = hm::parse_llama_config("{ not json", &c, &detail);
  CHECK(s.code() == StatusCode::kInvalidArgument);
  CHECK(detail.find("not valid JSON") != std::string::npos);

  s = hm::parse_llama_config(R"({"model_type": "llama", "vocab_size": 10})", &c, &detail);
  CHECK(s.code() == StatusCode::kInvalidArgument);
  CHECK(detail.find("missing \"hidden_size\"") != std::string::npos);

  std::string text = kLlama31Config;
  text.replace(text.find("\"llama3\""), 8, "\"yarn\"");
  s = hm::parse_llama_config(text, &c, &detail);
  CHECK(s.code() == StatusCode::kNotSupported);
  CHECK(detail.find("yarn") != std::string::npos);

  text = kLlama2Config;
  text.replace(text.find("\"model_type\": \"llama\""), 21, "\"model_type\": \"gpt2\"");
  CHECK(hm::parse_llama_config(text, &c, &detail).code() == StatusCode::kNotSupported);

  text = kLlama31Config;  // 30 query heads cannot share 8 KV heads
  text.replace(text.find("\"num_attention_heads\": 32"), 25, "\"num_attention_heads\": 30");
  s = hm::parse_llama_config(text, &c, &detail);
  CHECK(s.code() == StatusCode::kInvalidArgument);
  CHECK(detail.find("multiple of num_key_value_heads") != std::string::npos);
}

TEST_CASE("safetensors: write and read back every dtype", "[model][safetensors]") {
  TempDir tmp;
  auto rng = hattn_test::make_rng("safetensors roundtrip");
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  std::vector<float> f32(3 * 5);
  std::vector<hattn::bf16> b16(7);
  std::vector<hattn::f16> h16(2 * 3 * 4);
  for (auto& x : f32) x = u(rng);
  for (auto& x : b16) x = hattn::to_bf16(u(rng));
  for (auto& x : h16) x = hattn::to_f16(u(rng));
  const std::vector<hm::TensorToWrite> tensors = {
      {"a.f32", hattn::DType::kF32, {3, 5}, f32.data(), {}},
      {"b.bf16", hattn::DType::kBF16, {7}, b16.data(), {}},
      {"c.f16", hattn::DType::kF16, {2, 3, 4}, h16.data(), {}},
  };
  const fs::path path = tmp.path() / "t.safetensors";
  REQUIRE(hm::write_safetensors(path, tensors).is_ok());
  hm::SafetensorsFile file;
  REQUIRE(hm::SafetensorsFile::open(path, &file).is_ok());
  REQUIRE(file.tensors().size() == 3);
  const auto& a = file.tensors().at("a.f32");
  CHECK(a.dtype == hattn::DType::kF32);
  CHECK(a.shape == std::vector<std::int64_t>{3, 5});
  CHECK(std::memcmp(a.data, f32.data(), f32.size() * 4) == 0);
  const auto& b = file.tensors().at("b.bf16");
  CHECK(b.dtype == hattn::DType::kBF16);
  CHECK(std::memcmp(b.data, b16.data(), b16.size() * 2) == 0);
  const auto& c = file.tensors().at("c.f16");
  CHECK(c.shape == std::vector<std::int64_t>{2, 3, 4});
  CHECK(std::memcmp(c.data, h16.data(), h16.size() * 2) == 0);
}

TEST_CASE("model loading: broken model folders give clear errors", "[model][errors]") {
  TempDir tmp;
  SECTION("missing config.json") {
    const fs::path dir = copy_fixture("mha_f32", tmp);
    fs::remove(dir / "config.json");
    expect_load_error(dir, StatusCode::kInvalidArgument, "config.json");
  }
  SECTION("missing weights file") {
    const fs::path dir = copy_fixture("mha_f32", tmp);
    fs::remove(dir / "model.safetensors");
    expect_load_error(dir, StatusCode::kInvalidArgument, "no model.safetensors");
  }
  SECTION("missing shard") {
    const fs::path dir = copy_fixture("gqa8_sharded_f16", tmp);
    fs::remove(dir / "model-00002-of-00004.safetensors");
    expect_load_error(dir, StatusCode::kInvalidArgument, "model-00002-of-00004.safetensors");
  }
  SECTION("truncated safetensors") {
    const fs::path dir = copy_fixture("mha_f32", tmp);
    const auto size = fs::file_size(dir / "model.safetensors");
    fs::resize_file(dir / "model.safetensors", size - 100);
    expect_load_error(dir, StatusCode::kInvalidArgument, "truncated");
  }
  SECTION("file shorter than its header") {
    const fs::path dir = copy_fixture("mha_f32", tmp);
    fs::resize_file(dir / "model.safetensors", 20);
    expect_load_error(dir, StatusCode::kInvalidArgument, "header length");
  }
  SECTION("bad header JSON") {
    const fs::path dir = copy_fixture("mha_f32", tmp);
    std::fstream f(dir / "model.safetensors", std::ios::binary | std::ios::in | std::ios::out);
    f.seekp(8);
    f.write("#garbage", 8);
    f.close();
    expect_load_error(dir, StatusCode::kInvalidArgument, "bad header");
  }
  SECTION("bad config JSON") {
    const fs::path dir = copy_fixture("mha_f32", tmp);
    write_text(dir / "config.json", "{\"model_type\": \"llama\", \"hidden_size\": ");
    expect_load_error(dir, StatusCode::kInvalidArgument, "not valid JSON");
  }
  SECTION("wrong shape, missing tensor, unsupported dtype") {
    hm::SafetensorsFile original;
    REQUIRE(hm::SafetensorsFile::open(fixture("mha_f32") / "model.safetensors", &original).is_ok());
    const fs::path dir = tmp.path() / "rewritten";
    fs::create_directories(dir);
    fs::copy_file(fixture("mha_f32") / "config.json", dir / "config.json");
    const std::string q = "model.layers.1.self_attn.q_proj.weight";

    std::vector<hm::TensorToWrite> t = tensors_of(original);
    for (auto& x : t)
      if (x.name == q) x.shape = {x.shape[1], x.shape[0]};  // transposed
    REQUIRE(hm::write_safetensors(dir / "model.safetensors", t).is_ok());
    expect_load_error(dir, StatusCode::kInvalidArgument, "\"" + q + "\" has shape [64, 128]");

    t = tensors_of(original);
    std::erase_if(t, [](const hm::TensorToWrite& x) { return x.name == "model.norm.weight"; });
    REQUIRE(hm::write_safetensors(dir / "model.safetensors", t).is_ok());
    expect_load_error(dir, StatusCode::kInvalidArgument, "missing tensor \"model.norm.weight\"");

    // A dtype hattn does not read (I8): write a valid file by hand.
    const std::string header =
        R"({"model.norm.weight":{"dtype":"I8","shape":[64],"data_offsets":[0,64]}})";
    std::string bytes(8, '\0');
    for (int i = 0; i < 8; ++i)
      bytes[static_cast<std::size_t>(i)] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
    bytes += header + std::string(64, '\1');
    write_text(dir / "model.safetensors", bytes);
    expect_load_error(dir, StatusCode::kNotSupported, "unsupported dtype I8");
  }
}

TEST_CASE("sampler: greedy, temperature and top-p", "[model][sampler]") {
  const std::vector<float> logits = {0.1f, 3.0f, -1.0f, 3.0f, 2.5f};
  hm::Sampler greedy;
  CHECK(greedy.sample(logits) == 1);  // lowest id among equal maxima
  // top-p so small that only the top token is kept: always it.
  hm::Sampler narrow({.temperature = 1.0f, .top_p = 1e-3f}, 7);
  for (int i = 0; i < 20; ++i) CHECK(narrow.sample(logits) == 1);
  // Same seed, same draws; high temperature reaches several tokens.
  hm::Sampler a({.temperature = 5.0f, .top_p = 1.0f}, 42),
      b({.temperature = 5.0f, .top_p = 1.0f}, 42);
  std::vector<int> seen(logits.size());
  for (int i = 0; i < 200; ++i) {
    const std::int32_t x = a.sample(logits);
    CHECK(x == b.sample(logits));
    ++seen[static_cast<std::size_t>(x)];
  }
  CHECK(std::count_if(seen.begin(), seen.end(), [](int n) { return n > 0; }) >= 4);
  // top-p 0.9 at temperature 1 excludes id 2 (p ~ 0.005).
  hm::Sampler p9({.temperature = 1.0f, .top_p = 0.9f}, 3);
  for (int i = 0; i < 200; ++i) CHECK(p9.sample(logits) != 2);
}

TEST_CASE("synthetic model: written, loaded and decoded, deterministically", "[model][synthetic]") {
  TempDir tmp;
  hm::LlamaConfig config;
  REQUIRE(hm::synthetic_config("tiny", &config).is_ok());
  CHECK(hm::synthetic_config("no-such-model", &config).code() == StatusCode::kInvalidArgument);
  REQUIRE(hm::synthetic_config("tiny", &config).is_ok());
  const hattn::CpuExecutor one(1), two(2);
  REQUIRE(hm::write_synthetic_model(config, 5, tmp.path() / "a", one).is_ok());
  REQUIRE(hm::write_synthetic_model(config, 5, tmp.path() / "b", two).is_ok());
  REQUIRE(hm::write_synthetic_model(config, 6, tmp.path() / "c", two).is_ok());
  const auto read = [](const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  CHECK(read(tmp.path() / "a" / "model.safetensors") ==
        read(tmp.path() / "b" / "model.safetensors"));
  CHECK(read(tmp.path() / "a" / "model.safetensors") !=
        read(tmp.path() / "c" / "model.safetensors"));

  hm::LlamaModel model;
  std::string detail;
  REQUIRE(hm::LlamaModel::load(tmp.path() / "a", &model, &detail).is_ok());
  CHECK(hm::to_config_json(model.config()) == hm::to_config_json(config));
  hm::DenseKvAttention attention(model.config(),
                                 {.kv_dtype = hattn::DType::kBF16,
                                  .page_size = 16,
                                  .num_sequences = 2,
                                  .max_seq_len = 64,
                                  .max_prefill_tokens = 16,
                                  .precision = hattn::cpu::DenseDecode::Precision::kF32},
                                 two);
  hm::LlamaRunner runner(model, attention, two);
  REQUIRE(runner.synthetic_prefill(40, 1).is_ok());
  CHECK(attention.seq_len(0, 1) == 40);
  CHECK(attention.seq_len(config.num_layers - 1, 0) == 40);
  std::vector<float> logits(2 * static_cast<std::size_t>(config.vocab_size));
  const std::int32_t tokens[] = {1, 2};
  REQUIRE(runner.decode_step(tokens, logits.data()).is_ok());
  CHECK(attention.seq_len(0, 0) == 41);
  for (float x : logits) REQUIRE(std::isfinite(x));
  // Past the KV capacity: a clear error, not a crash.
  REQUIRE(runner.synthetic_prefill(30, 1).code() == StatusCode::kOutOfMemory);
  // A token id outside the vocabulary.
  const std::int32_t bad[] = {1, config.vocab_size};
  CHECK(runner.decode_step(bad, logits.data()).code() == StatusCode::kInvalidArgument);
}

TEST_CASE("DenseKvAttention: causal prefill across pages equals a double reference",
          "[model][attention]") {
  // 50 tokens in pages of 16; the last 37 attend causally, in sub-batches of
  // 16 queries (max_prefill_tokens), so virtual sequences end inside and at
  // the end of pages 1..4. Reference: softmax(q.k / sqrt(D)) v in double.
  hm::LlamaConfig c;
  REQUIRE(hm::synthetic_config("tiny", &c).is_ok());  // 4 q / 2 kv heads of 64
  const hattn::CpuExecutor executor(2);
  hm::DenseKvAttention att(c,
                           {.kv_dtype = hattn::DType::kF32,
                            .page_size = 16,
                            .num_sequences = 2,
                            .max_seq_len = 64,
                            .max_prefill_tokens = 16,
                            .precision = hattn::cpu::DenseDecode::Precision::kF32},
                           executor);
  const std::int64_t len = 50, n = 37, kv = c.kv_dim(), qd = c.q_dim(), d = c.head_dim;
  auto rng = hattn_test::make_rng("dense kv attention prefill");
  std::normal_distribution<float> normal;
  std::vector<float> k(static_cast<std::size_t>(len * kv)), v(k.size()),
      q(static_cast<std::size_t>(n * qd)), o(q.size());
  for (auto* vec : {&k, &v, &q})
    for (float& x : *vec) x = normal(rng);
  // Sequence 1 gets the data (sequence 0 stays empty: ids must not mix).
  REQUIRE(att.append(0, 1, k.data(), v.data(), 20).is_ok());
  REQUIRE(att.append(0, 1, k.data() + 20 * kv, v.data() + 20 * kv, len - 20).is_ok());
  REQUIRE(att.prefill(0, 1, q.data(), n, o.data()).is_ok());

  std::vector<double> ref(q.size()), got(o.begin(), o.end());
  const std::int32_t group = c.num_q_heads / c.num_kv_heads;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t visible = len - n + i + 1;
    for (std::int32_t h = 0; h < c.num_q_heads; ++h) {
      const float* qi = q.data() + i * qd + h * d;
      const std::int64_t kh = h / group;
      std::vector<double> s(static_cast<std::size_t>(visible));
      double m = -1e300;
      for (std::int64_t t = 0; t < visible; ++t) {
        double dot = 0;
        for (std::int64_t e = 0; e < d; ++e)
          dot += double{qi[e]} * k[static_cast<std::size_t>(t * kv + kh * d + e)];
        s[static_cast<std::size_t>(t)] = dot / std::sqrt(static_cast<double>(d));
        m = std::max(m, s[static_cast<std::size_t>(t)]);
      }
      double l = 0;
      for (double& x : s) l += (x = std::exp(x - m));
      for (std::int64_t e = 0; e < d; ++e) {
        double acc = 0;
        for (std::int64_t t = 0; t < visible; ++t)
          acc += s[static_cast<std::size_t>(t)] * v[static_cast<std::size_t>(t * kv + kh * d + e)];
        ref[static_cast<std::size_t>(i * qd + h * d + e)] = acc / l;
      }
    }
  }
  const std::string err = hattn_test::compare("prefill o", got, ref, hattn_test::kF32OutTolerance,
                                              "DenseKvAttention::prefill");
  CHECK(err.empty());
  if (!err.empty()) FAIL_CHECK(err);
  CHECK(att.seq_len(0, 0) == 0);
  CHECK(att.kv_bytes() == 2 * 4 * 16 * static_cast<std::size_t>(kv) * 4);  // 4 pages of K and V
  // Errors, not crashes.
  CHECK(att.prefill(0, 1, q.data(), len + 1, o.data()).code() == StatusCode::kInvalidArgument);
  CHECK(att.append(c.num_layers, 0, k.data(), v.data(), 1).code() == StatusCode::kInvalidArgument);
  CHECK(att.append(0, 1, k.data(), v.data(), 15).code() == StatusCode::kOutOfMemory);
}
