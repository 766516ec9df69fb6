// Host half of cuda::DenseDecode: checks the views (without reading device
// memory), fills the kernel parameters and launches the decode kernel of the
// problem's (KV dtype, head dim, group width, alignment), then the chunk merge
// when the plan splits sequences.

#include "hattn/cuda/dense_decode.hpp"

#include <cstdint>
#include <type_traits>

#include "cuda/params.hpp"
#include "hattn/core/validate.hpp"

namespace hattn::cuda {

Status DenseDecode::for_device(int device, DenseDecode* out) noexcept {
  if (out == nullptr) return {StatusCode::kInvalidArgument, "for_device: result is null"};
  int sms = 0;
  if (const cudaError_t e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
      e != cudaSuccess) {
    (void)cudaGetLastError();
    return cuda_status(e);
  }
  *out = DenseDecode(sms);
  return Status::ok();
}

namespace {

Status invalid(const char* msg) noexcept { return {StatusCode::kInvalidArgument, msg}; }

// What can be checked without reading the device page table or lengths.
Status check_kv(const DecodeProblem& p, const PagedKvView& kv, const DecodePlan& pl) noexcept {
  HATTN_RETURN_IF_ERROR(hattn::detail::validate_kv_common(p, kv.k, kv.v, kv.dtype, kv.num_kv_heads,
                                                          kv.head_dim, kv.batch_size, kv.k_strides,
                                                          kv.v_strides));
  if (kv.page_size < 1) return invalid("page_size must be at least 1");
  if (kv.num_pages < 0) return invalid("num_pages is negative");
  if (kv.batch_size > 0 && (kv.indptr == nullptr || kv.last_page_len == nullptr))
    return invalid("page table indptr or last_page_len is null");
  if (kv.batch_size > 0 && pl.max_seq_len > 0 && kv.indices == nullptr)
    return invalid("page table indices is null");
  return Status::ok();
}

Status check_kv(const DecodeProblem& p, const DenseKvView& kv, const DecodePlan&) noexcept {
  HATTN_RETURN_IF_ERROR(hattn::detail::validate_kv_common(p, kv.k, kv.v, kv.dtype, kv.num_kv_heads,
                                                          kv.head_dim, kv.batch_size, kv.k_strides,
                                                          kv.v_strides));
  if (kv.batch_size > 0 && kv.seq_lens == nullptr) return invalid("seq_lens is null");
  if (kv.max_seq_len < 0) return invalid("max_seq_len is negative");
  return Status::ok();
}

bool aligned16(const void* ptr) noexcept { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

// Whether every K and V row starts on a 16-byte boundary (the vector-load
// kernels); otherwise the element-load kernels run.
template <class Kv>
bool rows_aligned(const Kv& kv) noexcept {
  const auto es = static_cast<std::int64_t>(size_of(kv.dtype));
  auto ok = [&](const KvStrides& s) {
    return (s.outer * es) % 16 == 0 && (s.token * es) % 16 == 0 && (s.head * es) % 16 == 0;
  };
  return aligned16(kv.k) && aligned16(kv.v) && ok(kv.k_strides) && ok(kv.v_strides);
}

detail::DecodeLaunchFn find_launcher(DType kv, int head_dim, int width, bool aligned) noexcept {
  switch (kv) {
    case DType::kBF16: return detail::decode_launcher_bf16(head_dim, width, aligned);
    case DType::kF16: return detail::decode_launcher_f16(head_dim, width, aligned);
    case DType::kF32: return detail::decode_launcher_f32(head_dim, width, aligned);
  }
  return nullptr;
}

constexpr float kLog2e = 1.4426950408889634f;

}  // namespace

template <KvView Kv>
Status DenseDecode::run(const DecodePlan& pl, const QueryView& q, const Kv& kv,
                        const PartialView& out, StreamRef stream) const noexcept {
  if (!pl.planned()) return invalid("run: plan was not made");
  const DecodeProblem& p = pl.problem;
  HATTN_RETURN_IF_ERROR(validate(p, q));
  HATTN_RETURN_IF_ERROR(validate(p, out));
  HATTN_RETURN_IF_ERROR(check_kv(p, kv, pl));
  if (p.batch_size == 0) return Status::ok();

  detail::DecodeParams prm;
  prm.k = kv.k;
  prm.v = kv.v;
  prm.k_outer = kv.k_strides.outer;
  prm.k_token = kv.k_strides.token;
  prm.k_head = kv.k_strides.head;
  prm.v_outer = kv.v_strides.outer;
  prm.v_token = kv.v_strides.token;
  prm.v_head = kv.v_strides.head;
  if constexpr (std::is_same_v<Kv, PagedKvView>) {
    prm.paged = true;
    prm.indptr = kv.indptr;
    prm.indices = kv.indices;
    prm.last_page_len = kv.last_page_len;
    prm.num_pages = kv.num_pages;
    prm.page_size = kv.page_size;
    prm.page_div = detail::FastDivmod::make(static_cast<std::uint32_t>(kv.page_size));
  } else {
    prm.paged = false;
    prm.seq_lens = kv.seq_lens;
    prm.max_seq_len = kv.max_seq_len;
  }
  prm.q = q.data;
  prm.q_dtype = q.dtype;
  prm.q_stride_batch = q.stride_batch;
  prm.q_stride_head = q.stride_head;
  prm.o = out.o;
  prm.o_dtype = out.dtype;
  prm.lse2 = out.lse2;
  prm.o_stride_batch = out.stride_batch;
  prm.o_stride_head = out.stride_head;
  prm.lse_stride_batch = out.lse_stride_batch;
  prm.partial_o = pl.partial_o;
  prm.partial_lse = pl.partial_lse;
  prm.error_flags = pl.error_flags;
  prm.batch = p.batch_size;
  prm.q_heads = p.num_q_heads;
  prm.kv_heads = p.num_kv_heads;
  prm.group = p.group_size();
  prm.head_dim = p.head_dim;
  prm.heads_per_pass = pl.heads_per_pass;
  prm.num_passes = pl.num_passes;
  prm.num_chunks = pl.num_chunks;
  prm.chunk_tokens = pl.chunk_tokens;
  prm.q_scale = p.scale() * kLog2e;

  const detail::DecodeLaunchFn launch =
      find_launcher(p.kv_dtype, p.head_dim, pl.group_width, rows_aligned(kv));
  if (launch == nullptr) return {StatusCode::kInternal, "run: no kernel for this configuration"};
  HATTN_RETURN_IF_ERROR(cuda_status(launch(prm, pl.num_ctas, stream.get())));
  if (pl.num_chunks > 1)
    HATTN_RETURN_IF_ERROR(cuda_status(detail::launch_merge_chunks(prm, stream.get())));
  return Status::ok();
}

Status DenseDecode::device_errors(const DecodePlan& pl, StreamRef stream) noexcept {
  if (!pl.planned() || pl.error_flags == nullptr)
    return invalid("device_errors: plan was not made");
  std::uint32_t flags = 0;
  HATTN_RETURN_IF_ERROR(cuda_status(cudaMemcpyAsync(&flags, pl.error_flags, sizeof(flags),
                                                    cudaMemcpyDeviceToHost, stream.get())));
  HATTN_RETURN_IF_ERROR(
      cuda_status(cudaMemsetAsync(pl.error_flags, 0, sizeof(flags), stream.get())));
  HATTN_RETURN_IF_ERROR(stream.synchronize());
  if (flags & kErrorPageIndex) return invalid("device page table: page index outside the pool");
  if (flags & kErrorLastPageLen)
    return invalid("device page table: last_page_len outside 1..page_size");
  if (flags & kErrorIndptr) return invalid("device page table: indptr negative or decreasing");
  if (flags & kErrorSeqLen)
    return invalid("device lengths: negative, over max_seq_len, or longer than 2^30");
  if (flags & kErrorNullIndices) return invalid("device page table: indices is null");
  return Status::ok();
}

template Status DenseDecode::run(const DecodePlan&, const QueryView&, const PagedKvView&,
                                 const PartialView&, StreamRef) const noexcept;
template Status DenseDecode::run(const DecodePlan&, const QueryView&, const DenseKvView&,
                                 const PartialView&, StreamRef) const noexcept;

}  // namespace hattn::cuda
