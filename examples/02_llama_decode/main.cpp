// Example 02: llama_decode, a Llama decoder whose attention runs on hattn.
//
// Loads a Hugging Face Llama folder (config.json + safetensors) or writes and
// loads a synthetic one, prefills a prompt of token ids (or fills the KV
// caches synthetically, to measure decode at long context), decodes new
// tokens with attention through a hattn backend, and prints the ids and a
// table of where the time went. Tokenization is out of scope: ids in, ids out.
//
//   llama_decode --synthetic tiny --prompt-ids 1,2,3 --max-new-tokens 8
//   llama_decode --synthetic llama3-1b-shape --prompt-len 16384 --prefill synthetic
//   llama_decode --model ~/Llama-3.2-1B --prompt-ids 128000,791,6864 --json

#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "hattn/core/dtype.hpp"
#include "hattn/core/status.hpp"
#include "hattn/cpu/executor.hpp"
#include "hattn/cpu/isa.hpp"
#include "hattn/model/attention.hpp"
#include "hattn/model/config.hpp"
#include "hattn/model/llama.hpp"
#include "hattn/model/lsh_kv_attention.hpp"
#include "hattn/model/orchestrated_runner.hpp"
#if HATTN_WITH_CUDA
#include "hattn/model/cuda_decoder.hpp"
#include "hattn/model/cuda_llama.hpp"
#include "hattn/model/cuda_orchestrated_runner.hpp"
#endif
#include "hattn/model/runner.hpp"
#include "hattn/model/sampler.hpp"
#include "hattn/model/synthetic.hpp"
#include "hattn/runtime/timeline.hpp"

namespace {

namespace hm = hattn::model;
using Clock = std::chrono::steady_clock;

struct Options {
  std::string model_dir;
  std::string synthetic;
  std::string synthetic_dir;
  std::vector<std::int32_t> prompt_ids;
  std::int64_t prompt_len = 0;
  int max_new_tokens = 16;
  int batch = 1;
  std::string attention = "cpu-dense";
  std::string compute = "cpu";
  int lsh_k = 10, lsh_l = 150;
  std::string lsh_dense_layers = "0,16,...";
  int micro_batches = 1;
  int attention_threads = 0;
  int threads = 0;
  std::string trace;
  std::uint64_t seed = 0;
  std::uint64_t weights_seed = 0;
  float temperature = 0.0f;
  float top_p = 1.0f;
  bool json = false;
  std::string prefill = "compute";
  int prefill_chunk = 256;
  hattn::DType kv_dtype = hattn::DType::kBF16;
  std::string isa = "auto";
};

constexpr const char* kUsage = R"(Usage: llama_decode (--model DIR | --synthetic NAME) [options]

Decodes with a Llama-family model (Llama 2, 3, 3.1, 3.2) whose attention runs
on a hattn backend, and reports where the time goes. Token ids in, token ids
out: tokenization is out of scope.

Model:
  --model DIR            a Hugging Face folder: config.json and model.safetensors
                         (or model.safetensors.index.json and its shards),
                         weights in bf16, f16 or f32
  --synthetic NAME       a built-in shape with seeded random bf16 weights, written
                         as a real model folder and loaded from it: tiny,
                         llama3-1b-shape, llama3-8b-shape-4layers
  --synthetic-dir DIR    where synthetic folders go (default $HATTN_SYNTHETIC_DIR
                         or /tmp/hattn-synthetic); reused when already there
  --weights-seed N       seed of the synthetic weights (default 0)
Prompt and generation:
  --prompt-ids 1,2,3     the prompt's token ids (every sequence of the batch)
  --prompt-len N         a prompt of N random ids (from --seed)
  --max-new-tokens N     tokens to generate per sequence (default 16)
  --batch B              sequences decoded together (default 1)
  --temperature T        0 = greedy (default); > 0 samples
  --top-p P              nucleus sampling mass, with --temperature (default 1)
  --seed N               seed of prompts and sampling (default 0)
  --prefill MODE         compute (default): run the model over the prompt in
                         chunks; synthetic: BENCHMARK ONLY, fill the KV caches
                         with generated keys/values of the prompt length
                         without running the model (outputs are meaningless,
                         decode speed at long context is what it measures)
  --prefill-chunk N      tokens per prefill chunk (default 256)
Attention and compute:
  --attention A          cpu-dense (default), lsh, cuda-dense
  --lsh-K K, --lsh-L L   MagicPIG LSH parameters (with --attention lsh): K bits
                         per table (default 10), L tables (default 150)
  --lsh-dense-layers S   layers lsh attends densely: "none", a list "0,5", or a
                         progression "0,16,..." (default: every 16th from 0)
  --compute C            where the GEMMs run: cpu (default) or cuda
  --micro-batches M      decode through the orchestrator with M micro-batches
                         (default 1): stages on a compute stream, attention on
                         the orchestrator's CPU thread; with M >= 2 one
                         micro-batch's attention overlaps another's GEMMs.
                         0: the sequential runner, no orchestrator
  --attention-threads N  with M >= 2: threads of the CPU attention; the rest
                         run the GEMMs (default: half of --threads, at least 1)
  --kv-dtype T           KV cache dtype: bf16 (default), f16, f32
  --isa I                CPU attention kernels: auto, avx512, avx2, scalar
  --threads N            worker threads, 0 = all cores (default 0)
Output:
  --json                 one JSON object on stdout instead of the table
  --trace FILE           write a Chrome trace (chrome://tracing, ui.perfetto.dev)
                         of every stage of every layer
  -h, --help             this help
Options take their value as the next argument or after '=' (--batch=8).
)";

template <class T>
bool parse_num(std::string_view s, T lo, T hi, T* out) {
  T v{};
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size() || v < lo || v > hi) return false;
  *out = v;
  return true;
}

bool parse_float(std::string_view s, float lo, float hi, float* out) {
  const std::string str(s);
  char* end = nullptr;
  const float v = std::strtof(str.c_str(), &end);
  if (str.empty() || end != str.c_str() + str.size() || !(v >= lo && v <= hi)) return false;
  *out = v;
  return true;
}

bool parse_ids(std::string_view s, std::vector<std::int32_t>* out) {
  out->clear();
  while (!s.empty()) {
    const auto comma = s.find(',');
    std::int32_t id = 0;
    if (!parse_num<std::int32_t>(s.substr(0, comma), 0, 0x7fffffff, &id)) return false;
    out->push_back(id);
    if (comma == std::string_view::npos) break;
    s.remove_prefix(comma + 1);
  }
  return !out->empty();
}

int usage_error(const char* fmt, std::string_view a, std::string_view b = {}) {
  std::fprintf(stderr, "error: ");
  std::fprintf(stderr, fmt, static_cast<int>(a.size()), a.data(), static_cast<int>(b.size()),
               b.data());
  std::fprintf(stderr, " (see --help)\n");
  return 2;
}

// Returns 0 to go on, -1 after --help, otherwise the exit code.
int parse_args(int argc, char** argv, Options* o) {
  static constexpr std::string_view kFlags[] = {"--model",
                                                "--synthetic",
                                                "--synthetic-dir",
                                                "--weights-seed",
                                                "--prompt-ids",
                                                "--prompt-len",
                                                "--max-new-tokens",
                                                "--batch",
                                                "--temperature",
                                                "--top-p",
                                                "--seed",
                                                "--prefill",
                                                "--prefill-chunk",
                                                "--attention",
                                                "--lsh-K",
                                                "--lsh-L",
                                                "--compute",
                                                "--micro-batches",
                                                "--kv-dtype",
                                                "--isa",
                                                "--threads",
                                                "--trace",
                                                "--lsh-dense-layers",
                                                "--attention-threads"};
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::fputs(kUsage, stdout);
      return -1;
    }
    if (arg == "--json") {
      o->json = true;
      continue;
    }
    std::string_view value;
    bool has_value = false;
    if (const auto eq = arg.find('='); arg.starts_with("--") && eq != std::string_view::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      has_value = true;
    }
    if (std::find(std::begin(kFlags), std::end(kFlags), arg) == std::end(kFlags))
      return usage_error("unknown option '%.*s'", argv[i]);
    if (!has_value) {
      if (i + 1 >= argc) return usage_error("option %.*s needs a value", arg);
      value = argv[++i];
    }
    bool ok = true;
    if (arg == "--model")
      o->model_dir = value, ok = !value.empty();
    else if (arg == "--synthetic")
      o->synthetic = value, ok = !value.empty();
    else if (arg == "--synthetic-dir")
      o->synthetic_dir = value, ok = !value.empty();
    else if (arg == "--weights-seed")
      ok = parse_num<std::uint64_t>(value, 0, ~0ULL, &o->weights_seed);
    else if (arg == "--prompt-ids")
      ok = parse_ids(value, &o->prompt_ids);
    else if (arg == "--prompt-len")
      ok = parse_num<std::int64_t>(value, 1, 1 << 24, &o->prompt_len);
    else if (arg == "--max-new-tokens")
      ok = parse_num(value, 1, 1 << 20, &o->max_new_tokens);
    else if (arg == "--batch")
      ok = parse_num(value, 1, 1024, &o->batch);
    else if (arg == "--temperature")
      ok = parse_float(value, 0.0f, 100.0f, &o->temperature);
    else if (arg == "--top-p")
      ok = parse_float(value, 1e-6f, 1.0f, &o->top_p);
    else if (arg == "--seed")
      ok = parse_num<std::uint64_t>(value, 0, ~0ULL, &o->seed);
    else if (arg == "--prefill")
      o->prefill = value, ok = value == "compute" || value == "synthetic";
    else if (arg == "--prefill-chunk")
      ok = parse_num(value, 1, 1 << 16, &o->prefill_chunk);
    else if (arg == "--attention")
      o->attention = value, ok = value == "cpu-dense" || value == "lsh" || value == "cuda-dense";
    else if (arg == "--lsh-K")
      ok = parse_num(value, 1, 64, &o->lsh_k);
    else if (arg == "--lsh-L")
      ok = parse_num(value, 1, 4096, &o->lsh_l);
    else if (arg == "--lsh-dense-layers") {
      std::vector<std::int32_t> layers;
      o->lsh_dense_layers = value, ok = hm::parse_layer_list(value, 1 << 20, &layers);
    } else if (arg == "--compute")
      o->compute = value, ok = value == "cpu" || value == "cuda";
    else if (arg == "--micro-batches")
      ok = parse_num(value, 0, 64, &o->micro_batches);
    else if (arg == "--attention-threads")
      ok = parse_num(value, 1, 4096, &o->attention_threads);
    else if (arg == "--threads")
      ok = parse_num(value, 0, 4096, &o->threads);
    else if (arg == "--trace")
      o->trace = value, ok = !value.empty();
    else if (arg == "--isa")
      o->isa = value,
      ok = value == "auto" || value == "avx512" || value == "avx2" || value == "scalar";
    else if (arg == "--kv-dtype") {
      ok = false;
      for (hattn::DType t : {hattn::DType::kBF16, hattn::DType::kF16, hattn::DType::kF32})
        if (value == hattn::to_string(t)) o->kv_dtype = t, ok = true;
    }
    if (!ok) return usage_error("bad value '%.*s' for %.*s", value, arg);
  }
  if (o->model_dir.empty() == o->synthetic.empty())
    return usage_error("give exactly one of --model DIR and --synthetic NAME%.*s", "");
  if (o->prompt_ids.empty() == (o->prompt_len == 0))
    return usage_error("give exactly one of --prompt-ids and --prompt-len%.*s", "");
  return 0;
}

bool check(const hattn::Status& s, const char* what, const std::string& detail = {}) {
  if (s) return true;
  const std::string_view code = hattn::to_string(s.code());
  std::fprintf(stderr, "error: %s: %.*s: %s\n", what, static_cast<int>(code.size()), code.data(),
               detail.empty() ? s.message() : detail.c_str());
  return false;
}

// A progress bar on stderr, only when stderr is a terminal.
class Progress {
 public:
  explicit Progress(const char* label) : label_(label), on_(isatty(STDERR_FILENO) != 0) {}
  void update(std::int64_t done, std::int64_t total) {
    if (!on_ || total <= 0) return;
    const auto now = Clock::now();
    if (done < total && now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    constexpr int kWidth = 30;
    const int fill = static_cast<int>(kWidth * done / total);
    std::fprintf(stderr, "\r%-8s [%.*s%*s] %lld/%lld", label_, fill,
                 "##############################", kWidth - fill, "", static_cast<long long>(done),
                 static_cast<long long>(total));
    if (done >= total) std::fputc('\n', stderr);
    std::fflush(stderr);
  }

 private:
  const char* label_;
  bool on_;
  Clock::time_point last_{};
};

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// The synthetic model's folder: written once, then reused.
bool prepare_synthetic(const Options& opt, const hattn::CpuExecutor& executor,
                       std::filesystem::path* dir) {
  hm::LlamaConfig config;
  if (!hm::synthetic_config(opt.synthetic, &config)) {
    std::string names;
    for (std::string_view n : hm::synthetic_model_names()) {
      names += ' ';
      names += n;
    }
    std::fprintf(stderr, "error: unknown synthetic model '%s' (known:%s)\n", opt.synthetic.c_str(),
                 names.c_str());
    return false;
  }
  std::filesystem::path base = opt.synthetic_dir;
  if (base.empty()) {
    const char* env = std::getenv("HATTN_SYNTHETIC_DIR");
    base = env && *env ? env : "/tmp/hattn-synthetic";
  }
  *dir = base / (opt.synthetic + "-seed" + std::to_string(opt.weights_seed));
  hm::LlamaConfig existing;
  std::error_code ec;
  if (std::filesystem::exists(*dir / "config.json", ec) && hm::load_llama_config(*dir, &existing) &&
      hm::to_config_json(existing) == hm::to_config_json(config))
    return true;
  std::fprintf(stderr, "writing synthetic model %s (%.2f GB of bf16 weights) to %s\n",
               opt.synthetic.c_str(), 2e-9 * static_cast<double>(config.num_parameters()),
               dir->string().c_str());
  std::string detail;
  return check(hm::write_synthetic_model(config, opt.weights_seed, *dir, executor, &detail),
               "writing the synthetic model", detail);
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  if (const int rc = parse_args(argc, argv, &opt); rc != 0) return rc < 0 ? 0 : rc;
  const bool gpu_compute = opt.compute == "cuda";
#if !HATTN_WITH_CUDA
  if (gpu_compute || opt.attention == "cuda-dense") {
    std::fprintf(stderr,
                 "error: --compute cuda and --attention cuda-dense need a build with CUDA "
                 "(configure with -DHATTN_ENABLE_CUDA=ON); use --compute cpu\n");
    return 2;
  }
#endif
  if (opt.attention == "cuda-dense" && !gpu_compute)
    return usage_error("--attention cuda-dense runs the whole model on the GPU: add --compute %.*s",
                       "cuda");
  if (gpu_compute && opt.attention != "cuda-dense" && opt.micro_batches == 0)
    return usage_error(
        "--compute cuda with CPU attention decodes through the orchestrator: --micro-batches "
        "must be at least 1, not %.*s",
        "0");

  const hattn::CpuExecutor executor(opt.threads);
  // Orchestrated decode with two or more micro-batches (at most one per
  // sequence): the GEMMs and the CPU attention overlap, each on its own
  // executor (threads split); with one they alternate and share every thread.
  const bool orchestrated = opt.micro_batches > 0 && opt.attention != "cuda-dense";
  // With GPU compute the CPU only attends: no thread split.
  const bool overlapped = std::min(opt.micro_batches, opt.batch) >= 2 && opt.compute == "cpu";
  const int total_threads = executor.concurrency();
  const int attention_threads =
      opt.attention_threads > 0 ? opt.attention_threads : std::max(1, total_threads / 2);
  if (overlapped && attention_threads >= total_threads) {
    if (opt.attention_threads > 0)
      std::fprintf(stderr,
                   "error: --attention-threads %d leaves no thread for the GEMMs (%d threads in "
                   "all; see --threads)\n",
                   attention_threads, total_threads);
    else
      std::fprintf(stderr,
                   "error: %d micro-batches overlap the GEMMs with the attention, which needs "
                   "at least 2 threads (--threads %d)\n",
                   opt.micro_batches, total_threads);
    return 2;
  }
  if (opt.attention_threads > 0 && !overlapped)
    std::fprintf(stderr,
                 "note: --attention-threads applies only with 2 or more micro-batches on CPU "
                 "compute; ignored\n");
  std::optional<hattn::CpuExecutor> compute_executor, attention_executor;
  if (overlapped) {
    compute_executor.emplace(total_threads - attention_threads);
    attention_executor.emplace(attention_threads);
  }
  std::filesystem::path dir = opt.model_dir;
  if (!opt.synthetic.empty() && !prepare_synthetic(opt, executor, &dir)) return 1;

  auto t0 = Clock::now();
  hm::LlamaModel model;
  std::string detail;
  if (!check(hm::LlamaModel::load(dir, &model, &detail), "loading the model", detail)) return 1;
  const double load_s = seconds_since(t0);
  const hm::LlamaConfig& cfg = model.config();

  // Prompts: the given ids for every sequence, or random ids per sequence.
  std::vector<std::vector<std::int32_t>> prompts(static_cast<std::size_t>(opt.batch));
  std::mt19937_64 rng(opt.seed);
  for (auto& p : prompts) {
    if (!opt.prompt_ids.empty()) {
      p = opt.prompt_ids;
    } else {
      std::uniform_int_distribution<std::int32_t> id(0, cfg.vocab_size - 1);
      p.resize(static_cast<std::size_t>(opt.prompt_len));
      for (auto& t : p) t = id(rng);
    }
    for (std::int32_t t : p) {
      if (t >= cfg.vocab_size) {
        std::fprintf(stderr, "error: prompt id %d is outside the vocabulary (size %d)\n", t,
                     cfg.vocab_size);
        return 2;
      }
    }
  }
  const auto prompt_len = static_cast<std::int64_t>(prompts[0].size());

  hattn::CpuIsa isa = hattn::cpu_isa_default();
  for (hattn::CpuIsa i : {hattn::CpuIsa::kScalar, hattn::CpuIsa::kAvx2, hattn::CpuIsa::kAvx512})
    if (opt.isa == hattn::to_string(i)) isa = i;
  std::unique_ptr<hm::KvAttention> attention;
  hm::LshKvAttention* lsh = nullptr;
  const bool whole_gpu = opt.attention == "cuda-dense";
#if HATTN_WITH_CUDA
  // --compute cuda: the weights on GPU 0 (bf16); --attention cuda-dense also
  // keeps the KV caches there and decodes without the orchestrator.
  hm::CudaLlamaModel gpu_model;
  hm::CudaDenseDecoder gpu_decoder;
  if (gpu_compute) {
    if (!check(hm::CudaLlamaModel::create(model, 0, &gpu_model), "uploading the model to GPU 0"))
      return 1;
    if (whole_gpu &&
        !check(hm::CudaDenseDecoder::create(gpu_model,
                                            {.num_sequences = opt.batch,
                                             .max_seq_len = prompt_len + opt.max_new_tokens + 2,
                                             .max_prefill_tokens = opt.prefill_chunk,
                                             .kv_dtype = opt.kv_dtype,
                                             .page_size = 16,
                                             .timing = true},
                                            &gpu_decoder),
               "allocating the GPU KV caches"))
      return 1;
  }
#endif
  std::vector<std::int32_t> lsh_dense_layers;
  if (!hm::parse_layer_list(opt.lsh_dense_layers, cfg.num_layers, &lsh_dense_layers))
    return usage_error("bad value '%.*s' for %.*s", opt.lsh_dense_layers, "--lsh-dense-layers");
  try {
    // Orchestrated: prefill (exact attention) into the host cache the
    // orchestrator then decodes from; an LSH backend indexes it afterwards.
    if (whole_gpu) {
      // No host caches: the GPU decoder holds them.
    } else if (opt.attention == "lsh" && !orchestrated) {
      hm::LshKvAttentionOptions lo;
      lo.kv_dtype = opt.kv_dtype;
      lo.num_sequences = opt.batch;
      lo.max_seq_len = prompt_len + opt.max_new_tokens + 2;
      lo.max_prefill_tokens = opt.prefill_chunk;
      lo.lsh.K = opt.lsh_k;
      lo.lsh.L = opt.lsh_l;
      lo.dense_layers = lsh_dense_layers;
      auto a = std::make_unique<hm::LshKvAttention>(cfg, lo, executor, isa);
      lsh = a.get();
      attention = std::move(a);
    } else {
      attention = std::make_unique<hm::DenseKvAttention>(
          cfg,
          hm::DenseKvAttentionOptions{.kv_dtype = opt.kv_dtype,
                                      .page_size = 16,
                                      .num_sequences = opt.batch,
                                      .max_seq_len = prompt_len + opt.max_new_tokens + 2,
                                      .max_prefill_tokens = opt.prefill_chunk,
                                      .precision = hattn::cpu::DenseDecode::Precision::kF32},
          executor, isa);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: cannot allocate the KV caches: %s\n", e.what());
    return 1;
  }
  // The host runner (prefill, and decode without the orchestrator); with
  // cuda-dense it is not used, and stands on a one-token cache.
  if (!attention)
    attention = std::make_unique<hm::DenseKvAttention>(
        cfg,
        hm::DenseKvAttentionOptions{.kv_dtype = opt.kv_dtype,
                                    .page_size = 16,
                                    .num_sequences = 1,
                                    .max_seq_len = 1,
                                    .max_prefill_tokens = 1,
                                    .precision = hattn::cpu::DenseDecode::Precision::kF32},
        executor, isa);
  hm::LlamaRunner runner(model, *attention, executor);
  // --trace: every stage of every layer as a Chrome trace "complete" event
  // (open in chrome://tracing or ui.perfetto.dev).
  nlohmann::json trace_events = nlohmann::json::array();
  const char* phase = "prefill";
  if (!opt.trace.empty()) {
    runner.set_trace([&](const char* stage, int layer, double begin_s, double end_s) {
      nlohmann::json e{{"name", stage},
                       {"cat", phase},
                       {"ph", "X"},
                       {"ts", begin_s * 1e6},
                       {"dur", (end_s - begin_s) * 1e6},
                       {"pid", 0},
                       {"tid", 0}};
      if (layer >= 0) e["args"] = {{"layer", layer}};
      trace_events.push_back(std::move(e));
    });
  }
  hm::Sampler sampler({opt.temperature, opt.top_p}, opt.seed ^ 0x5EED);

  // Prefill.
  const auto vocab = static_cast<std::size_t>(cfg.vocab_size);
  std::vector<float> logits(static_cast<std::size_t>(opt.batch) * vocab);
  std::vector<std::vector<std::int32_t>> generated(static_cast<std::size_t>(opt.batch));
  std::vector<std::int32_t> next(static_cast<std::size_t>(opt.batch));
  t0 = Clock::now();
  {
    Progress bar("prefill");
    // On the GPU decoder with cuda-dense, else through the host runner.
    using Progress_fn = std::function<void(std::int64_t, std::int64_t)>;
    const auto fill_synthetic = [&](const Progress_fn& progress) -> hattn::Status {
#if HATTN_WITH_CUDA
      if (whole_gpu) {
        const hattn::Status st = gpu_decoder.synthetic_prefill(prompt_len, opt.seed);
        progress(1, 1);
        return st;
      }
#endif
      return runner.synthetic_prefill(prompt_len, opt.seed, progress);
    };
    const auto prefill_one = [&](int b, const std::vector<std::int32_t>& p,
                                 const Progress_fn& progress) -> hattn::Status {
#if HATTN_WITH_CUDA
      if (whole_gpu) return gpu_decoder.prefill(b, p, opt.prefill_chunk, logits.data(), progress);
#endif
      return runner.prefill(b, p, opt.prefill_chunk, logits.data(), progress);
    };
    if (opt.prefill == "synthetic") {
      if (!check(fill_synthetic([&](std::int64_t d, std::int64_t t) { bar.update(d, t); }),
                 "synthetic prefill"))
        return 1;
      for (int b = 0; b < opt.batch; ++b)
        next[static_cast<std::size_t>(b)] = prompts[static_cast<std::size_t>(b)].back();
    } else {
      for (int b = 0; b < opt.batch; ++b) {
        const auto& p = prompts[static_cast<std::size_t>(b)];
        const std::int64_t base = b * prompt_len, total = opt.batch * prompt_len;
        if (!check(prefill_one(b, p,
                               [&](std::int64_t d, std::int64_t) { bar.update(base + d, total); }),
                   "prefill"))
          return 1;
        const std::int32_t tok = sampler.sample(std::span(logits.data(), vocab));
        generated[static_cast<std::size_t>(b)].push_back(tok);
        next[static_cast<std::size_t>(b)] = tok;
      }
    }
  }
  // The orchestrated decoder continues from the prefilled caches (an LSH
  // backend builds its indexes here: counted as prefill).
  std::unique_ptr<hm::OrchestratedRunner> orch;
  if (orchestrated) {
    hm::OrchestratedRunnerOptions oo;
    oo.num_micro_batches = opt.micro_batches;
    oo.isa = isa;
    oo.record_timeline = !opt.trace.empty();
    oo.pin_threads = compute_executor && compute_executor->concurrency() == 1 &&
                     attention_executor->concurrency() == 1;
    if (opt.attention == "lsh") {
      oo.attention = hm::CpuAttentionKind::kLsh;
      oo.lsh.K = opt.lsh_k;
      oo.lsh.L = opt.lsh_l;
      oo.lsh_dense_layers = lsh_dense_layers;
    }
    const hattn::CpuExecutor& cex = compute_executor ? *compute_executor : executor;
    const hattn::CpuExecutor& aex = attention_executor ? *attention_executor : executor;
    auto& prefilled = static_cast<hm::DenseKvAttention&>(*attention);
    std::string why;
    hattn::Status st;
#if HATTN_WITH_CUDA
    if (gpu_compute) {
      oo.pin_threads = false;  // the GPU computes; the CPU attention gets every thread
      st = hm::create_cuda_orchestrated_runner(gpu_model, prefilled, oo, executor, &orch, &why);
    } else
#endif
      st = hm::OrchestratedRunner::create(model, prefilled, oo, cex, aex, &orch, &why);
    if (!check(st, "starting the orchestrated decoder", why)) return 1;
  }
  const double prefill_s = seconds_since(t0);
  hm::StageTimes prefill_times = runner.times();
  runner.reset_times();
#if HATTN_WITH_CUDA
  if (whole_gpu) {
    prefill_times = gpu_decoder.times();
    gpu_decoder.reset_times();
  }
#endif
  const auto decode_step = [&](std::span<const std::int32_t> tokens, float* out) {
#if HATTN_WITH_CUDA
    if (whole_gpu) return gpu_decoder.decode_step(tokens, out);
#endif
    return orch ? orch->decode_step(tokens, out) : runner.decode_step(tokens, out);
  };

  // Decode.
  phase = "decode";
  const int steps = opt.prefill == "synthetic" ? opt.max_new_tokens : opt.max_new_tokens - 1;
  t0 = Clock::now();
  {
    Progress bar("decode");
    for (int s = 0; s < steps; ++s) {
      if (!check(decode_step(next, logits.data()), "decode step")) return 1;
      for (int b = 0; b < opt.batch; ++b) {
        const std::int32_t tok = sampler.sample(std::span(logits.data() + b * vocab, vocab));
        generated[static_cast<std::size_t>(b)].push_back(tok);
        next[static_cast<std::size_t>(b)] = tok;
      }
      bar.update(s + 1, steps);
    }
  }
  const double decode_s = seconds_since(t0);
  hm::StageTimes dt = orch ? orch->times() : runner.times();
#if HATTN_WITH_CUDA
  if (whole_gpu) dt = gpu_decoder.times();
#endif
  const double compute_busy_s = orch ? orch->compute_busy_s() : 0.0;
  const double attention_busy_s = orch ? orch->attention_busy_s() : 0.0;
  const double orch_wall_s = orch ? orch->wall_s() : 0.0;

  // lsh: the fraction of indexed keys the queries sample, measured on one
  // extra, untimed step (its token is dropped).
  double sampled_fraction = -1.0;
  const bool is_lsh = opt.attention == "lsh";
  if (is_lsh) {
    if (lsh) lsh->set_sampling_stats(true);
    if (orch) orch->set_sampling_stats(true);
    std::vector<float> scratch_logits(logits.size());
    if (!check(decode_step(next, scratch_logits.data()), "decode step (sampling stats)")) return 1;
    sampled_fraction =
        lsh ? (lsh->sampling_stats().queries > 0 ? lsh->sampling_stats().mean_fraction() : -1.0)
            : orch->mean_sampled_fraction();
  }

  if (!opt.trace.empty()) {
    // Orchestrated decode: the orchestrator's timeline (compute stream, copy
    // stream and CPU attention tracks) as process 1, next to the prefill.
    if (orch) {
      // On the prefill's time base (the timeline starts with the orchestrator).
      const double shift_us =
          std::chrono::duration<double, std::micro>(orch->timeline().origin() - runner.epoch())
              .count();
      nlohmann::json tl = nlohmann::json::parse(orch->timeline().to_chrome_trace());
      for (auto& e : tl.at("traceEvents")) {
        if (e.contains("ts")) e["ts"] = e["ts"].get<double>() + shift_us;
        trace_events.push_back(e);
      }
    }
    std::ofstream out(opt.trace, std::ios::binary);
    out << nlohmann::json{{"traceEvents", trace_events}, {"displayTimeUnit", "ms"}}.dump() << '\n';
    if (!out.flush()) {
      std::fprintf(stderr, "error: cannot write the trace to %s\n", opt.trace.c_str());
      return 1;
    }
  }

  const double prefill_tok_s =
      prefill_s > 0 ? static_cast<double>(opt.batch * prompt_len) / prefill_s : 0.0;
  const double decode_tok_s = decode_s > 0 && steps > 0 ? opt.batch * steps / decode_s : 0.0;
  // The LSH backend of the orchestrator keeps its own copy of the KV next to
  // the host cache (runtime/lsh_cpu_attention.hpp): counted with the KV.
  std::size_t kv_bytes = attention->kv_bytes() + (orch ? orch->backend_kv_bytes() : 0);
  const std::size_t index_bytes = orch ? orch->index_bytes() : attention->index_bytes();
  const char* attention_name = orch ? orch->attention_name() : attention->name();
#if HATTN_WITH_CUDA
  if (whole_gpu) {
    kv_bytes = gpu_decoder.kv_bytes();
    attention_name = gpu_decoder.name();
  }
#endif
  const double kv_gb = static_cast<double>(kv_bytes) / 1e9;
  const double index_gb = static_cast<double>(index_bytes) / 1e9;
  const double weights_gb = static_cast<double>(model.weight_bytes()) / 1e9;

  if (opt.json) {
    nlohmann::json j;
    j["model"] = opt.synthetic.empty() ? opt.model_dir : opt.synthetic;
    j["attention"] = attention_name;
    j["compute"] = opt.compute;
    j["micro_batches"] = orch ? orch->num_micro_batches() : 0;
    if (orch) {
      j["orchestrator"] = {{"compute_threads", gpu_compute        ? 0
                                               : compute_executor ? compute_executor->concurrency()
                                                                  : total_threads},
                           {"attention_threads",
                            attention_executor ? attention_executor->concurrency() : total_threads},
                           {"wall_s", orch_wall_s},
                           {"compute_busy_s", compute_busy_s},
                           {"attention_busy_s", attention_busy_s}};
    }
    j["batch"] = opt.batch;
    j["prompt_len"] = prompt_len;
    j["prefill"] = opt.prefill;
    j["threads"] = executor.concurrency();
    j["generated"] = generated;
    j["load_s"] = load_s;
    j["prefill_s"] = prefill_s;
    j["prefill_tok_s"] = prefill_tok_s;
    j["decode_steps"] = steps;
    j["decode_s"] = decode_s;
    j["decode_tok_s"] = decode_tok_s;
    const auto stages = [](const hm::StageTimes& t) {
      return nlohmann::json{{"gemm_s", t.gemm_s},
                            {"attention_s", t.attention_s},
                            {"copies_s", t.copies_s},
                            {"merge_s", t.merge_s},
                            {"other_s", t.other_s}};
    };
    j["prefill_stages"] = stages(prefill_times);
    j["decode_stages"] = stages(dt);
    j["kv_bytes"] = kv_bytes;
    j["index_bytes"] = index_bytes;
    if (is_lsh) {
      j["lsh"] = {
          {"K", opt.lsh_k},
          {"L", opt.lsh_l},
          {"dense_layers", lsh_dense_layers},
          {"mean_sampled_fraction",
           sampled_fraction >= 0.0 ? nlohmann::json(sampled_fraction) : nlohmann::json(nullptr)}};
    }
    j["weight_bytes"] = model.weight_bytes();
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }

  // The CPU kernels a dense backend picked (other backends say their own name).
  const auto* dense = dynamic_cast<const hm::DenseKvAttention*>(attention.get());
  std::string kernels = dense ? std::string(hattn::to_string(dense->backend().isa())) : "-";
  if (orch) kernels = hattn::to_string(isa);
  for (int l = 0; lsh && l < cfg.num_layers; ++l)
    if (const hattn::cpu::LshAttention* layer = lsh->lsh_layer(l))
      kernels = hattn::to_string(layer->isa());
  std::printf("model     %s: %d layers, hidden %d, %d q / %d kv heads of %d, vocab %d\n",
              opt.synthetic.empty() ? opt.model_dir.c_str() : opt.synthetic.c_str(), cfg.num_layers,
              cfg.hidden_size, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size);
  std::printf(
      "run       attention %s (%s kernels), compute %s, %d threads, batch %d, prompt %lld "
      "tokens (%s prefill%s)\n",
      attention_name, kernels.c_str(), opt.compute.c_str(), executor.concurrency(), opt.batch,
      static_cast<long long>(prompt_len), opt.prefill.c_str(),
      opt.prefill == "synthetic" ? ", benchmark only: outputs are meaningless" : "");
  for (int b = 0; b < opt.batch; ++b) {
    std::printf("seq %-5d", b);
    for (std::int32_t t : generated[static_cast<std::size_t>(b)]) std::printf(" %d", t);
    std::printf("\n");
  }
  const auto row = [](const char* name, const hm::StageTimes& t, double wall) {
    const auto pct = [&](double x) { return wall > 0 ? 100.0 * x / wall : 0.0; };
    std::printf(
        "%-9s %9.3f s | gemm %8.3f s %5.1f%% | attention %8.3f s %5.1f%% | copies %7.3f s "
        "%5.1f%% | merge %6.3f s | other %6.3f s\n",
        name, wall, t.gemm_s, pct(t.gemm_s), t.attention_s, pct(t.attention_s), t.copies_s,
        pct(t.copies_s), t.merge_s, t.other_s);
  };
  std::printf("\n%-9s %11s   %-s\n", "phase", "wall", "per stage");
  row("prefill", prefill_times, prefill_s);
  row("decode", dt, decode_s);
  std::printf("\nprefill   %10.1f tok/s  (%lld tokens%s)\n", prefill_tok_s,
              static_cast<long long>(opt.batch * prompt_len),
              opt.prefill == "synthetic" ? ", synthetic: cache fill only" : "");
  std::printf("decode    %10.2f tok/s  (%d steps x batch %d)\n", decode_tok_s, steps, opt.batch);
  if (orch) {
    const std::string gemm =
        gpu_compute
            ? std::string("GPU GEMMs")
            : std::to_string(compute_executor ? compute_executor->concurrency() : total_threads) +
                  " GEMM";
    std::printf(
        "pipeline  orchestrator, %d micro-batch%s, %s / %d attention threads: compute busy "
        "%.3f s, attention busy %.3f s in %.3f s of steps (overlap %.2f)\n",
        orch->num_micro_batches(), orch->num_micro_batches() == 1 ? "" : "es", gemm.c_str(),
        attention_executor ? attention_executor->concurrency() : total_threads, compute_busy_s,
        attention_busy_s, orch_wall_s,
        orch_wall_s > 0 ? (compute_busy_s + attention_busy_s) / orch_wall_s : 0.0);
  } else if (whole_gpu) {
    std::printf("pipeline  the whole decoder on GPU 0 (cuda-dense: no orchestrator)\n");
  } else {
    std::printf("pipeline  sequential runner (no orchestrator)\n");
  }
  std::printf("memory    KV %.1f MB, index %.1f MB, weights %.1f MB (mapped), load %.2f s\n",
              kv_gb * 1e3, index_gb * 1e3, weights_gb * 1e3, load_s);
  if (is_lsh) {
    std::string dl;
    for (std::int32_t l : lsh_dense_layers) dl += (dl.empty() ? "" : ",") + std::to_string(l);
    char sampled[96];
    if (sampled_fraction >= 0.0)
      std::snprintf(sampled, sizeof sampled,
                    "sampled %.2f%% of indexed keys (mean over queries of one extra step)",
                    100.0 * sampled_fraction);
    else
      std::snprintf(sampled, sizeof sampled, "sampled: n/a (no key indexed yet)");
    std::printf("lsh       K %d, L %d, dense layers [%s], %s\n", opt.lsh_k, opt.lsh_l, dl.c_str(),
                sampled);
  }
  return 0;
}
