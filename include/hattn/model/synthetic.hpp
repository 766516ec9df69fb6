#pragma once
// Synthetic models: built-in Llama shapes with seeded random weights, written
// as a real model folder (config.json + model.safetensors, bf16) so that they
// are loaded through the same code as a downloaded model.
//
//   tiny                     4 layers, hidden 256, 4 q / 2 kv heads of 64, vocab 512
//   llama3-1b-shape          Llama 3.2 1B: 16 layers, hidden 2048, 32 q / 8 kv
//                            heads of 64, vocab 128256, tied embeddings
//   llama3-8b-shape-4layers  Llama 3.1 8B with its first 4 layers: hidden 4096,
//                            32 q / 8 kv heads of 128, MLP 14336, vocab 128256

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "hattn/core/status.hpp"
#include "hattn/cpu/executor.hpp"
#include "hattn/model/config.hpp"

namespace hattn::model {

std::vector<std::string_view> synthetic_model_names();
// kInvalidArgument for an unknown name.
Status synthetic_config(std::string_view name, LlamaConfig* config);

// Writes config.json and model.safetensors of `config` with weights drawn
// from `seed` (normal-like, std 0.02 as HF initializes; norms 1) into `dir`,
// created if needed. The same config and seed give the same bytes.
Status write_synthetic_model(const LlamaConfig& config, std::uint64_t seed,
                             const std::filesystem::path& dir, const CpuExecutor& executor,
                             std::string* detail = nullptr);

}  // namespace hattn::model
