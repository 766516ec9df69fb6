#include "hattn/model/runner.hpp"

#include <algorithm>
#include <chrono>

namespace hattn::model {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

}  // namespace

LlamaRunner::LlamaRunner(const LlamaModel& model, KvAttention& attention,
                         const CpuExecutor& executor)
    : model_(&model), attention_(&attention), executor_(&executor) {}

void LlamaRunner::trace(const char* stage, int layer, Clock::time_point begin) const {
  if (!trace_) return;
  trace_(stage, layer, std::chrono::duration<double>(begin - epoch_).count(),
         std::chrono::duration<double>(Clock::now() - epoch_).count());
}

Status LlamaRunner::forward_chunk(int seq, std::span<const std::int32_t> tokens, float* logits,
                                  bool all_logits) {
  const LlamaConfig& c = model_->config();
  const auto n = static_cast<std::int64_t>(tokens.size());
  x_.resize(static_cast<std::size_t>(n * c.hidden_size));
  q_.resize(static_cast<std::size_t>(n * c.q_dim()));
  o_.resize(q_.size());
  k_.resize(static_cast<std::size_t>(n * c.kv_dim()));
  v_.resize(k_.size());
  positions_.resize(static_cast<std::size_t>(n));
  const std::int64_t start = attention_->seq_len(0, seq);
  if (start < 0) return {StatusCode::kInvalidArgument, "sequence out of range"};
  for (std::int64_t i = 0; i < n; ++i) positions_[static_cast<std::size_t>(i)] = start + i;

  auto t0 = Clock::now();
  HATTN_RETURN_IF_ERROR(model_->embed(tokens, x_.data()));
  times_.other_s += seconds_since(t0);
  trace("embed", -1, t0);
  for (int l = 0; l < c.num_layers; ++l) {
    t0 = Clock::now();
    model_->stage_a(l, x_.data(), n, positions_.data(), q_.data(), k_.data(), v_.data(), scratch_,
                    *executor_, &times_);
    trace("stage_a", l, t0);
    t0 = Clock::now();
    HATTN_RETURN_IF_ERROR(attention_->append(l, seq, k_.data(), v_.data(), n));
    times_.copies_s += seconds_since(t0);
    trace("append", l, t0);
    t0 = Clock::now();
    HATTN_RETURN_IF_ERROR(attention_->prefill(l, seq, q_.data(), n, o_.data()));
    times_.attention_s += seconds_since(t0);
    trace("attention", l, t0);
    t0 = Clock::now();
    model_->stage_b(l, o_.data(), n, x_.data(), scratch_, *executor_, &times_);
    trace("stage_b", l, t0);
  }
  if (logits) {
    const std::int64_t rows = all_logits ? n : 1;
    t0 = Clock::now();
    model_->logits(x_.data() + (n - rows) * c.hidden_size, rows, logits, scratch_, *executor_,
                   &times_);
    trace("logits", -1, t0);
  }
  return Status::ok();
}

Status LlamaRunner::prefill(int seq, std::span<const std::int32_t> tokens, std::int64_t chunk,
                            float* last_logits,
                            const std::function<void(std::int64_t, std::int64_t)>& on_chunk) {
  if (tokens.empty()) return {StatusCode::kInvalidArgument, "empty prompt"};
  if (chunk <= 0) return {StatusCode::kInvalidArgument, "prefill chunk must be positive"};
  const auto total = static_cast<std::int64_t>(tokens.size());
  for (std::int64_t done = 0; done < total; done += chunk) {
    const std::int64_t n = std::min(chunk, total - done);
    const bool last = done + n == total;
    HATTN_RETURN_IF_ERROR(forward_chunk(
        seq, tokens.subspan(static_cast<std::size_t>(done), static_cast<std::size_t>(n)),
        last ? last_logits : nullptr, false));
    if (on_chunk) on_chunk(done + n, total);
  }
  return finish_prefill(seq);
}

Status LlamaRunner::finish_prefill(int seq) {
  const auto t0 = Clock::now();
  HATTN_RETURN_IF_ERROR(attention_->finish_prefill(seq));
  times_.attention_s += seconds_since(t0);
  trace("finish_prefill", -1, t0);
  return Status::ok();
}

Status LlamaRunner::prefill_all_logits(int seq, std::span<const std::int32_t> tokens,
                                       float* logits) {
  if (tokens.empty()) return {StatusCode::kInvalidArgument, "empty prompt"};
  return forward_chunk(seq, tokens, logits, true);
}

Status LlamaRunner::synthetic_prefill(
    std::int64_t len, std::uint64_t seed,
    const std::function<void(std::int64_t, std::int64_t)>& on_chunk) {
  const LlamaConfig& c = model_->config();
  constexpr std::int64_t kChunk = 1024;
  k_.resize(static_cast<std::size_t>(kChunk * c.kv_dim()));
  v_.resize(k_.size());
  const std::int64_t total = len * c.num_layers * attention_->num_sequences();
  std::int64_t done = 0;
  std::uint64_t state = seed * 0x9E3779B97F4A7C15ULL + 0x2545F4914F6CDD1DULL;
  const auto next = [&state] {  // xorshift64*, uniform in [-1, 1)
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return static_cast<float>((state * 0x2545F4914F6CDD1DULL) >> 40) * (2.0f / 16777216.0f) - 1.0f;
  };
  for (int seq = 0; seq < attention_->num_sequences(); ++seq) {
    for (int l = 0; l < c.num_layers; ++l) {
      for (std::int64_t t = 0; t < len; t += kChunk) {
        const std::int64_t n = std::min(kChunk, len - t);
        for (std::int64_t i = 0; i < n * c.kv_dim(); ++i) {
          k_[static_cast<std::size_t>(i)] = next();
          v_[static_cast<std::size_t>(i)] = next();
        }
        const auto t0 = Clock::now();
        HATTN_RETURN_IF_ERROR(attention_->append(l, seq, k_.data(), v_.data(), n));
        times_.copies_s += seconds_since(t0);
        done += n;
        if (on_chunk) on_chunk(done, total);
      }
    }
    HATTN_RETURN_IF_ERROR(finish_prefill(seq));
  }
  return Status::ok();
}

Status LlamaRunner::decode_step(std::span<const std::int32_t> tokens, float* logits) {
  const LlamaConfig& c = model_->config();
  const auto batch = static_cast<std::int32_t>(tokens.size());
  if (batch != attention_->num_sequences())
    return {StatusCode::kInvalidArgument, "decode_step needs one token per sequence"};
  x_.resize(static_cast<std::size_t>(batch) * c.hidden_size);
  q_.resize(static_cast<std::size_t>(batch * c.q_dim()));
  o_.resize(q_.size());
  k_.resize(static_cast<std::size_t>(batch * c.kv_dim()));
  v_.resize(k_.size());
  lse2_.resize(static_cast<std::size_t>(batch) * c.num_q_heads);
  positions_.resize(static_cast<std::size_t>(batch));
  seqs_.resize(static_cast<std::size_t>(batch));
  for (std::int32_t b = 0; b < batch; ++b) {
    seqs_[static_cast<std::size_t>(b)] = b;
    positions_[static_cast<std::size_t>(b)] = attention_->seq_len(0, b);
  }
  auto t0 = Clock::now();
  HATTN_RETURN_IF_ERROR(model_->embed(tokens, x_.data()));
  times_.other_s += seconds_since(t0);
  trace("embed", -1, t0);
  for (int l = 0; l < c.num_layers; ++l) {
    t0 = Clock::now();
    model_->stage_a(l, x_.data(), batch, positions_.data(), q_.data(), k_.data(), v_.data(),
                    scratch_, *executor_, &times_);
    trace("stage_a", l, t0);
    t0 = Clock::now();
    for (std::int32_t b = 0; b < batch; ++b)
      HATTN_RETURN_IF_ERROR(
          attention_->append(l, b, k_.data() + b * c.kv_dim(), v_.data() + b * c.kv_dim(), 1));
    times_.copies_s += seconds_since(t0);
    trace("append", l, t0);
    t0 = Clock::now();
    HATTN_RETURN_IF_ERROR(attention_->decode(l, seqs_, q_.data(), o_.data(), lse2_.data()));
    times_.attention_s += seconds_since(t0);
    trace("attention", l, t0);
    t0 = Clock::now();
    model_->stage_b(l, o_.data(), batch, x_.data(), scratch_, *executor_, &times_);
    trace("stage_b", l, t0);
  }
  t0 = Clock::now();
  model_->logits(x_.data(), batch, logits, scratch_, *executor_, &times_);
  trace("logits", -1, t0);
  return Status::ok();
}

}  // namespace hattn::model
