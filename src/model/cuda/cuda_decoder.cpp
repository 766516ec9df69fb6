// CudaDenseDecoder: paged device KV caches, the per-step page table upload
// and the layer loop of CudaLlamaModel stages around cuda::DenseDecode.

#include "hattn/model/cuda_decoder.hpp"

#include <algorithm>
#include <cstring>
#include <new>

#include "hattn/core/kv_view.hpp"
#include "hattn/core/problem.hpp"
#include "hattn/model/attention.hpp"
#include "model/cuda/kernels.hpp"

namespace hattn::model {
namespace {

using Stage = CudaStageTimer::Stage;

using detail::cuda_check;

// The host half of one upload in the staging buffer (tokens, positions, KV
// slots, page table), filled a row at a time.
struct StagedRows {
  std::int32_t* tok;
  std::int64_t* pos;
  std::int64_t* slot;
  std::int32_t* indptr;
  std::int32_t* indices;
  std::int32_t* lpl;
  std::int32_t at = 0;

  // Row i: `token` at position p of the sequence whose pages start at
  // first_page; it sees positions [0, p]. Returns that length, p + 1.
  std::int64_t add(std::int64_t i, std::int32_t token, std::int64_t p, std::int64_t first_page,
                   std::int32_t page) noexcept {
    if (i == 0) indptr[0] = at = 0;
    tok[i] = token;
    pos[i] = p;
    slot[i] = (first_page + p / page) * page + p % page;
    const std::int64_t visible = p + 1;
    const std::int64_t pages = (visible + page - 1) / page;
    for (std::int64_t j = 0; j < pages; ++j)
      indices[at++] = static_cast<std::int32_t>(first_page + j);
    indptr[i + 1] = at;
    lpl[i] = static_cast<std::int32_t>(visible - (pages - 1) * page);
    return visible;
  }
};

template <class Upload>
StagedRows staged_rows(void* staging, const Upload& up) noexcept {
  auto* h = static_cast<unsigned char*>(staging);
  return {reinterpret_cast<std::int32_t*>(h + up.tokens),
          reinterpret_cast<std::int64_t*>(h + up.positions),
          reinterpret_cast<std::int64_t*>(h + up.slots),
          reinterpret_cast<std::int32_t*>(h + up.indptr),
          reinterpret_cast<std::int32_t*>(h + up.indices),
          reinterpret_cast<std::int32_t*>(h + up.last_page_len)};
}

std::size_t align256(std::size_t x) noexcept { return (x + 255) / 256 * 256; }

}  // namespace

CudaDenseDecoder::Upload CudaDenseDecoder::layout(std::int64_t n, std::int64_t nnz) const noexcept {
  Upload u;
  const auto un = static_cast<std::size_t>(n);
  std::size_t at = 0;
  u.tokens = at;
  at = align256(at + un * sizeof(std::int32_t));
  u.positions = at;
  at = align256(at + un * sizeof(std::int64_t));
  u.slots = at;
  at = align256(at + un * sizeof(std::int64_t));
  u.indptr = at;
  at = align256(at + (un + 1) * sizeof(std::int32_t));
  u.last_page_len = at;
  at = align256(at + un * sizeof(std::int32_t));
  u.indices = at;
  at = align256(at + static_cast<std::size_t>(nnz) * sizeof(std::int32_t));
  u.bytes = at;
  return u;
}

Status CudaDenseDecoder::create(const CudaLlamaModel& model, const CudaDenseDecoderOptions& o,
                                CudaDenseDecoder* out) noexcept {
  if (out == nullptr)
    return {StatusCode::kInvalidArgument, "CudaDenseDecoder::create: out is null"};
  if (!model.created())
    return {StatusCode::kInvalidArgument, "CudaDenseDecoder::create: model not created"};
  if (o.num_sequences <= 0 || o.max_seq_len <= 0 || o.max_prefill_tokens <= 0 || o.page_size <= 0)
    return {StatusCode::kInvalidArgument, "CudaDenseDecoder: sizes must be positive"};
  const LlamaConfig& c = model.config();
  const std::int64_t pps = (o.max_seq_len + o.page_size - 1) / o.page_size;
  const std::int64_t num_pages = pps * o.num_sequences;
  // Page indices and indptr are 32-bit; every query of a prefill chunk may
  // list all pages of its sequence.
  const std::int64_t n_max = std::max(o.num_sequences, o.max_prefill_tokens);
  if (num_pages > 0x7fffffff || n_max * pps > 0x7fffffff)
    return {StatusCode::kNotSupported, "CudaDenseDecoder: page table beyond 32-bit indices"};
  HATTN_RETURN_IF_ERROR(cuda::DenseDecode::can_implement(
      decode_problem(c, static_cast<std::int32_t>(n_max), o.kv_dtype)));
  HATTN_RETURN_IF_ERROR(
      cuda_check(cudaSetDevice(model.device()), "CudaDenseDecoder: cudaSetDevice"));

  try {
    CudaDenseDecoder d;
    d.model_ = &model;
    d.opt_ = o;
    d.pages_per_seq_ = pps;
    d.layer_bytes_ = static_cast<std::size_t>(num_pages) * static_cast<std::size_t>(o.page_size) *
                     static_cast<std::size_t>(c.kv_dim()) * size_of(o.kv_dtype);
    HATTN_RETURN_IF_ERROR(d.stream_.create());
    HATTN_RETURN_IF_ERROR(cuda::DenseDecode::for_device(model.device(), &d.backend_));
    d.pages_.resize(2 * static_cast<std::size_t>(c.num_layers));
    for (cuda::DeviceBuffer& b : d.pages_) HATTN_RETURN_IF_ERROR(b.allocate(d.layer_bytes_));

    const auto un = static_cast<std::size_t>(n_max);
    const auto f4 = sizeof(float);
    HATTN_RETURN_IF_ERROR(d.x_.allocate(un * static_cast<std::size_t>(c.hidden_size) * f4));
    HATTN_RETURN_IF_ERROR(d.q_.allocate(un * static_cast<std::size_t>(c.q_dim()) * f4));
    HATTN_RETURN_IF_ERROR(d.o_.allocate(un * static_cast<std::size_t>(c.q_dim()) * f4));
    const std::size_t kv_row = static_cast<std::size_t>(c.kv_dim()) * size_of(o.kv_dtype);
    HATTN_RETURN_IF_ERROR(d.k_new_.allocate(un * kv_row));
    HATTN_RETURN_IF_ERROR(d.v_new_.allocate(un * kv_row));
    HATTN_RETURN_IF_ERROR(d.lse2_.allocate(un * static_cast<std::size_t>(c.num_q_heads) * f4));
    const std::size_t logits_bytes =
        static_cast<std::size_t>(o.num_sequences) * static_cast<std::size_t>(c.vocab_size) * f4;
    HATTN_RETURN_IF_ERROR(d.logits_.allocate(logits_bytes));
    HATTN_RETURN_IF_ERROR(d.logits_host_.allocate(logits_bytes));
    // The workspace of DenseDecode is not monotone in the batch size: take
    // the largest over every batch a call can use.
    std::size_t ws = 0;
    for (std::int64_t b = 1; b <= n_max; ++b)
      ws = std::max(ws, cuda::DenseDecode::workspace_size(
                            decode_problem(c, static_cast<std::int32_t>(b), o.kv_dtype)));
    HATTN_RETURN_IF_ERROR(d.workspace_.allocate(ws));
    HATTN_RETURN_IF_ERROR(cuda_check(cudaMemset(d.workspace_.data(), 0, ws),
                                     "CudaDenseDecoder: cudaMemset (workspace)"));
    const Upload up = d.layout(n_max, n_max * pps);
    HATTN_RETURN_IF_ERROR(d.staging_.allocate(up.bytes));
    HATTN_RETURN_IF_ERROR(d.d_staging_.allocate(up.bytes));
    HATTN_RETURN_IF_ERROR(d.scratch_.reserve(model, n_max));
    if (o.timing)
      HATTN_RETURN_IF_ERROR(d.timer_.reserve(12 * static_cast<std::size_t>(c.num_layers) + 16));
    d.lens_.assign(static_cast<std::size_t>(o.num_sequences), 0);
    d.plan_lens_.reserve(un);
    *out = std::move(d);
    return Status::ok();
  } catch (const std::bad_alloc&) {
    return {StatusCode::kOutOfMemory, "CudaDenseDecoder::create: out of host memory"};
  }
}

std::int64_t CudaDenseDecoder::seq_len(int seq) const noexcept {
  if (seq < 0 || seq >= opt_.num_sequences) return -1;
  return lens_[static_cast<std::size_t>(seq)];
}

std::size_t CudaDenseDecoder::kv_bytes() const noexcept {
  if (model_ == nullptr) return 0;
  const LlamaConfig& c = model_->config();
  const std::size_t page_bytes = static_cast<std::size_t>(opt_.page_size) *
                                 static_cast<std::size_t>(c.kv_dim()) * size_of(opt_.kv_dtype);
  std::size_t pages = 0;
  for (const std::int64_t len : lens_)
    pages += static_cast<std::size_t>((len + opt_.page_size - 1) / opt_.page_size);
  return 2 * pages * page_bytes * static_cast<std::size_t>(c.num_layers);
}

std::size_t CudaDenseDecoder::buffer_bytes() const noexcept {
  return x_.size() + q_.size() + o_.size() + k_new_.size() + v_new_.size() + lse2_.size() +
         logits_.size() + workspace_.size() + d_staging_.size() + scratch_.bytes();
}

// On failure: wait for whatever was enqueued and drop the round's timing, so
// the next call starts from an idle stream.
Status CudaDenseDecoder::finish(Status s) noexcept {
  if (!s) {
    (void)cudaStreamSynchronize(stream_.get());
    (void)cudaGetLastError();
    (void)timer_.collect(nullptr);
  }
  return s;
}

// The body shared by prefill chunks and decode steps. The staging buffer
// holds n tokens, positions, KV slots and the page table of attn_batch
// queries (host_lens: their lengths); logits of rows [logits_row,
// logits_row + logits_rows) go to logits_host when it is not null.
Status CudaDenseDecoder::run_tokens(std::int64_t n, const Upload& up, const std::int64_t* host_lens,
                                    std::int32_t attn_batch, std::int64_t logits_row,
                                    std::int64_t logits_rows, float* logits_host) noexcept {
  const LlamaConfig& c = model_->config();
  const cudaStream_t s = stream_.get();
  CudaStageTimer* timer = opt_.timing ? &timer_ : nullptr;
  if (timer) HATTN_RETURN_IF_ERROR(timer->start(s));

  HATTN_RETURN_IF_ERROR(cuda_check(
      cudaMemcpyAsync(d_staging_.data(), staging_.data(), up.bytes, cudaMemcpyHostToDevice, s),
      "CudaDenseDecoder: cudaMemcpyAsync (tokens, page table)"));
  if (timer) timer->mark(s, Stage::kCopies);
  auto* base = static_cast<unsigned char*>(d_staging_.data());
  const auto* d_tokens = reinterpret_cast<const std::int32_t*>(base + up.tokens);
  const auto* d_positions = reinterpret_cast<const std::int64_t*>(base + up.positions);
  const auto* d_slots = reinterpret_cast<const std::int64_t*>(base + up.slots);

  const DecodeProblem problem = decode_problem(c, attn_batch, opt_.kv_dtype);
  cuda::DecodePlan plan;
  HATTN_RETURN_IF_ERROR(backend_.plan(problem,
                                      std::span(host_lens, static_cast<std::size_t>(attn_batch)),
                                      workspace_.data(), workspace_.size(), &plan));
  PagedKvView kv{};
  kv.dtype = opt_.kv_dtype;
  kv.num_kv_heads = c.num_kv_heads;
  kv.head_dim = c.head_dim;
  kv.page_size = opt_.page_size;
  kv.num_pages = pages_per_seq_ * opt_.num_sequences;
  kv.k_strides = packed_strides(KvLayout::kHND, opt_.page_size, c.num_kv_heads, c.head_dim);
  kv.v_strides = kv.k_strides;
  kv.batch_size = attn_batch;
  kv.indptr = reinterpret_cast<const std::int32_t*>(base + up.indptr);
  kv.indices = reinterpret_cast<const std::int32_t*>(base + up.indices);
  kv.last_page_len = reinterpret_cast<const std::int32_t*>(base + up.last_page_len);
  const QueryView qv =
      make_query_view(q_.data(), DType::kF32, attn_batch, c.num_q_heads, c.head_dim);
  const PartialView ov = make_partial_view(o_.data(), DType::kF32, lse2_.as<float>(), attn_batch,
                                           c.num_q_heads, c.head_dim);

  float* x = x_.as<float>();
  HATTN_RETURN_IF_ERROR(model_->embed(d_tokens, n, x, s, timer));
  for (int l = 0; l < c.num_layers; ++l) {
    void* k_pages = pages_[2 * static_cast<std::size_t>(l)].data();
    void* v_pages = pages_[2 * static_cast<std::size_t>(l) + 1].data();
    HATTN_RETURN_IF_ERROR(model_->stage_a(l, x, n, d_positions, q_.as<float>(), k_new_.data(),
                                          v_new_.data(), opt_.kv_dtype, scratch_, s, timer));
    HATTN_RETURN_IF_ERROR(cuda_check(
        detail::launch_append_paged(k_new_.data(), v_new_.data(), n, d_slots, c.num_kv_heads,
                                    c.head_dim, opt_.page_size, k_pages, v_pages, opt_.kv_dtype, s),
        "CudaDenseDecoder: append kernel"));
    if (timer) timer->mark(s, Stage::kCopies);
    kv.k = k_pages;
    kv.v = v_pages;
    HATTN_RETURN_IF_ERROR(backend_.run(plan, qv, kv, ov, s));
    if (timer) timer->mark(s, Stage::kAttention);
    HATTN_RETURN_IF_ERROR(model_->stage_b(l, o_.as<float>(), n, x, scratch_, s, timer));
  }
  if (logits_host != nullptr && logits_rows > 0) {
    HATTN_RETURN_IF_ERROR(model_->logits(x + logits_row * c.hidden_size, logits_rows,
                                         logits_.as<float>(), scratch_, s, timer));
    const std::size_t bytes =
        static_cast<std::size_t>(logits_rows) * static_cast<std::size_t>(c.vocab_size) * 4;
    HATTN_RETURN_IF_ERROR(cuda_check(
        cudaMemcpyAsync(logits_host_.data(), logits_.data(), bytes, cudaMemcpyDeviceToHost, s),
        "CudaDenseDecoder: cudaMemcpyAsync (logits)"));
    if (timer) timer->mark(s, Stage::kCopies);
  }
  if (timer) HATTN_RETURN_IF_ERROR(timer->collect(&times_));
  HATTN_RETURN_IF_ERROR(
      cuda_check(cudaStreamSynchronize(s), "CudaDenseDecoder: cudaStreamSynchronize"));
  HATTN_RETURN_IF_ERROR(cuda::DenseDecode::device_errors(plan, s));
  HATTN_RETURN_IF_ERROR(model_->device_errors(s));
  if (logits_host != nullptr && logits_rows > 0)
    std::memcpy(logits_host, logits_host_.data(),
                static_cast<std::size_t>(logits_rows) * static_cast<std::size_t>(c.vocab_size) *
                    sizeof(float));
  return Status::ok();
}

Status CudaDenseDecoder::prefill(
    int seq, std::span<const std::int32_t> tokens, std::int64_t chunk, float* last_logits,
    const std::function<void(std::int64_t, std::int64_t)>& on_chunk) noexcept {
  if (model_ == nullptr) return {StatusCode::kInvalidArgument, "CudaDenseDecoder: not created"};
  if (seq < 0 || seq >= opt_.num_sequences)
    return {StatusCode::kInvalidArgument, "CudaDenseDecoder::prefill: sequence out of range"};
  if (tokens.empty())
    return {StatusCode::kInvalidArgument, "CudaDenseDecoder::prefill: empty prompt"};
  if (chunk <= 0)
    return {StatusCode::kInvalidArgument, "CudaDenseDecoder::prefill: chunk must be positive"};
  const LlamaConfig& c = model_->config();
  for (const std::int32_t t : tokens)
    if (t < 0 || t >= c.vocab_size)
      return {StatusCode::kInvalidArgument,
              "CudaDenseDecoder::prefill: token id outside the vocabulary"};
  const auto total = static_cast<std::int64_t>(tokens.size());
  std::int64_t& len = lens_[static_cast<std::size_t>(seq)];
  if (len + total > opt_.max_seq_len)
    return {StatusCode::kOutOfMemory, "CudaDenseDecoder::prefill: longer than max_seq_len"};
  HATTN_RETURN_IF_ERROR(
      cuda_check(cudaSetDevice(model_->device()), "CudaDenseDecoder: cudaSetDevice"));
  chunk = std::min<std::int64_t>(chunk, opt_.max_prefill_tokens);
  const std::int32_t page = opt_.page_size;
  for (std::int64_t done = 0; done < total; done += chunk) {
    const std::int64_t n = std::min(chunk, total - done);
    const std::int64_t start = len;
    // Query i sees keys [0, start + i]: pages [0, ceil((start + i + 1) / P)).
    std::int64_t nnz = 0;
    for (std::int64_t i = 0; i < n; ++i) nnz += (start + i + 1 + page - 1) / page;
    const Upload up = layout(n, nnz);
    StagedRows rows = staged_rows(staging_.data(), up);
    const std::int64_t first_page = std::int64_t{seq} * pages_per_seq_;
    plan_lens_.resize(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i)
      plan_lens_[static_cast<std::size_t>(i)] =
          rows.add(i, tokens[static_cast<std::size_t>(done + i)], start + i, first_page, page);
    const bool last = done + n == total;
    HATTN_RETURN_IF_ERROR(finish(run_tokens(n, up, plan_lens_.data(), static_cast<std::int32_t>(n),
                                            n - 1, 1, last ? last_logits : nullptr)));
    len += n;
    if (on_chunk) {
      try {
        on_chunk(done + n, total);
      } catch (...) {
        return {
            StatusCode::kInternal,
            "CudaDenseDecoder::prefill: on_chunk threw (the chunks run so far stay in the cache)"};
      }
    }
  }
  return Status::ok();
}

Status CudaDenseDecoder::decode_step(std::span<const std::int32_t> tokens, float* logits) noexcept {
  if (model_ == nullptr) return {StatusCode::kInvalidArgument, "CudaDenseDecoder: not created"};
  const LlamaConfig& c = model_->config();
  const std::int32_t batch = opt_.num_sequences;
  if (tokens.size() != static_cast<std::size_t>(batch))
    return {StatusCode::kInvalidArgument, "CudaDenseDecoder::decode_step: one token per sequence"};
  if (logits == nullptr)
    return {StatusCode::kInvalidArgument, "CudaDenseDecoder::decode_step: logits is null"};
  for (std::int32_t b = 0; b < batch; ++b) {
    const std::int32_t t = tokens[static_cast<std::size_t>(b)];
    if (t < 0 || t >= c.vocab_size)
      return {StatusCode::kInvalidArgument,
              "CudaDenseDecoder::decode_step: token id outside the vocabulary"};
    if (lens_[static_cast<std::size_t>(b)] + 1 > opt_.max_seq_len)
      return {StatusCode::kOutOfMemory, "CudaDenseDecoder::decode_step: longer than max_seq_len"};
  }
  HATTN_RETURN_IF_ERROR(
      cuda_check(cudaSetDevice(model_->device()), "CudaDenseDecoder: cudaSetDevice"));
  const std::int32_t page = opt_.page_size;
  std::int64_t nnz = 0;
  for (const std::int64_t len : lens_) nnz += (len + 1 + page - 1) / page;
  const Upload up = layout(batch, nnz);
  StagedRows rows = staged_rows(staging_.data(), up);
  plan_lens_.resize(static_cast<std::size_t>(batch));
  for (std::int32_t b = 0; b < batch; ++b)
    plan_lens_[static_cast<std::size_t>(b)] =
        rows.add(b, tokens[static_cast<std::size_t>(b)], lens_[static_cast<std::size_t>(b)],
                 std::int64_t{b} * pages_per_seq_, page);
  HATTN_RETURN_IF_ERROR(finish(run_tokens(batch, up, plan_lens_.data(), batch, 0, batch, logits)));
  for (std::int64_t& len : lens_) ++len;
  return Status::ok();
}

Status CudaDenseDecoder::synthetic_prefill(std::int64_t len, std::uint64_t seed) noexcept {
  if (model_ == nullptr) return {StatusCode::kInvalidArgument, "CudaDenseDecoder: not created"};
  if (len < 0)
    return {StatusCode::kInvalidArgument, "CudaDenseDecoder::synthetic_prefill: negative length"};
  for (const std::int64_t l : lens_)
    if (l + len > opt_.max_seq_len)
      return {StatusCode::kOutOfMemory,
              "CudaDenseDecoder::synthetic_prefill: longer than max_seq_len"};
  HATTN_RETURN_IF_ERROR(
      cuda_check(cudaSetDevice(model_->device()), "CudaDenseDecoder: cudaSetDevice"));
  const LlamaConfig& c = model_->config();
  const cudaStream_t s = stream_.get();
  CudaStageTimer* timer = opt_.timing ? &timer_ : nullptr;
  if (timer) HATTN_RETURN_IF_ERROR(timer->start(s));
  const auto run = [&]() -> Status {
    for (int l = 0; l < c.num_layers; ++l) {
      for (std::int32_t b = 0; b < opt_.num_sequences; ++b) {
        const std::uint64_t key = seed * 0x9E3779B97F4A7C15ULL +
                                  static_cast<std::uint64_t>(l) * 0x100000001B3ULL +
                                  static_cast<std::uint64_t>(b) * 0xD1B54A32D192ED03ULL;
        HATTN_RETURN_IF_ERROR(cuda_check(
            detail::launch_fill_uniform_paged(pages_[2 * static_cast<std::size_t>(l)].data(),
                                              pages_[2 * static_cast<std::size_t>(l) + 1].data(),
                                              opt_.kv_dtype, std::int64_t{b} * pages_per_seq_,
                                              lens_[static_cast<std::size_t>(b)], len,
                                              c.num_kv_heads, c.head_dim, opt_.page_size, key, s),
            "CudaDenseDecoder::synthetic_prefill: fill kernel"));
      }
    }
    if (timer) {
      timer->mark(s, Stage::kCopies);
      HATTN_RETURN_IF_ERROR(timer->collect(&times_));
    }
    return cuda_check(cudaStreamSynchronize(s), "CudaDenseDecoder: cudaStreamSynchronize");
  };
  HATTN_RETURN_IF_ERROR(finish(run()));
  for (std::int64_t& l : lens_) l += len;
  return Status::ok();
}

}  // namespace hattn::model
