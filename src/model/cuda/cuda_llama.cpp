// CudaLlamaModel: weight upload (host conversion to the device weight dtype),
// cuBLAS GEMMs and the stage sequences; kernels in kernels.cu.

#include "hattn/model/cuda_llama.hpp"

#include <cublas_v2.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <new>
#include <utility>

#include "model/cuda/kernels.hpp"

namespace hattn::model {
namespace {

using Stage = CudaStageTimer::Stage;

using detail::cuda_check;

Status cublas_check(cublasStatus_t e, const char* what) noexcept {
  if (e == CUBLAS_STATUS_SUCCESS) return Status::ok();
  if (e == CUBLAS_STATUS_ALLOC_FAILED) return {StatusCode::kOutOfMemory, what};
  return {StatusCode::kCudaError, what};
}

// Allocates `dst` and uploads `bytes` from host memory (synchronous).
Status upload(cuda::DeviceBuffer& dst, const void* src, std::size_t bytes,
              const char* what) noexcept {
  HATTN_RETURN_IF_ERROR(dst.allocate(bytes));
  return cuda_check(cudaMemcpy(dst.data(), src, bytes, cudaMemcpyHostToDevice), what);
}

// Appends `count` elements of `src` (stored in `from`) to `dst` in `to`
// (round to nearest even for bf16, as store_from_float).
void convert_append(const void* src, DType from, std::int64_t count, DType to,
                    std::vector<unsigned char>& dst) {
  const std::size_t es = size_of(to);
  const std::size_t at = dst.size();
  dst.resize(at + static_cast<std::size_t>(count) * es);
  unsigned char* out = dst.data() + at;
  if (from == to) {
    std::memcpy(out, src, static_cast<std::size_t>(count) * es);
    return;
  }
  // Element by element from possibly unaligned mapped memory.
  const auto* in = static_cast<const unsigned char*>(src);
  const std::size_t is = size_of(from);
  for (std::int64_t i = 0; i < count; ++i) {
    float x = 0.0f;
    if (from == DType::kF32) {
      std::memcpy(&x, in + static_cast<std::size_t>(i) * is, 4);
    } else if (from == DType::kBF16) {
      bf16 b;
      std::memcpy(&b.bits, in + static_cast<std::size_t>(i) * is, 2);
      x = to_float(b);
    } else {
      f16 h;
      std::memcpy(&h.bits, in + static_cast<std::size_t>(i) * is, 2);
      x = to_float(h);
    }
    alignas(4) unsigned char tmp[4];
    store_from_float(tmp, to, 0, x);
    std::memcpy(out + static_cast<std::size_t>(i) * es, tmp, es);
  }
}

constexpr std::int64_t kInt32Max = std::numeric_limits<std::int32_t>::max();

}  // namespace

// ---------------------------------------------------------------- timer

Status CudaStageTimer::reserve(std::size_t marks) noexcept {
  // One event more than marks: the start.
  const std::size_t want = marks + 1;
  if (events_.size() >= want) return Status::ok();
  try {
    events_.reserve(want);
    stages_.resize(want);
  } catch (const std::bad_alloc&) {
    return {StatusCode::kOutOfMemory, "CudaStageTimer::reserve: out of host memory"};
  }
  while (events_.size() < want) {
    cuda::Event e;
    HATTN_RETURN_IF_ERROR(e.create(/*timing=*/true));
    events_.push_back(std::move(e));
  }
  return Status::ok();
}

Status CudaStageTimer::start(cudaStream_t stream) noexcept {
  used_ = 0;
  active_ = false;
  first_error_ = Status::ok();
  if (events_.empty()) return {StatusCode::kInvalidArgument, "CudaStageTimer: reserve() first"};
  HATTN_RETURN_IF_ERROR(events_[0].record(stream));
  used_ = 1;
  active_ = true;
  return Status::ok();
}

void CudaStageTimer::mark(cudaStream_t stream, Stage stage) noexcept {
  if (!active_) return;
  if (used_ >= events_.size()) {
    ++dropped_;
    return;
  }
  if (Status s = events_[used_].record(stream); !s) {
    if (first_error_) first_error_ = s;
    return;
  }
  stages_[used_] = stage;
  ++used_;
}

Status CudaStageTimer::collect(StageTimes* times) noexcept {
  if (!active_) return Status::ok();
  active_ = false;
  HATTN_RETURN_IF_ERROR(first_error_);
  if (used_ < 2) return Status::ok();
  HATTN_RETURN_IF_ERROR(events_[used_ - 1].synchronize());
  for (std::size_t i = 1; i < used_; ++i) {
    float ms = 0.0f;
    HATTN_RETURN_IF_ERROR(cuda::Event::elapsed_ms(events_[i - 1], events_[i], &ms));
    const double s = static_cast<double>(ms) * 1e-3;
    if (times == nullptr) continue;
    switch (stages_[i]) {
      case Stage::kGemm: times->gemm_s += s; break;
      case Stage::kAttention: times->attention_s += s; break;
      case Stage::kCopies: times->copies_s += s; break;
      case Stage::kMerge: times->merge_s += s; break;
      case Stage::kOther: times->other_s += s; break;
    }
  }
  used_ = 0;
  return Status::ok();
}

// ---------------------------------------------------------------- scratch

Status CudaStageScratch::reserve(const CudaLlamaModel& model, std::int64_t max_tokens) noexcept {
  if (!model.created())
    return {StatusCode::kInvalidArgument, "CudaStageScratch: model not created"};
  if (max_tokens <= 0 || max_tokens > kInt32Max)
    return {StatusCode::kInvalidArgument, "CudaStageScratch: max_tokens out of range"};
  if (model_ == &model && capacity_ >= max_tokens) return Status::ok();
  const LlamaConfig& c = model.config();
  const auto t = static_cast<std::size_t>(max_tokens);
  const auto widest = static_cast<std::size_t>(
      std::max({std::int64_t{c.hidden_size}, c.q_dim(), std::int64_t{c.intermediate_size}}));
  capacity_ = 0;
  model_ = nullptr;
  HATTN_RETURN_IF_ERROR(act_.allocate(t * widest * size_of(model.weight_dtype())));
  HATTN_RETURN_IF_ERROR(
      qkv_.allocate(t * static_cast<std::size_t>(c.q_dim() + 2 * c.kv_dim()) * sizeof(float)));
  HATTN_RETURN_IF_ERROR(
      gu_.allocate(t * 2 * static_cast<std::size_t>(c.intermediate_size) * sizeof(float)));
  capacity_ = max_tokens;
  model_ = &model;
  generation_ = model.generation_;
  return Status::ok();
}

// ---------------------------------------------------------------- model

CudaLlamaModel::~CudaLlamaModel() { reset(); }

CudaLlamaModel::CudaLlamaModel(CudaLlamaModel&& o) noexcept
    : config_(o.config_),
      device_(o.device_),
      weight_dtype_(o.weight_dtype_),
      generation_(std::exchange(o.generation_, 0)),
      handle_(std::exchange(o.handle_, nullptr)),
      embedding_(std::move(o.embedding_)),
      lm_head_(std::move(o.lm_head_)),
      final_norm_(std::move(o.final_norm_)),
      inv_freq_(std::move(o.inv_freq_)),
      error_word_(std::move(o.error_word_)),
      layers_(std::move(o.layers_)),
      device_bytes_(std::exchange(o.device_bytes_, 0)) {}

CudaLlamaModel& CudaLlamaModel::operator=(CudaLlamaModel&& o) noexcept {
  if (this != &o) {
    reset();
    config_ = o.config_;
    device_ = o.device_;
    weight_dtype_ = o.weight_dtype_;
    generation_ = std::exchange(o.generation_, 0);
    handle_ = std::exchange(o.handle_, nullptr);
    embedding_ = std::move(o.embedding_);
    lm_head_ = std::move(o.lm_head_);
    final_norm_ = std::move(o.final_norm_);
    inv_freq_ = std::move(o.inv_freq_);
    error_word_ = std::move(o.error_word_);
    layers_ = std::move(o.layers_);
    device_bytes_ = std::exchange(o.device_bytes_, 0);
  }
  return *this;
}

void CudaLlamaModel::reset() noexcept {
  if (handle_ != nullptr) (void)cublasDestroy(handle_);
  handle_ = nullptr;
  layers_.clear();
  embedding_.reset();
  lm_head_.reset();
  final_norm_.reset();
  inv_freq_.reset();
  error_word_.reset();
  device_bytes_ = 0;
}

Status CudaLlamaModel::create(const LlamaModel& host, int device, CudaLlamaModel* out,
                              const CudaModelOptions& options) noexcept {
  if (out == nullptr) return {StatusCode::kInvalidArgument, "CudaLlamaModel::create: out is null"};
  if (options.weight_dtype != DType::kBF16 && options.weight_dtype != DType::kF32)
    return {StatusCode::kInvalidArgument, "CudaLlamaModel: weight dtype must be bf16 or f32"};
  const LlamaConfig& c = host.config();
  if (c.num_layers <= 0 || c.hidden_size <= 0 || host.final_norm().empty())
    return {StatusCode::kInvalidArgument, "CudaLlamaModel::create: host model is not loaded"};
  // cuBLAS takes 32-bit dimensions.
  if (c.q_dim() + 2 * c.kv_dim() > kInt32Max || 2 * std::int64_t{c.intermediate_size} > kInt32Max)
    return {StatusCode::kNotSupported, "CudaLlamaModel: a weight dimension exceeds 2^31"};
  HATTN_RETURN_IF_ERROR(cuda_check(cudaSetDevice(device), "CudaLlamaModel: cudaSetDevice"));

  try {
    CudaLlamaModel m;
    m.config_ = c;
    m.device_ = device;
    m.weight_dtype_ = options.weight_dtype;
    static std::atomic<std::uint64_t> generations{0};
    m.generation_ = ++generations;
    HATTN_RETURN_IF_ERROR(cublas_check(cublasCreate(&m.handle_), "CudaLlamaModel: cublasCreate"));
    // f32 weights: plain f32 arithmetic (no TF32, which only an explicit math
    // mode or compute type enables); bf16: tensor cores, f32 accumulation.
    HATTN_RETURN_IF_ERROR(cublas_check(cublasSetMathMode(m.handle_, CUBLAS_DEFAULT_MATH),
                                       "CudaLlamaModel: cublasSetMathMode"));
    const DType wd = options.weight_dtype;
    const std::int64_t h = c.hidden_size;
    std::vector<unsigned char> buf;
    const auto weights = [&](cuda::DeviceBuffer& dst, std::initializer_list<const Linear*> parts,
                             const char* what) -> Status {
      buf.clear();
      for (const Linear* l : parts)
        convert_append(l->weight, l->dtype, l->out_features * l->in_features, wd, buf);
      HATTN_RETURN_IF_ERROR(upload(dst, buf.data(), buf.size(), what));
      m.device_bytes_ += buf.size();
      return Status::ok();
    };
    const auto norm = [&](cuda::DeviceBuffer& dst, const std::vector<float>& v,
                          const char* what) -> Status {
      HATTN_RETURN_IF_ERROR(upload(dst, v.data(), v.size() * sizeof(float), what));
      m.device_bytes_ += v.size() * sizeof(float);
      return Status::ok();
    };

    {
      const TensorRef& e = host.embedding();
      const Linear emb{e.data, e.dtype, c.vocab_size, h};
      HATTN_RETURN_IF_ERROR(weights(m.embedding_, {&emb}, "CudaLlamaModel: upload embedding"));
    }
    m.layers_.resize(static_cast<std::size_t>(c.num_layers));
    for (int i = 0; i < c.num_layers; ++i) {
      const LayerWeights& L = host.layer(i);
      Layer& d = m.layers_[static_cast<std::size_t>(i)];
      HATTN_RETURN_IF_ERROR(norm(d.attn_norm, L.attn_norm, "CudaLlamaModel: upload attn norm"));
      HATTN_RETURN_IF_ERROR(norm(d.mlp_norm, L.mlp_norm, "CudaLlamaModel: upload mlp norm"));
      HATTN_RETURN_IF_ERROR(weights(d.qkv, {&L.q, &L.k, &L.v}, "CudaLlamaModel: upload qkv"));
      HATTN_RETURN_IF_ERROR(weights(d.o, {&L.o}, "CudaLlamaModel: upload o_proj"));
      HATTN_RETURN_IF_ERROR(weights(d.gate_up, {&L.gate, &L.up}, "CudaLlamaModel: upload gate/up"));
      HATTN_RETURN_IF_ERROR(weights(d.down, {&L.down}, "CudaLlamaModel: upload down_proj"));
    }
    HATTN_RETURN_IF_ERROR(norm(m.final_norm_, host.final_norm(), "CudaLlamaModel: upload norm"));
    if (host.lm_head().weight != host.embedding().data) {
      const Linear& lm = host.lm_head();
      HATTN_RETURN_IF_ERROR(weights(m.lm_head_, {&lm}, "CudaLlamaModel: upload lm_head"));
    }
    const std::vector<double>& inv = host.inv_freq();
    HATTN_RETURN_IF_ERROR(upload(m.inv_freq_, inv.data(), inv.size() * sizeof(double),
                                 "CudaLlamaModel: upload inv_freq"));
    HATTN_RETURN_IF_ERROR(m.error_word_.allocate(sizeof(std::uint32_t)));
    HATTN_RETURN_IF_ERROR(cuda_check(cudaMemset(m.error_word_.data(), 0, sizeof(std::uint32_t)),
                                     "CudaLlamaModel: cudaMemset (error word)"));
    *out = std::move(m);
    return Status::ok();
  } catch (const std::bad_alloc&) {
    return {StatusCode::kOutOfMemory, "CudaLlamaModel::create: out of host memory"};
  }
}

Status CudaLlamaModel::gemm(const void* w, std::int64_t out_features, std::int64_t in_features,
                            const void* x, std::int64_t num_tokens, float* y, float beta,
                            cudaStream_t stream, const char* what) const noexcept {
  // Row-major y[T][out] = x[T][in] W^T is column-major y^T = W x^T with W
  // (row-major [out][in]) read as the transpose of an [in][out] matrix.
  const float alpha = 1.0f;
  const cudaDataType_t t = weight_dtype_ == DType::kBF16 ? CUDA_R_16BF : CUDA_R_32F;
  HATTN_RETURN_IF_ERROR(cublas_check(cublasSetStream(handle_, stream), "cublasSetStream"));
  return cublas_check(
      cublasGemmEx(handle_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out_features),
                   static_cast<int>(num_tokens), static_cast<int>(in_features), &alpha, w, t,
                   static_cast<int>(in_features), x, t, static_cast<int>(in_features), &beta, y,
                   CUDA_R_32F, static_cast<int>(out_features), CUBLAS_COMPUTE_32F,
                   CUBLAS_GEMM_DEFAULT),
      what);
}

Status CudaLlamaModel::check_scratch(const CudaStageScratch& s,
                                     std::int64_t num_tokens) const noexcept {
  if (!created()) return {StatusCode::kInvalidArgument, "CudaLlamaModel: not created"};
  if (s.model_ != this || s.generation_ != generation_)
    return {StatusCode::kInvalidArgument, "CudaStageScratch: not reserved for this model"};
  if (num_tokens < 0 || num_tokens > s.capacity_)
    return {StatusCode::kInvalidArgument, "CudaStageScratch: more tokens than reserved"};
  return Status::ok();
}

Status CudaLlamaModel::embed(const std::int32_t* d_tokens, std::int64_t num_tokens, float* d_x,
                             cudaStream_t stream, CudaStageTimer* timer) const noexcept {
  if (!created()) return {StatusCode::kInvalidArgument, "CudaLlamaModel: not created"};
  if (num_tokens < 0 || num_tokens > kInt32Max)
    return {StatusCode::kInvalidArgument, "CudaLlamaModel::embed: bad token count"};
  if (num_tokens == 0) return Status::ok();
  if (d_tokens == nullptr || d_x == nullptr)
    return {StatusCode::kInvalidArgument, "CudaLlamaModel::embed: null pointer"};
  HATTN_RETURN_IF_ERROR(
      cuda_check(detail::launch_embed(d_tokens, num_tokens, embedding_.data(), weight_dtype_,
                                      config_.vocab_size, config_.hidden_size, d_x,
                                      error_word_.as<std::uint32_t>(), stream),
                 "CudaLlamaModel::embed: embedding kernel"));
  if (timer) timer->mark(stream, Stage::kOther);
  return Status::ok();
}

Status CudaLlamaModel::stage_a(int layer, const float* d_x, std::int64_t num_tokens,
                               const std::int64_t* d_positions, float* d_q, void* d_k, void* d_v,
                               DType kv_dtype, CudaStageScratch& scratch, cudaStream_t stream,
                               CudaStageTimer* timer) const noexcept {
  HATTN_RETURN_IF_ERROR(check_scratch(scratch, num_tokens));
  if (layer < 0 || layer >= config_.num_layers)
    return {StatusCode::kInvalidArgument, "CudaLlamaModel::stage_a: layer out of range"};
  if (num_tokens == 0) return Status::ok();
  if (d_x == nullptr || d_positions == nullptr || d_q == nullptr || d_k == nullptr ||
      d_v == nullptr)
    return {StatusCode::kInvalidArgument, "CudaLlamaModel::stage_a: null pointer"};
  const Layer& L = layers_[static_cast<std::size_t>(layer)];
  const LlamaConfig& c = config_;
  HATTN_RETURN_IF_ERROR(cuda_check(
      detail::launch_rms_norm(d_x, num_tokens, c.hidden_size, L.attn_norm.as<float>(),
                              c.rms_norm_eps, scratch.act_.data(), weight_dtype_, stream),
      "CudaLlamaModel::stage_a: rms_norm kernel"));
  if (timer) timer->mark(stream, Stage::kOther);
  float* qkv = scratch.qkv_.as<float>();
  HATTN_RETURN_IF_ERROR(gemm(L.qkv.data(), c.q_dim() + 2 * c.kv_dim(), c.hidden_size,
                             scratch.act_.data(), num_tokens, qkv, 0.0f, stream,
                             "CudaLlamaModel::stage_a: cublasGemmEx (qkv)"));
  if (timer) timer->mark(stream, Stage::kGemm);
  HATTN_RETURN_IF_ERROR(cuda_check(
      detail::launch_rope_split(qkv, num_tokens, d_positions, inv_freq_.as<double>(), c.num_q_heads,
                                c.num_kv_heads, c.head_dim, d_q, d_k, d_v, kv_dtype, stream),
      "CudaLlamaModel::stage_a: rope kernel"));
  if (timer) timer->mark(stream, Stage::kOther);
  return Status::ok();
}

Status CudaLlamaModel::stage_b(int layer, const float* d_attn, std::int64_t num_tokens, float* d_x,
                               CudaStageScratch& scratch, cudaStream_t stream,
                               CudaStageTimer* timer) const noexcept {
  HATTN_RETURN_IF_ERROR(check_scratch(scratch, num_tokens));
  if (layer < 0 || layer >= config_.num_layers)
    return {StatusCode::kInvalidArgument, "CudaLlamaModel::stage_b: layer out of range"};
  if (num_tokens == 0) return Status::ok();
  if (d_attn == nullptr || d_x == nullptr)
    return {StatusCode::kInvalidArgument, "CudaLlamaModel::stage_b: null pointer"};
  const Layer& L = layers_[static_cast<std::size_t>(layer)];
  const LlamaConfig& c = config_;
  const std::int64_t inter = c.intermediate_size;
  // x += attn Wo^T: the residual is the GEMM's beta = 1.
  const void* attn_in = d_attn;
  if (weight_dtype_ != DType::kF32) {
    HATTN_RETURN_IF_ERROR(
        cuda_check(detail::launch_cast(d_attn, num_tokens * c.q_dim(), scratch.act_.data(),
                                       weight_dtype_, stream),
                   "CudaLlamaModel::stage_b: cast kernel"));
    if (timer) timer->mark(stream, Stage::kOther);
    attn_in = scratch.act_.data();
  }
  HATTN_RETURN_IF_ERROR(gemm(L.o.data(), c.hidden_size, c.q_dim(), attn_in, num_tokens, d_x, 1.0f,
                             stream, "CudaLlamaModel::stage_b: cublasGemmEx (o_proj)"));
  if (timer) timer->mark(stream, Stage::kGemm);
  HATTN_RETURN_IF_ERROR(cuda_check(
      detail::launch_rms_norm(d_x, num_tokens, c.hidden_size, L.mlp_norm.as<float>(),
                              c.rms_norm_eps, scratch.act_.data(), weight_dtype_, stream),
      "CudaLlamaModel::stage_b: rms_norm kernel"));
  if (timer) timer->mark(stream, Stage::kOther);
  float* gu = scratch.gu_.as<float>();
  HATTN_RETURN_IF_ERROR(gemm(L.gate_up.data(), 2 * inter, c.hidden_size, scratch.act_.data(),
                             num_tokens, gu, 0.0f, stream,
                             "CudaLlamaModel::stage_b: cublasGemmEx (gate/up)"));
  if (timer) timer->mark(stream, Stage::kGemm);
  HATTN_RETURN_IF_ERROR(cuda_check(
      detail::launch_silu_mul(gu, num_tokens, inter, scratch.act_.data(), weight_dtype_, stream),
      "CudaLlamaModel::stage_b: silu_mul kernel"));
  if (timer) timer->mark(stream, Stage::kOther);
  HATTN_RETURN_IF_ERROR(gemm(L.down.data(), c.hidden_size, inter, scratch.act_.data(), num_tokens,
                             d_x, 1.0f, stream, "CudaLlamaModel::stage_b: cublasGemmEx (down)"));
  if (timer) timer->mark(stream, Stage::kGemm);
  return Status::ok();
}

Status CudaLlamaModel::logits(const float* d_x, std::int64_t num_tokens, float* d_logits,
                              CudaStageScratch& scratch, cudaStream_t stream,
                              CudaStageTimer* timer) const noexcept {
  HATTN_RETURN_IF_ERROR(check_scratch(scratch, num_tokens));
  if (num_tokens == 0) return Status::ok();
  if (d_x == nullptr || d_logits == nullptr)
    return {StatusCode::kInvalidArgument, "CudaLlamaModel::logits: null pointer"};
  const LlamaConfig& c = config_;
  HATTN_RETURN_IF_ERROR(cuda_check(
      detail::launch_rms_norm(d_x, num_tokens, c.hidden_size, final_norm_.as<float>(),
                              c.rms_norm_eps, scratch.act_.data(), weight_dtype_, stream),
      "CudaLlamaModel::logits: rms_norm kernel"));
  if (timer) timer->mark(stream, Stage::kOther);
  const void* w = lm_head_.data() != nullptr ? lm_head_.data() : embedding_.data();
  HATTN_RETURN_IF_ERROR(gemm(w, c.vocab_size, c.hidden_size, scratch.act_.data(), num_tokens,
                             d_logits, 0.0f, stream, "CudaLlamaModel::logits: cublasGemmEx"));
  if (timer) timer->mark(stream, Stage::kGemm);
  return Status::ok();
}

Status CudaLlamaModel::device_errors(cudaStream_t stream) const noexcept {
  if (!created()) return {StatusCode::kInvalidArgument, "CudaLlamaModel: not created"};
  std::uint32_t word = 0;
  HATTN_RETURN_IF_ERROR(cuda_check(
      cudaMemcpyAsync(&word, error_word_.data(), sizeof(word), cudaMemcpyDeviceToHost, stream),
      "CudaLlamaModel::device_errors: cudaMemcpyAsync"));
  HATTN_RETURN_IF_ERROR(cuda_check(cudaStreamSynchronize(stream),
                                   "CudaLlamaModel::device_errors: cudaStreamSynchronize"));
  if (word == 0) return Status::ok();
  HATTN_RETURN_IF_ERROR(cuda_check(cudaMemsetAsync(error_word_.data(), 0, sizeof(word), stream),
                                   "CudaLlamaModel::device_errors: cudaMemsetAsync"));
  return {StatusCode::kInvalidArgument, "CudaLlamaModel::embed: token id outside the vocabulary"};
}

}  // namespace hattn::model
