#include "hattn/model/config.hpp"

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace hattn::model {
namespace {

using nlohmann::json;

void set_detail(std::string* detail, std::string text) {
  if (detail) *detail = std::move(text);
}

// Reads an integer key; `required` keys must be present.
bool get_int(const json& j, const char* key, bool required, std::int64_t* out,
             std::string* detail) {
  const auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) set_detail(detail, std::string("config.json: missing \"") + key + "\"");
    return !required;
  }
  if (!it->is_number_integer()) {
    set_detail(detail, std::string("config.json: \"") + key + "\" is not an integer");
    return false;
  }
  *out = it->get<std::int64_t>();
  return true;
}

bool get_number(const json& j, const char* key, double* out, std::string* detail) {
  const auto it = j.find(key);
  if (it == j.end() || it->is_null()) return true;
  if (!it->is_number()) {
    set_detail(detail, std::string("config.json: \"") + key + "\" is not a number");
    return false;
  }
  *out = it->get<double>();
  return true;
}

bool narrow(std::int64_t v, std::int32_t* out) {
  if (v < 0 || v > 0x7fffffff) return false;
  *out = static_cast<std::int32_t>(v);
  return true;
}

}  // namespace

std::int64_t LlamaConfig::num_parameters() const noexcept {
  const std::int64_t h = hidden_size;
  const std::int64_t per_layer =
      h * q_dim() * 2 + h * kv_dim() * 2 + 3 * h * std::int64_t{intermediate_size} + 2 * h;
  return std::int64_t{vocab_size} * h * (tie_word_embeddings ? 1 : 2) + per_layer * num_layers + h;
}

Status validate(const LlamaConfig& c, std::string* detail) {
  const auto bad = [&](const char* what) {
    set_detail(detail, std::string("invalid Llama config: ") + what);
    return Status(StatusCode::kInvalidArgument, "invalid Llama config");
  };
  if (c.vocab_size <= 0) return bad("vocab_size must be positive");
  if (c.hidden_size <= 0) return bad("hidden_size must be positive");
  if (c.intermediate_size <= 0) return bad("intermediate_size must be positive");
  if (c.num_layers <= 0) return bad("num_hidden_layers must be positive");
  if (c.num_q_heads <= 0) return bad("num_attention_heads must be positive");
  if (c.num_kv_heads <= 0) return bad("num_key_value_heads must be positive");
  if (c.num_q_heads % c.num_kv_heads != 0)
    return bad("num_attention_heads must be a multiple of num_key_value_heads");
  if (c.head_dim <= 0 || c.head_dim % 2 != 0) return bad("head_dim must be positive and even");
  if (!(c.rms_norm_eps > 0.0f)) return bad("rms_norm_eps must be positive");
  if (!(c.rope_theta > 0.0)) return bad("rope_theta must be positive");
  if (c.rope_scaling == RopeScaling::kLlama3 &&
      !(c.rope_factor > 0.0 && c.rope_high_freq_factor > c.rope_low_freq_factor &&
        c.rope_low_freq_factor > 0.0 && c.rope_original_max_position > 0.0))
    return bad("rope_scaling llama3 needs factor > 0 and high_freq_factor > low_freq_factor > 0");
  return Status::ok();
}

Status parse_llama_config(std::string_view text, LlamaConfig* out, std::string* detail) {
  const json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    set_detail(detail, "config.json: not valid JSON (or not an object)");
    return {StatusCode::kInvalidArgument, "config.json is not valid JSON"};
  }
  const Status malformed(StatusCode::kInvalidArgument, "malformed config.json");
  if (const auto it = j.find("model_type"); it != j.end()) {
    if (!it->is_string() || it->get<std::string>() != "llama") {
      set_detail(detail, "config.json: model_type " + it->dump() + " is not \"llama\"");
      return {StatusCode::kNotSupported, "model type is not llama"};
    }
  }
  for (const char* key : {"attention_bias", "mlp_bias"}) {
    if (const auto it = j.find(key); it != j.end() && it->is_boolean() && it->get<bool>()) {
      set_detail(detail, std::string("config.json: ") + key + " = true is not supported");
      return {StatusCode::kNotSupported, "biases in attention or MLP are not supported"};
    }
  }

  LlamaConfig c;
  std::int64_t vocab = 0, hidden = 0, inter = 0, layers = 0, heads = 0, kv_heads = -1,
               head_dim = -1, max_pos = 0;
  if (!get_int(j, "vocab_size", true, &vocab, detail) ||
      !get_int(j, "hidden_size", true, &hidden, detail) ||
      !get_int(j, "intermediate_size", true, &inter, detail) ||
      !get_int(j, "num_hidden_layers", true, &layers, detail) ||
      !get_int(j, "num_attention_heads", true, &heads, detail) ||
      !get_int(j, "num_key_value_heads", false, &kv_heads, detail) ||
      !get_int(j, "head_dim", false, &head_dim, detail) ||
      !get_int(j, "max_position_embeddings", false, &max_pos, detail))
    return malformed;
  if (kv_heads < 0) kv_heads = heads;  // Llama 2 7B/13B: MHA, key absent
  if (head_dim < 0) head_dim = heads > 0 ? hidden / heads : 0;
  if (!narrow(vocab, &c.vocab_size) || !narrow(hidden, &c.hidden_size) ||
      !narrow(inter, &c.intermediate_size) || !narrow(layers, &c.num_layers) ||
      !narrow(heads, &c.num_q_heads) || !narrow(kv_heads, &c.num_kv_heads) ||
      !narrow(head_dim, &c.head_dim)) {
    set_detail(detail, "config.json: a size is negative or too large");
    return malformed;
  }
  c.max_position_embeddings = max_pos;

  double eps = 1e-6;
  if (!get_number(j, "rms_norm_eps", &eps, detail) ||
      !get_number(j, "rope_theta", &c.rope_theta, detail))
    return malformed;
  c.rms_norm_eps = static_cast<float>(eps);
  if (const auto it = j.find("tie_word_embeddings"); it != j.end() && !it->is_null()) {
    if (!it->is_boolean()) {
      set_detail(detail, "config.json: \"tie_word_embeddings\" is not a boolean");
      return malformed;
    }
    c.tie_word_embeddings = it->get<bool>();
  }

  if (const auto it = j.find("rope_scaling"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) {
      set_detail(detail, "config.json: \"rope_scaling\" is not an object");
      return malformed;
    }
    std::string type;
    for (const char* key : {"rope_type", "type"}) {
      if (const auto t = it->find(key); t != it->end() && t->is_string()) {
        type = t->get<std::string>();
        break;
      }
    }
    if (type == "llama3") {
      c.rope_scaling = RopeScaling::kLlama3;
      if (!get_number(*it, "factor", &c.rope_factor, detail) ||
          !get_number(*it, "low_freq_factor", &c.rope_low_freq_factor, detail) ||
          !get_number(*it, "high_freq_factor", &c.rope_high_freq_factor, detail) ||
          !get_number(*it, "original_max_position_embeddings", &c.rope_original_max_position,
                      detail))
        return malformed;
    } else if (!type.empty() && type != "default") {
      set_detail(detail, "config.json: rope_scaling type \"" + type +
                             "\" is not supported (only \"llama3\" and \"default\")");
      return {StatusCode::kNotSupported, "unsupported rope_scaling type"};
    }
  }
  // Llama 3.x keeps rope_theta inside rope_parameters in newer transformers.
  if (const auto it = j.find("rope_parameters"); it != j.end() && it->is_object()) {
    if (!get_number(*it, "rope_theta", &c.rope_theta, detail)) return malformed;
    if (const auto t = it->find("rope_type"); t != it->end() && t->is_string()) {
      const std::string type = t->get<std::string>();
      if (type == "llama3") {
        c.rope_scaling = RopeScaling::kLlama3;
        if (!get_number(*it, "factor", &c.rope_factor, detail) ||
            !get_number(*it, "low_freq_factor", &c.rope_low_freq_factor, detail) ||
            !get_number(*it, "high_freq_factor", &c.rope_high_freq_factor, detail) ||
            !get_number(*it, "original_max_position_embeddings", &c.rope_original_max_position,
                        detail))
          return malformed;
      } else if (type != "default") {
        set_detail(detail, "config.json: rope type \"" + type + "\" is not supported");
        return {StatusCode::kNotSupported, "unsupported rope_scaling type"};
      }
    }
  }
  HATTN_RETURN_IF_ERROR(validate(c, detail));
  *out = c;
  return Status::ok();
}

Status load_llama_config(const std::filesystem::path& dir, LlamaConfig* config,
                         std::string* detail) {
  const std::filesystem::path path = dir / "config.json";
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    set_detail(detail, "cannot open " + path.string());
    return {StatusCode::kInvalidArgument, "cannot open config.json"};
  }
  std::ostringstream text;
  text << in.rdbuf();
  std::string inner;
  const Status s = parse_llama_config(text.str(), config, &inner);
  if (!s) set_detail(detail, path.string() + ": " + inner);
  return s;
}

std::string to_config_json(const LlamaConfig& c) {
  json j;
  j["architectures"] = {"LlamaForCausalLM"};
  j["model_type"] = "llama";
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_q_heads;
  j["num_key_value_heads"] = c.num_kv_heads;
  j["head_dim"] = c.head_dim;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["hidden_act"] = "silu";
  j["attention_bias"] = false;
  j["mlp_bias"] = false;
  if (c.rope_scaling == RopeScaling::kLlama3) {
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", c.rope_factor},
                         {"low_freq_factor", c.rope_low_freq_factor},
                         {"high_freq_factor", c.rope_high_freq_factor},
                         {"original_max_position_embeddings",
                          static_cast<std::int64_t>(c.rope_original_max_position)}};
  } else {
    j["rope_scaling"] = nullptr;
  }
  j["torch_dtype"] = "bfloat16";
  return j.dump(2);
}

}  // namespace hattn::model
