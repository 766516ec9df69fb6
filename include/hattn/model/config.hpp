#pragma once
// LlamaConfig: the shape of a Llama-family decoder (Llama 2, 3, 3.1, 3.2), read
// from a Hugging Face config.json.

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

#include "hattn/core/status.hpp"

namespace hattn::model {

// Frequency scaling of RoPE. kLlama3 is Llama 3.1's piecewise scaling of the
// inverse frequencies (rope_scaling.rope_type == "llama3").
enum class RopeScaling : std::uint8_t { kNone, kLlama3 };

struct LlamaConfig {
  std::int32_t vocab_size = 0;
  std::int32_t hidden_size = 0;
  std::int32_t intermediate_size = 0;
  std::int32_t num_layers = 0;
  std::int32_t num_q_heads = 0;
  std::int32_t num_kv_heads = 0;  // GQA when < num_q_heads
  std::int32_t head_dim = 0;      // config "head_dim", else hidden_size / num_q_heads
  std::int64_t max_position_embeddings = 0;
  float rms_norm_eps = 1e-5f;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling = RopeScaling::kNone;
  // Llama 3.1 scaling parameters (used when rope_scaling == kLlama3).
  double rope_factor = 8.0;
  double rope_low_freq_factor = 1.0;
  double rope_high_freq_factor = 4.0;
  double rope_original_max_position = 8192.0;
  bool tie_word_embeddings = false;

  std::int64_t q_dim() const noexcept { return std::int64_t{num_q_heads} * head_dim; }
  std::int64_t kv_dim() const noexcept { return std::int64_t{num_kv_heads} * head_dim; }
  // Parameters in the model (embeddings counted once when tied).
  std::int64_t num_parameters() const noexcept;
};

// Checks a config for consistency (positive sizes, heads divide, even head dim).
// On failure `detail` (when given) says what is wrong.
Status validate(const LlamaConfig& config, std::string* detail = nullptr);

// Parses config.json text. Unknown keys are ignored; a model type other than
// "llama", a RoPE scaling other than none/"default"/"llama3", attention or MLP
// biases are kNotSupported; malformed JSON or missing sizes kInvalidArgument.
Status parse_llama_config(std::string_view json_text, LlamaConfig* config,
                          std::string* detail = nullptr);
// Reads and parses <dir>/config.json.
Status load_llama_config(const std::filesystem::path& dir, LlamaConfig* config,
                         std::string* detail = nullptr);
// The config.json text of a config (what load_llama_config reads back).
std::string to_config_json(const LlamaConfig& config);

}  // namespace hattn::model
