#include "hattn/model/synthetic.hpp"

#include <cmath>
#include <fstream>

#include "hattn/core/dtype.hpp"
#include "hattn/detail/splitmix.hpp"
#include "hattn/model/safetensors.hpp"

namespace hattn::model {
namespace {

using hattn::detail::splitmix64;

LlamaConfig llama3_rope(LlamaConfig c) {
  c.rope_theta = 500000.0;
  c.rope_scaling = RopeScaling::kLlama3;
  c.rope_factor = 32.0;
  c.rope_low_freq_factor = 1.0;
  c.rope_high_freq_factor = 4.0;
  c.rope_original_max_position = 8192.0;
  c.max_position_embeddings = 131072;
  c.rms_norm_eps = 1e-5f;
  return c;
}

}  // namespace

std::vector<std::string_view> synthetic_model_names() {
  return {"tiny", "llama3-1b-shape", "llama3-8b-shape-4layers"};
}

Status synthetic_config(std::string_view name, LlamaConfig* out) {
  LlamaConfig c;
  if (name == "tiny") {
    c.vocab_size = 512;
    c.hidden_size = 256;
    c.intermediate_size = 512;
    c.num_layers = 4;
    c.num_q_heads = 4;
    c.num_kv_heads = 2;
    c.head_dim = 64;
    c = llama3_rope(c);
  } else if (name == "llama3-1b-shape") {
    c.vocab_size = 128256;
    c.hidden_size = 2048;
    c.intermediate_size = 8192;
    c.num_layers = 16;
    c.num_q_heads = 32;
    c.num_kv_heads = 8;
    c.head_dim = 64;
    c = llama3_rope(c);
    c.tie_word_embeddings = true;
  } else if (name == "llama3-8b-shape-4layers") {
    c.vocab_size = 128256;
    c.hidden_size = 4096;
    c.intermediate_size = 14336;
    c.num_layers = 4;
    c.num_q_heads = 32;
    c.num_kv_heads = 8;
    c.head_dim = 128;
    c = llama3_rope(c);
    c.rope_factor = 8.0;
  } else {
    return {StatusCode::kInvalidArgument, "unknown synthetic model name"};
  }
  *out = c;
  return Status::ok();
}

Status write_synthetic_model(const LlamaConfig& c, std::uint64_t seed,
                             const std::filesystem::path& dir, const CpuExecutor& executor,
                             std::string* detail) {
  HATTN_RETURN_IF_ERROR(validate(c, detail));
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    if (detail) *detail = "cannot create " + dir.string() + ": " + ec.message();
    return {StatusCode::kInvalidArgument, "cannot create the model folder"};
  }
  std::vector<TensorToWrite> tensors;
  // Uniform in [-a, a) with a = 0.02 sqrt(3): std 0.02. Element i of tensor t
  // is a function of (seed, t, i) alone, so any thread count gives the same
  // bytes.
  const auto random = [&](std::string name, std::vector<std::int64_t> shape) {
    const std::uint64_t tensor_seed = splitmix64(seed ^ splitmix64(tensors.size() + 1));
    std::int64_t numel = 1;
    for (std::int64_t d : shape) numel *= d;
    tensors.push_back({std::move(name), DType::kBF16, std::move(shape), nullptr,
                       [tensor_seed, numel, &executor](void* dst) {
                         auto* out = static_cast<bf16*>(dst);
                         constexpr std::int64_t kBlock = 1 << 20;
                         const float a = 0.02f * std::sqrt(3.0f);
                         executor.parallel_for((numel + kBlock - 1) / kBlock, [&](std::int64_t b) {
                           const std::int64_t end = std::min(numel, (b + 1) * kBlock);
                           for (std::int64_t i = b * kBlock; i < end; ++i) {
                             const std::uint64_t r =
                                 splitmix64(tensor_seed + static_cast<std::uint64_t>(i));
                             const float u =
                                 static_cast<float>(r >> 40) * (2.0f / 16777216.0f) - 1.0f;
                             out[i] = to_bf16(a * u);
                           }
                         });
                       }});
  };
  const auto ones = [&](std::string name, std::int64_t n) {
    tensors.push_back({std::move(name), DType::kBF16, {n}, nullptr, [n](void* dst) {
                         auto* out = static_cast<bf16*>(dst);
                         for (std::int64_t i = 0; i < n; ++i) out[i] = to_bf16(1.0f);
                       }});
  };
  const std::int64_t h = c.hidden_size, f = c.intermediate_size;
  random("model.embed_tokens.weight", {c.vocab_size, h});
  for (std::int32_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    ones(p + "input_layernorm.weight", h);
    random(p + "self_attn.q_proj.weight", {c.q_dim(), h});
    random(p + "self_attn.k_proj.weight", {c.kv_dim(), h});
    random(p + "self_attn.v_proj.weight", {c.kv_dim(), h});
    random(p + "self_attn.o_proj.weight", {h, c.q_dim()});
    ones(p + "post_attention_layernorm.weight", h);
    random(p + "mlp.gate_proj.weight", {f, h});
    random(p + "mlp.up_proj.weight", {f, h});
    random(p + "mlp.down_proj.weight", {h, f});
  }
  ones("model.norm.weight", h);
  if (!c.tie_word_embeddings) random("lm_head.weight", {c.vocab_size, h});

  // Weights first, config last: a folder with a config.json is complete.
  std::filesystem::remove(dir / "config.json", ec);
  HATTN_RETURN_IF_ERROR(write_safetensors(dir / "model.safetensors", tensors, detail));
  std::ofstream cfg(dir / "config.json", std::ios::binary);
  cfg << to_config_json(c) << '\n';
  if (!cfg.flush()) {
    if (detail) *detail = "cannot write " + (dir / "config.json").string();
    return {StatusCode::kInvalidArgument, "cannot write config.json"};
  }
  return Status::ok();
}

}  // namespace hattn::model
