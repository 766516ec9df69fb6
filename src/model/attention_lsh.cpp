#include <algorithm>
#include <charconv>
#include <stdexcept>
#include <string>

#include "hattn/model/lsh_kv_attention.hpp"
#include "model/causal_table.hpp"

namespace hattn::model {

std::vector<std::int32_t> default_lsh_dense_layers(std::int32_t num_layers) {
  std::vector<std::int32_t> out;
  for (std::int32_t l = 0; l < num_layers; l += 16) out.push_back(l);
  return out;
}

bool parse_layer_list(std::string_view text, std::int32_t num_layers,
                      std::vector<std::int32_t>* out) {
  out->clear();
  if (text == "none" || text.empty()) return true;
  std::vector<std::int32_t> terms;
  bool progression = false;
  for (bool more = true; more;) {
    const std::size_t comma = text.find(',');
    const std::string_view item = text.substr(0, comma);
    more = comma != std::string_view::npos;
    text = more ? text.substr(comma + 1) : std::string_view();
    if (item == "...") {
      // "..." only last, after two terms that give the step.
      if (more || terms.size() < 2 || terms.back() <= terms[terms.size() - 2]) return false;
      progression = true;
      break;
    }
    std::int32_t v = 0;
    const auto [end, ec] = std::from_chars(item.data(), item.data() + item.size(), v);
    if (ec != std::errc() || end != item.data() + item.size() || v < 0) return false;
    terms.push_back(v);
  }
  if (progression) {
    const std::int32_t step = terms.back() - terms[terms.size() - 2];
    for (std::int32_t l = terms.back() + step; l < num_layers; l += step) terms.push_back(l);
  }
  for (std::int32_t l : terms)
    if (l < num_layers) out->push_back(l);
  std::sort(out->begin(), out->end());
  out->erase(std::unique(out->begin(), out->end()), out->end());
  return true;
}

// Before finish_prefill a sequence's prompt lives in k/v (packed
// [n][Hkv][D] in the KV dtype); after it, in `lsh`.
struct LshKvAttention::Layer {
  std::unique_ptr<cpu::LshAttention> lsh;
  std::vector<std::vector<std::byte>> k, v;  // [seq]
  std::vector<std::int64_t> staged;          // [seq] tokens in k/v
  std::vector<char> sealed;                  // [seq]
};

LshKvAttention::LshKvAttention(const LlamaConfig& config, const LshKvAttentionOptions& options,
                               const CpuExecutor& executor, CpuIsa isa)
    : config_(config), opt_(options), executor_(&executor), backend_(isa, options.precision) {
  if (opt_.num_sequences <= 0 || opt_.max_seq_len <= 0 || opt_.page_size <= 0 ||
      opt_.max_prefill_tokens <= 0)
    throw std::invalid_argument("LshKvAttention: sizes must be positive");
  const std::vector<std::int32_t> dense =
      opt_.dense_layers ? *opt_.dense_layers : default_lsh_dense_layers(config.num_layers);
  dense_index_.assign(static_cast<std::size_t>(config.num_layers), -1);
  std::int32_t num_dense = 0;
  for (std::int32_t l : dense) {
    if (l < 0 || l >= config.num_layers)
      throw std::invalid_argument("LshKvAttention: dense layer out of range");
    if (dense_index_[static_cast<std::size_t>(l)] < 0)
      dense_index_[static_cast<std::size_t>(l)] = num_dense++;
  }
  if (num_dense > 0) {
    LlamaConfig dense_config = config;
    dense_config.num_layers = num_dense;
    dense_ = std::make_unique<DenseKvAttention>(
        dense_config,
        DenseKvAttentionOptions{.kv_dtype = opt_.kv_dtype,
                                .page_size = opt_.page_size,
                                .num_sequences = opt_.num_sequences,
                                .max_seq_len = opt_.max_seq_len,
                                .max_prefill_tokens = opt_.max_prefill_tokens,
                                .precision = opt_.precision},
        executor, isa);
  }
  layers_.resize(static_cast<std::size_t>(config.num_layers));
  for (std::int32_t l = 0; l < config.num_layers; ++l) {
    if (dense_index_[static_cast<std::size_t>(l)] >= 0) continue;
    auto layer = std::make_unique<Layer>();
    const cpu::LshShape shape =
        lsh_shape(config, opt_.kv_dtype, opt_.max_seq_len, opt_.num_sequences, opt_.page_size, l);
    const Status st = cpu::LshAttention::create(opt_.lsh, shape, &layer->lsh, isa);
    if (!st.is_ok()) throw std::invalid_argument(std::string("LshKvAttention: ") + st.message());
    const auto seqs = static_cast<std::size_t>(opt_.num_sequences);
    layer->k.resize(seqs);
    layer->v.resize(seqs);
    layer->staged.assign(seqs, 0);
    layer->sealed.assign(seqs, 0);
    layers_[static_cast<std::size_t>(l)] = std::move(layer);
  }
  const DecodeProblem problem =
      decode_problem(config, std::max(opt_.num_sequences, opt_.max_prefill_tokens), opt_.kv_dtype);
  workspace_.resize(cpu::DenseDecode::workspace_size(problem));
  lse_scratch_.resize(static_cast<std::size_t>(problem.batch_size) * config.num_q_heads);
}

LshKvAttention::~LshKvAttention() = default;

bool LshKvAttention::is_dense_layer(int layer) const noexcept {
  return layer >= 0 && layer < config_.num_layers &&
         dense_index_[static_cast<std::size_t>(layer)] >= 0;
}

const cpu::LshAttention* LshKvAttention::lsh_layer(int layer) const noexcept {
  if (layer < 0 || layer >= config_.num_layers || is_dense_layer(layer)) return nullptr;
  return layers_[static_cast<std::size_t>(layer)]->lsh.get();
}

std::int64_t LshKvAttention::seq_len(int layer, int seq) const noexcept {
  if (layer < 0 || layer >= config_.num_layers || seq < 0 || seq >= opt_.num_sequences) return -1;
  if (is_dense_layer(layer))
    return dense_->seq_len(dense_index_[static_cast<std::size_t>(layer)], seq);
  const Layer& L = *layers_[static_cast<std::size_t>(layer)];
  const auto s = static_cast<std::size_t>(seq);
  if (!L.sealed[s]) return L.staged[s];
  cpu::LshPartition part;
  if (!L.lsh->partition(seq, &part).is_ok()) return -1;
  return part.length;
}

Status LshKvAttention::to_kv_dtype(const float* k, const float* v, std::int64_t n) {
  const std::int64_t count = n * config_.kv_dim();
  const std::size_t es = size_of(opt_.kv_dtype);
  staging_.resize(2 * static_cast<std::size_t>(count) * es);
  std::byte* kd = staging_.data();
  std::byte* vd = staging_.data() + static_cast<std::size_t>(count) * es;
  for (std::int64_t i = 0; i < count; ++i) {
    store_from_float(kd, opt_.kv_dtype, i, k[i]);
    store_from_float(vd, opt_.kv_dtype, i, v[i]);
  }
  return Status::ok();
}

Status LshKvAttention::append(int layer, int seq, const float* k, const float* v, std::int64_t n) {
  if (layer < 0 || layer >= config_.num_layers || seq < 0 || seq >= opt_.num_sequences)
    return {StatusCode::kInvalidArgument, "layer or sequence out of range"};
  if (is_dense_layer(layer))
    return dense_->append(dense_index_[static_cast<std::size_t>(layer)], seq, k, v, n);
  if (n < 0) return {StatusCode::kInvalidArgument, "negative token count"};
  if (n == 0) return Status::ok();
  if (k == nullptr || v == nullptr) return {StatusCode::kInvalidArgument, "null k or v"};
  if (seq_len(layer, seq) + n > opt_.max_seq_len)
    return {StatusCode::kOutOfMemory, "sequence longer than the KV cache's max_seq_len"};
  HATTN_RETURN_IF_ERROR(to_kv_dtype(k, v, n));
  Layer& L = *layers_[static_cast<std::size_t>(layer)];
  const auto s = static_cast<std::size_t>(seq);
  const std::size_t bytes = static_cast<std::size_t>(n * config_.kv_dim()) * size_of(opt_.kv_dtype);
  if (L.sealed[s]) return L.lsh->append(seq, staging_.data(), staging_.data() + bytes, n);
  try {
    L.k[s].insert(L.k[s].end(), staging_.data(), staging_.data() + bytes);
    L.v[s].insert(L.v[s].end(), staging_.data() + bytes, staging_.data() + 2 * bytes);
  } catch (const std::bad_alloc&) {
    const std::size_t kept =
        static_cast<std::size_t>(L.staged[s] * config_.kv_dim()) * size_of(opt_.kv_dtype);
    L.k[s].resize(kept);
    L.v[s].resize(kept);
    return {StatusCode::kOutOfMemory, "cannot grow the prompt staging"};
  }
  L.staged[s] += n;
  return Status::ok();
}

Status LshKvAttention::seal(int layer, int seq) {
  Layer& L = *layers_[static_cast<std::size_t>(layer)];
  const auto s = static_cast<std::size_t>(seq);
  if (L.sealed[s]) return Status::ok();
  const std::byte dummy[1] = {};
  const void* kp = L.k[s].empty() ? dummy : L.k[s].data();
  const void* vp = L.v[s].empty() ? dummy : L.v[s].data();
  HATTN_RETURN_IF_ERROR(L.lsh->prefill(seq, kp, vp, L.staged[s], *executor_));
  L.sealed[s] = 1;
  L.staged[s] = 0;
  std::vector<std::byte>().swap(L.k[s]);  // give the staging back
  std::vector<std::byte>().swap(L.v[s]);
  return Status::ok();
}

Status LshKvAttention::finish_prefill(int seq) {
  if (seq < 0 || seq >= opt_.num_sequences)
    return {StatusCode::kInvalidArgument, "sequence out of range"};
  for (int l = 0; l < config_.num_layers; ++l)
    if (!is_dense_layer(l)) HATTN_RETURN_IF_ERROR(seal(l, seq));
  return Status::ok();
}

Status LshKvAttention::decode(int layer, std::span<const std::int32_t> seqs, const float* q,
                              float* o, float* lse2) {
  if (layer < 0 || layer >= config_.num_layers)
    return {StatusCode::kInvalidArgument, "layer out of range"};
  if (is_dense_layer(layer))
    return dense_->decode(dense_index_[static_cast<std::size_t>(layer)], seqs, q, o, lse2);
  batch_ids_.clear();
  for (std::int32_t s : seqs) {
    if (s < 0 || s >= opt_.num_sequences)
      return {StatusCode::kInvalidArgument, "sequence out of range"};
    HATTN_RETURN_IF_ERROR(seal(layer, s));
    batch_ids_.push_back(s);
  }
  const auto batch = static_cast<std::int32_t>(seqs.size());
  const QueryView qv =
      make_query_view(q, DType::kF32, batch, config_.num_q_heads, config_.head_dim);
  const PartialView out =
      make_partial_view(o, DType::kF32, lse2, batch, config_.num_q_heads, config_.head_dim);
  const cpu::LshAttention& lsh = *layers_[static_cast<std::size_t>(layer)]->lsh;
  HATTN_RETURN_IF_ERROR(
      layers_[static_cast<std::size_t>(layer)]->lsh->decode(batch_ids_, qv, out, *executor_));
  if (!stats_on_) return Status::ok();
  try {
    for (std::int32_t b = 0; b < batch; ++b) {
      cpu::LshPartition part;
      HATTN_RETURN_IF_ERROR(lsh.partition(batch_ids_[static_cast<std::size_t>(b)], &part));
      const std::int64_t indexed = part.tail_begin - part.sink_end;
      if (indexed <= 0) continue;
      for (std::int32_t h = 0; h < config_.num_q_heads; ++h) {
        const float* qh =
            q + (static_cast<std::int64_t>(b) * config_.num_q_heads + h) * config_.head_dim;
        HATTN_RETURN_IF_ERROR(
            lsh.sampled_positions(batch_ids_[static_cast<std::size_t>(b)], h, qh, &positions_));
        stats_.fraction_sum +=
            static_cast<double>(positions_.size()) / static_cast<double>(indexed);
        ++stats_.queries;
      }
    }
  } catch (const std::bad_alloc&) {
    return {StatusCode::kOutOfMemory, "sampling statistics: out of memory"};
  }
  return Status::ok();
}

Status LshKvAttention::prefill(int layer, int seq, const float* q, std::int64_t n, float* o) {
  if (layer < 0 || layer >= config_.num_layers || seq < 0 || seq >= opt_.num_sequences)
    return {StatusCode::kInvalidArgument, "layer or sequence out of range"};
  if (is_dense_layer(layer))
    return dense_->prefill(dense_index_[static_cast<std::size_t>(layer)], seq, q, n, o);
  const std::int64_t len = seq_len(layer, seq);
  if (n <= 0 || n > len) return {StatusCode::kInvalidArgument, "prefill: bad token count"};
  const Layer& L = *layers_[static_cast<std::size_t>(layer)];
  const auto s = static_cast<std::size_t>(seq);
  // The prompt's own attention is exact: query i sees keys [0, len - n + i],
  // over the staged rows (a dense view, every query reading the same block)
  // or, once indexed, over the LSH layer's pages.
  PagedKvView whole_view{};
  if (L.sealed[s]) {
    const cpu::LshAttention::SeqId id = seq;
    HATTN_RETURN_IF_ERROR(L.lsh->kv_view(std::span(&id, 1), &whole_, &whole_view));
  }
  const std::int64_t max_batch = std::max(opt_.num_sequences, opt_.max_prefill_tokens);
  const std::int64_t row = config_.kv_dim();
  for (std::int64_t first = 0; first < n; first += max_batch) {
    const auto batch = static_cast<std::int32_t>(std::min(max_batch, n - first));
    const DecodeProblem problem = decode_problem(config_, batch, opt_.kv_dtype);
    const std::int64_t stride = config_.q_dim();
    const QueryView qv = make_query_view(q + first * stride, DType::kF32, batch,
                                         config_.num_q_heads, config_.head_dim);
    const PartialView out = make_partial_view(o + first * stride, DType::kF32, lse_scratch_.data(),
                                              batch, config_.num_q_heads, config_.head_dim);
    cpu::DecodePlan plan;
    if (!L.sealed[s]) {
      lens_.resize(static_cast<std::size_t>(batch));
      for (std::int32_t i = 0; i < batch; ++i)
        lens_[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(len - n + first + i + 1);
      const KvStrides strides{0, row, config_.head_dim};
      const DenseKvView kv{.k = L.k[s].data(),
                           .v = L.v[s].data(),
                           .dtype = opt_.kv_dtype,
                           .num_kv_heads = config_.num_kv_heads,
                           .head_dim = config_.head_dim,
                           .max_seq_len = len,
                           .k_strides = strides,
                           .v_strides = strides,
                           .batch_size = batch,
                           .seq_lens = lens_.data()};
      HATTN_RETURN_IF_ERROR(
          backend_.plan(problem, kv, workspace_.data(), workspace_.size(), &plan));
      HATTN_RETURN_IF_ERROR(backend_.run(plan, qv, kv, out, *executor_));
      continue;
    }
    detail::causal_prefix_table(whole_, whole_view.page_size, len - n + first + 1, batch, &table_);
    PagedKvView kv = whole_view;
    kv.batch_size = batch;
    kv.indptr = table_.indptr.data();
    kv.indices = table_.indices.data();
    kv.last_page_len = table_.last_page_len.data();
    HATTN_RETURN_IF_ERROR(backend_.plan(problem, kv, workspace_.data(), workspace_.size(), &plan));
    HATTN_RETURN_IF_ERROR(backend_.run(plan, qv, kv, out, *executor_));
  }
  return Status::ok();
}

std::size_t LshKvAttention::kv_bytes() const noexcept {
  std::size_t total = dense_ ? dense_->kv_bytes() : 0;
  for (int l = 0; l < config_.num_layers; ++l) {
    if (is_dense_layer(l)) continue;
    const Layer& L = *layers_[static_cast<std::size_t>(l)];
    for (int s = 0; s < opt_.num_sequences; ++s) {
      const auto si = static_cast<std::size_t>(s);
      if (!L.sealed[si]) {
        total += L.k[si].size() + L.v[si].size();
        continue;
      }
      cpu::LshMemory m;
      if (L.lsh->memory(s, &m).is_ok()) total += m.kv;
    }
  }
  return total;
}

std::size_t LshKvAttention::index_bytes() const noexcept {
  std::size_t total = 0;
  for (int l = 0; l < config_.num_layers; ++l) {
    if (is_dense_layer(l)) continue;
    const Layer& L = *layers_[static_cast<std::size_t>(l)];
    for (int s = 0; s < opt_.num_sequences; ++s) {
      cpu::LshMemory m;
      if (L.sealed[static_cast<std::size_t>(s)] && L.lsh->memory(s, &m).is_ok())
        total += m.index + m.means;
    }
  }
  return total;
}

}  // namespace hattn::model
