// The smallest complete use of hattn from another project: CPU dense decode
// attention on a tiny paged KV cache, checked against the reference. Exits
// non-zero when anything fails or the result does not match.

#include <hattn/core/page_pool.hpp>
#include <hattn/core/problem.hpp>
#include <hattn/cpu/dense_decode.hpp>
#include <hattn/cpu/executor.hpp>
#include <hattn/ref/decode.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace {
bool check(const hattn::Status& s, const char* what) {
  if (!s) std::fprintf(stderr, "%s failed: %s\n", what, s.message());
  return static_cast<bool>(s);
}
}  // namespace

int main() {
  constexpr int kKvHeads = 2, kQHeads = 8, kHeadDim = 64, kBatch = 3;
  const std::int64_t lens[kBatch] = {1, 37, 300};  // tokens per sequence
  std::mt19937 rng(42);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);

  // A bf16 KV cache in pages of 16 tokens, and one sequence per request.
  hattn::HostPagePool pool({.dtype = hattn::DType::kBF16,
                            .num_kv_heads = kKvHeads,
                            .head_dim = kHeadDim,
                            .page_size = 16,
                            .num_pages = 64,
                            .layout = hattn::KvLayout::kHND});
  std::vector<hattn::HostPagePool::SeqId> seqs;
  for (std::int64_t len : lens) {
    std::vector<hattn::bf16> k(static_cast<std::size_t>(len) * kKvHeads * kHeadDim), v(k.size());
    for (auto& x : k) x = hattn::to_bf16(uniform(rng));
    for (auto& x : v) x = hattn::to_bf16(uniform(rng));
    hattn::HostPagePool::SeqId id = 0;
    if (!check(pool.create_sequence(&id), "create_sequence")) return 1;
    if (!check(pool.append(id, k.data(), v.data(), len), "append")) return 1;
    seqs.push_back(id);
  }
  hattn::PageTable table;
  if (!check(pool.build_page_table(seqs, &table), "build_page_table")) return 1;
  const hattn::PagedKvView kv = pool.view(table);

  // One decode step: a query token per sequence in, (o, lse2) out.
  const hattn::DecodeProblem problem{.batch_size = kBatch,
                                     .num_q_heads = kQHeads,
                                     .num_kv_heads = kKvHeads,
                                     .head_dim = kHeadDim,
                                     .kv_dtype = hattn::DType::kBF16,
                                     .q_dtype = hattn::DType::kF32,
                                     .o_dtype = hattn::DType::kF32,
                                     .sm_scale = std::nullopt};  // 1/sqrt(head_dim)
  std::vector<float> q(kBatch * kQHeads * kHeadDim), o(q.size()), lse2(kBatch * kQHeads);
  for (float& x : q) x = uniform(rng);
  const auto qv = hattn::make_query_view(q.data(), hattn::DType::kF32, kBatch, kQHeads, kHeadDim);
  const auto out = hattn::make_partial_view(o.data(), hattn::DType::kF32, lse2.data(), kBatch,
                                            kQHeads, kHeadDim);

  hattn::cpu::DenseDecode backend;  // best ISA of this CPU (or HATTN_CPU_ISA)
  hattn::CpuExecutor executor;      // owns a oneTBB arena of all cores
  std::vector<std::byte> workspace(hattn::cpu::DenseDecode::workspace_size(problem));
  hattn::cpu::DecodePlan plan;
  if (!check(backend.plan(problem, kv, workspace.data(), workspace.size(), &plan), "plan"))
    return 1;
  if (!check(backend.run(plan, qv, kv, out, executor), "run")) return 1;

  // Compare with the reference, computed in double.
  hattn::ref::Result ref;
  if (!check(hattn::ref::decode(problem, qv, kv, &ref), "ref::decode")) return 1;
  double err = 0.0;
  for (std::size_t i = 0; i < o.size(); ++i) err = std::max(err, std::abs(o[i] - ref.o[i]));
  for (std::size_t i = 0; i < lse2.size(); ++i)
    err = std::max(err, std::abs(lse2[i] - ref.lse2[i]));
  std::printf("hattn consumer: isa %s, max error %.3g\n",
              std::string(hattn::to_string(backend.isa())).c_str(), err);
  return err <= 1e-4 ? 0 : 1;
}
