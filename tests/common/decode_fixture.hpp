#pragma once
// Inputs, outputs and the checking loop for decode tests: a DecodeCase names
// one point of the sweep; DecodeInputs fills K, V and q with fresh normal
// values behind the views the case asks for (paged or dense, NHD or HND,
// packed or K/V interleaved in one padded pool), with NaN in every element
// no view should read; OutputBuffer poisons the output with NaN and guards
// its padding and tail; check_decode_case runs the backend on every ISA the
// host has and compares with ref::decode.

#include <cstddef>
#include <cstdint>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "hattn/core/kv_view.hpp"
#include "hattn/core/problem.hpp"
#include "hattn/core/supported.hpp"
#include "hattn/cpu/executor.hpp"

namespace hattn_test {

enum class ViewKind { kPaged, kDense };

struct DecodeCase {
  hattn::DType kv = hattn::DType::kBF16;
  hattn::DType q = hattn::DType::kF32;
  hattn::DType o = hattn::DType::kF32;
  int head_dim = 128;
  int num_kv_heads = 2;
  int group = 4;  // query heads per KV head
  hattn::KvLayout layout = hattn::KvLayout::kNHD;
  ViewKind view = ViewKind::kPaged;
  int page_size = 16;  // paged only
  // false: K and V in separate packed buffers, packed q and outputs.
  // true: K and V interleaved in one pool with padded head, token and page
  // (or sequence) strides, padded q/o/lse strides, and (paged) indptr[0] > 0
  // with garbage before it.
  bool padded = false;
  std::vector<std::int64_t> lens;  // one per sequence
  float q_scale = 1.0f;            // > 1: larger scores, peaky softmax
  std::optional<float> sm_scale;   // default 1/sqrt(head_dim)

  std::string describe() const;
};

// Fills `n` elements of dtype `t` at `p` with quiet NaN.
void fill_nan(void* p, hattn::DType t, std::size_t n);

// Owns the inputs of one case and the views over them.
class DecodeInputs {
 public:
  // keep_values: also keep every value written, as stored, in packed
  // arrays (values()), to check the views and the reference independently.
  DecodeInputs(const DecodeCase& c, std::mt19937_64& rng, bool keep_values = false);

  const hattn::DecodeProblem& problem() const { return problem_; }
  const hattn::QueryView& query() const { return query_; }
  const hattn::PagedKvView& paged() const { return paged_; }
  const hattn::DenseKvView& dense() const { return dense_; }

  // With keep_values: q[b][h][d], and k, v of sequence b at
  // seq_offset[b] + (t * Hkv + h) * D + d.
  struct Values {
    std::vector<float> q, k, v;
    std::vector<std::size_t> seq_offset;
  };
  const Values& values() const { return values_; }

  // The memory behind the views (to mirror it on a device: the views point
  // into these, at the same offsets).
  struct Storage {
    std::span<const std::byte> q, k, v;  // v is empty when V is interleaved in k
    std::span<const std::int32_t> indptr, indices, last_page_len, seq_lens;
  };
  Storage storage() const {
    return {q_mem_, k_mem_, v_mem_, indptr_, indices_, last_page_len_, seq_lens_};
  }

 private:
  Values values_;
  hattn::DecodeProblem problem_{};
  std::vector<std::byte> q_mem_, k_mem_, v_mem_;
  std::vector<std::int32_t> indptr_, indices_, last_page_len_, seq_lens_;
  hattn::QueryView query_{};
  hattn::PagedKvView paged_{};
  hattn::DenseKvView dense_{};
};

// An output partial for a problem: o and lse2 poisoned with NaN, padding (when
// `padded`) and a tail of guard bytes that must survive a run unchanged.
class OutputBuffer {
 public:
  OutputBuffer(const hattn::DecodeProblem& p, bool padded);

  const hattn::PartialView& view() const { return view_; }
  std::vector<double> o() const;     // [b][h][d]
  std::vector<double> lse2() const;  // [b][h]
  // "" when every byte the view does not address is unchanged.
  std::string check_untouched() const;
  // Raw bytes of the addressed o and lse2 elements, for bitwise comparisons.
  std::vector<std::byte> bits() const;
  // All the memory behind view() (the view points at the start of each), to
  // mirror it on a device and copy results back.
  std::span<std::byte> o_memory() { return o_mem_; }
  std::span<std::byte> lse_memory() { return lse_mem_; }

 private:
  hattn::PartialView view_{};
  std::vector<std::byte> o_mem_, lse_mem_, o_snap_, lse_snap_;
  std::vector<bool> o_used_, lse_used_;  // per element
};

std::vector<hattn::CpuIsa> available_isas();
// One executor (default concurrency) shared by the decode tests.
const hattn::CpuExecutor& shared_executor();

// Builds the case's inputs from make_rng(tag), runs ref::decode once and the
// backend once per available ISA through the case's view, and checks every
// element with the tolerance table, the guards, and zero-length sequences.
void check_decode_case(const DecodeCase& c, const std::string& tag);

}  // namespace hattn_test
