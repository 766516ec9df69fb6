#include <algorithm>
#include <optional>
#include <stdexcept>

#include "hattn/model/attention.hpp"
#include "model/causal_table.hpp"

namespace hattn::model {

namespace {

const DenseKvAttentionOptions& checked(const DenseKvAttentionOptions& o) {
  if (o.num_sequences <= 0 || o.max_seq_len <= 0 || o.page_size <= 0 || o.max_prefill_tokens <= 0)
    throw std::invalid_argument("DenseKvAttention: sizes must be positive");
  return o;
}

PagePoolOptions pool_options(const LlamaConfig& config, const DenseKvAttentionOptions& o) {
  const std::int64_t pages_per_seq = (o.max_seq_len + o.page_size - 1) / o.page_size;
  return {.dtype = o.kv_dtype,
          .num_kv_heads = config.num_kv_heads,
          .head_dim = config.head_dim,
          .page_size = o.page_size,
          .num_pages = pages_per_seq * o.num_sequences,
          .layout = KvLayout::kHND,
          .prefault = true};  // decode steps must not pay first-touch faults
}

}  // namespace

DenseKvAttention::DenseKvAttention(const LlamaConfig& config,
                                   const DenseKvAttentionOptions& options,
                                   const CpuExecutor& executor, CpuIsa isa)
    : config_(config),
      opt_(checked(options)),
      executor_(&executor),
      backend_(isa, options.precision),
      cache_(config.num_layers, pool_options(config, options)) {
  for (std::int32_t s = 0; s < opt_.num_sequences; ++s) {
    std::int32_t seq = 0;
    if (!cache_.add_sequence(&seq)) throw std::invalid_argument("DenseKvAttention: add_sequence");
  }
  const DecodeProblem problem =
      decode_problem(config, std::max(opt_.num_sequences, opt_.max_prefill_tokens), opt_.kv_dtype);
  workspace_.resize(cpu::DenseDecode::workspace_size(problem));
  lse_scratch_.resize(static_cast<std::size_t>(problem.batch_size) * config.num_q_heads);
}

std::int64_t DenseKvAttention::seq_len(int layer, int seq) const noexcept {
  if (layer < 0 || layer >= config_.num_layers || seq < 0 || seq >= opt_.num_sequences) return -1;
  return cache_.seq_len(layer, seq);
}

Status DenseKvAttention::append(int layer, int seq, const float* k, const float* v,
                                std::int64_t n) {
  if (layer < 0 || layer >= config_.num_layers || seq < 0 || seq >= opt_.num_sequences)
    return {StatusCode::kInvalidArgument, "layer or sequence out of range"};
  if (n < 0) return {StatusCode::kInvalidArgument, "negative token count"};
  if (seq_len(layer, seq) + n > opt_.max_seq_len)
    return {StatusCode::kOutOfMemory, "sequence longer than the KV cache's max_seq_len"};
  if (opt_.kv_dtype == DType::kF32) return cache_.append(layer, seq, k, v, n);
  const std::int64_t count = n * config_.kv_dim();
  const std::size_t es = size_of(opt_.kv_dtype);
  staging_.resize(2 * static_cast<std::size_t>(count) * es);
  std::byte* kd = staging_.data();
  std::byte* vd = staging_.data() + static_cast<std::size_t>(count) * es;
  for (std::int64_t i = 0; i < count; ++i) {
    store_from_float(kd, opt_.kv_dtype, i, k[i]);
    store_from_float(vd, opt_.kv_dtype, i, v[i]);
  }
  return cache_.append(layer, seq, kd, vd, n);
}

Status DenseKvAttention::decode(int layer, std::span<const std::int32_t> seqs, const float* q,
                                float* o, float* lse2) {
  if (layer < 0 || layer >= config_.num_layers)
    return {StatusCode::kInvalidArgument, "layer out of range"};
  batch_ids_.clear();
  for (std::int32_t s : seqs) {
    if (s < 0 || s >= opt_.num_sequences)
      return {StatusCode::kInvalidArgument, "sequence out of range"};
    batch_ids_.push_back(id(layer, s));
  }
  const auto batch = static_cast<std::int32_t>(seqs.size());
  if (batch > std::max(opt_.num_sequences, opt_.max_prefill_tokens))
    return {StatusCode::kInvalidArgument, "batch larger than the attention was sized for"};
  HATTN_RETURN_IF_ERROR(pool(layer).build_page_table(batch_ids_, &table_));
  return attend(pool(layer).view(table_), batch, q, o, lse2);
}

Status DenseKvAttention::attend(const PagedKvView& kv, std::int32_t batch, const float* q, float* o,
                                float* lse2) {
  const DecodeProblem problem = decode_problem(config_, batch, opt_.kv_dtype);
  cpu::DecodePlan plan;
  HATTN_RETURN_IF_ERROR(backend_.plan(problem, kv, workspace_.data(), workspace_.size(), &plan));
  const QueryView qv =
      make_query_view(q, DType::kF32, batch, config_.num_q_heads, config_.head_dim);
  const PartialView out =
      make_partial_view(o, DType::kF32, lse2, batch, config_.num_q_heads, config_.head_dim);
  return backend_.run(plan, qv, kv, out, *executor_);
}

Status DenseKvAttention::prefill(int layer, int seq, const float* q, std::int64_t n, float* o) {
  if (layer < 0 || layer >= config_.num_layers || seq < 0 || seq >= opt_.num_sequences)
    return {StatusCode::kInvalidArgument, "layer or sequence out of range"};
  const std::int64_t len = seq_len(layer, seq);
  if (n <= 0 || n > len) return {StatusCode::kInvalidArgument, "prefill: bad token count"};
  const HostPagePool& pool = this->pool(layer);
  const HostPagePool::SeqId sid = id(layer, seq);
  PageTable whole;
  HATTN_RETURN_IF_ERROR(pool.build_page_table(std::span(&sid, 1), &whole));
  // Causal prefill as a decode batch (model/causal_table.hpp).
  const std::int64_t max_batch = std::max(opt_.num_sequences, opt_.max_prefill_tokens);
  for (std::int64_t first = 0; first < n; first += max_batch) {
    const auto batch = static_cast<std::int32_t>(std::min(max_batch, n - first));
    detail::causal_prefix_table(whole, opt_.page_size, len - n + first + 1, batch, &table_);
    HATTN_RETURN_IF_ERROR(attend(pool.view(table_), batch, q + first * config_.q_dim(),
                                 o + first * config_.q_dim(), lse_scratch_.data()));
  }
  return Status::ok();
}

std::size_t DenseKvAttention::kv_bytes() const noexcept {
  std::size_t total = 0;
  for (std::int32_t l = 0; l < cache_.num_layers(); ++l) {
    std::int64_t pages = 0;
    for (std::int32_t s = 0; s < cache_.num_sequences(); ++s)
      pages += (cache_.seq_len(l, s) + opt_.page_size - 1) / opt_.page_size;
    total += 2 * static_cast<std::size_t>(pages) * cache_.pool(l).page_bytes();  // K and V
  }
  return total;
}

}  // namespace hattn::model
