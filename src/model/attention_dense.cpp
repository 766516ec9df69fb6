#include <algorithm>
#include <optional>
#include <stdexcept>

#include "hattn/model/attention.hpp"

namespace hattn::model {

DenseKvAttention::DenseKvAttention(const LlamaConfig& config,
                                   const DenseKvAttentionOptions& options,
                                   const CpuExecutor& executor, CpuIsa isa)
    : config_(config), opt_(options), executor_(&executor), backend_(isa, options.precision) {
  if (opt_.num_sequences <= 0 || opt_.max_seq_len <= 0 || opt_.page_size <= 0 ||
      opt_.max_prefill_tokens <= 0)
    throw std::invalid_argument("DenseKvAttention: sizes must be positive");
  const std::int64_t pages_per_seq = (opt_.max_seq_len + opt_.page_size - 1) / opt_.page_size;
  const PagePoolOptions pool{.dtype = opt_.kv_dtype,
                             .num_kv_heads = config.num_kv_heads,
                             .head_dim = config.head_dim,
                             .page_size = opt_.page_size,
                             .num_pages = pages_per_seq * opt_.num_sequences,
                             .layout = KvLayout::kHND};
  pools_.reserve(static_cast<std::size_t>(config.num_layers));
  seqs_.resize(static_cast<std::size_t>(config.num_layers));
  for (std::int32_t l = 0; l < config.num_layers; ++l) {
    pools_.emplace_back(pool);
    for (std::int32_t s = 0; s < opt_.num_sequences; ++s) {
      HostPagePool::SeqId id = 0;
      if (!pools_.back().create_sequence(&id)) throw std::invalid_argument("create_sequence");
      seqs_[static_cast<std::size_t>(l)].push_back(id);
    }
  }
  const DecodeProblem problem{.batch_size = std::max(opt_.num_sequences, opt_.max_prefill_tokens),
                              .num_q_heads = config.num_q_heads,
                              .num_kv_heads = config.num_kv_heads,
                              .head_dim = config.head_dim,
                              .kv_dtype = opt_.kv_dtype,
                              .q_dtype = DType::kF32,
                              .o_dtype = DType::kF32,
                              .sm_scale = std::nullopt};
  workspace_.resize(cpu::DenseDecode::workspace_size(problem));
  lse_scratch_.resize(static_cast<std::size_t>(problem.batch_size) * config.num_q_heads);
}

std::int64_t DenseKvAttention::seq_len(int layer, int seq) const noexcept {
  if (layer < 0 || layer >= config_.num_layers || seq < 0 || seq >= opt_.num_sequences) return -1;
  return pools_[static_cast<std::size_t>(layer)].seq_len(
      seqs_[static_cast<std::size_t>(layer)][static_cast<std::size_t>(seq)]);
}

Status DenseKvAttention::append(int layer, int seq, const float* k, const float* v,
                                std::int64_t n) {
  if (layer < 0 || layer >= config_.num_layers || seq < 0 || seq >= opt_.num_sequences)
    return {StatusCode::kInvalidArgument, "layer or sequence out of range"};
  if (n < 0) return {StatusCode::kInvalidArgument, "negative token count"};
  if (seq_len(layer, seq) + n > opt_.max_seq_len)
    return {StatusCode::kOutOfMemory, "sequence longer than the KV cache's max_seq_len"};
  HostPagePool& pool = pools_[static_cast<std::size_t>(layer)];
  const HostPagePool::SeqId id =
      seqs_[static_cast<std::size_t>(layer)][static_cast<std::size_t>(seq)];
  if (opt_.kv_dtype == DType::kF32) return pool.append(id, k, v, n);
  const std::int64_t count = n * config_.kv_dim();
  const std::size_t es = size_of(opt_.kv_dtype);
  staging_.resize(2 * static_cast<std::size_t>(count) * es);
  std::byte* kd = staging_.data();
  std::byte* vd = staging_.data() + static_cast<std::size_t>(count) * es;
  for (std::int64_t i = 0; i < count; ++i) {
    store_from_float(kd, opt_.kv_dtype, i, k[i]);
    store_from_float(vd, opt_.kv_dtype, i, v[i]);
  }
  return pool.append(id, kd, vd, n);
}

Status DenseKvAttention::decode(int layer, std::span<const std::int32_t> seqs, const float* q,
                                float* o, float* lse2) {
  if (layer < 0 || layer >= config_.num_layers)
    return {StatusCode::kInvalidArgument, "layer out of range"};
  batch_ids_.clear();
  for (std::int32_t s : seqs) {
    if (s < 0 || s >= opt_.num_sequences)
      return {StatusCode::kInvalidArgument, "sequence out of range"};
    batch_ids_.push_back(seqs_[static_cast<std::size_t>(layer)][static_cast<std::size_t>(s)]);
  }
  const auto batch = static_cast<std::int32_t>(seqs.size());
  if (batch > std::max(opt_.num_sequences, opt_.max_prefill_tokens))
    return {StatusCode::kInvalidArgument, "batch larger than the attention was sized for"};
  const HostPagePool& pool = pools_[static_cast<std::size_t>(layer)];
  HATTN_RETURN_IF_ERROR(pool.build_page_table(batch_ids_, &table_));
  const PagedKvView kv = pool.view(table_);
  const DecodeProblem problem{.batch_size = batch,
                              .num_q_heads = config_.num_q_heads,
                              .num_kv_heads = config_.num_kv_heads,
                              .head_dim = config_.head_dim,
                              .kv_dtype = opt_.kv_dtype,
                              .q_dtype = DType::kF32,
                              .o_dtype = DType::kF32,
                              .sm_scale = std::nullopt};
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
  const HostPagePool& pool = pools_[static_cast<std::size_t>(layer)];
  const HostPagePool::SeqId id =
      seqs_[static_cast<std::size_t>(layer)][static_cast<std::size_t>(seq)];
  PageTable whole;
  HATTN_RETURN_IF_ERROR(pool.build_page_table(std::span(&id, 1), &whole));
  // Causal prefill as a decode batch: query i is a "sequence" made of the
  // first pages of the real one, cut at its own position. The pages are
  // shared, so this costs page-table entries, not copies.
  const std::int32_t page = opt_.page_size;
  const std::int64_t max_batch = std::max(opt_.num_sequences, opt_.max_prefill_tokens);
  for (std::int64_t first = 0; first < n; first += max_batch) {
    const auto batch = static_cast<std::int32_t>(std::min(max_batch, n - first));
    table_.indptr.assign(1, 0);
    table_.indices.clear();
    table_.last_page_len.clear();
    for (std::int32_t i = 0; i < batch; ++i) {
      const std::int64_t visible = len - n + first + i + 1;
      const std::int64_t pages = (visible + page - 1) / page;
      table_.indices.insert(table_.indices.end(), whole.indices.begin(),
                            whole.indices.begin() + pages);
      table_.indptr.push_back(static_cast<std::int32_t>(table_.indices.size()));
      table_.last_page_len.push_back(static_cast<std::int32_t>(visible - (pages - 1) * page));
    }
    const PagedKvView kv = pool.view(table_);
    const DecodeProblem problem{.batch_size = batch,
                                .num_q_heads = config_.num_q_heads,
                                .num_kv_heads = config_.num_kv_heads,
                                .head_dim = config_.head_dim,
                                .kv_dtype = opt_.kv_dtype,
                                .q_dtype = DType::kF32,
                                .o_dtype = DType::kF32,
                                .sm_scale = std::nullopt};
    cpu::DecodePlan plan;
    HATTN_RETURN_IF_ERROR(backend_.plan(problem, kv, workspace_.data(), workspace_.size(), &plan));
    const std::int64_t stride = config_.q_dim();
    const QueryView qv = make_query_view(q + first * stride, DType::kF32, batch,
                                         config_.num_q_heads, config_.head_dim);
    const PartialView out = make_partial_view(o + first * stride, DType::kF32, lse_scratch_.data(),
                                              batch, config_.num_q_heads, config_.head_dim);
    HATTN_RETURN_IF_ERROR(backend_.run(plan, qv, kv, out, *executor_));
  }
  return Status::ok();
}

std::size_t DenseKvAttention::kv_bytes() const noexcept {
  std::size_t total = 0;
  for (std::size_t l = 0; l < pools_.size(); ++l) {
    std::int64_t pages = 0;
    for (HostPagePool::SeqId id : seqs_[l]) {
      const std::int64_t len = pools_[l].seq_len(id);
      pages += (len + opt_.page_size - 1) / opt_.page_size;
    }
    total += 2 * static_cast<std::size_t>(pages) * pools_[l].page_bytes();  // K and V
  }
  return total;
}

}  // namespace hattn::model
