#pragma once
// Scalar reference decode attention, accumulating in double. Reads through the
// same views as the backends; tests and users compare against it.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "hattn/core/kv_view.hpp"
#include "hattn/core/problem.hpp"
#include "hattn/core/status.hpp"
#include "hattn/core/validate.hpp"
#include "hattn/detail/kv_rows.hpp"

namespace hattn::ref {

// Exact result in double: o[(b * H + h) * D + d], lse2[b * H + h].
struct Result {
  std::vector<double> o;
  std::vector<double> lse2;
};

template <KvView Kv>
Status decode(const DecodeProblem& p, const QueryView& q, const Kv& kv, Result* out) {
  HATTN_RETURN_IF_ERROR(validate(p));
  HATTN_RETURN_IF_ERROR(validate(p, q));
  HATTN_RETURN_IF_ERROR(validate(p, kv));
  if (out == nullptr) return {StatusCode::kInvalidArgument, "ref::decode: result is null"};
  const std::int32_t B = p.batch_size, H = p.num_q_heads, D = p.head_dim, G = p.group_size();
  const double scale = p.scale();
  out->o.assign(static_cast<std::size_t>(B) * H * D, 0.0);
  out->lse2.assign(static_cast<std::size_t>(B) * H, -std::numeric_limits<double>::infinity());
  std::vector<double> qd(D), s, acc(D);
  for (std::int32_t b = 0; b < B; ++b) {
    const std::int64_t n = kv.seq_len(b);
    if (n == 0) continue;
    s.resize(n);
    for (std::int32_t h = 0; h < H; ++h) {
      const std::int32_t hk = h / G;
      for (std::int32_t d = 0; d < D; ++d)
        qd[d] = load_as_float(q.data, q.dtype, b * q.stride_batch + h * q.stride_head + d);
      double m = -std::numeric_limits<double>::infinity();
      for (std::int64_t t = 0; t < n; ++t) {
        const detail::RowPtrs r = detail::row_at(kv, b, hk, t);
        double dot = 0.0;
        for (std::int32_t d = 0; d < D; ++d) dot += qd[d] * load_as_float(r.k, kv.dtype, d);
        s[t] = dot * scale;
        m = std::max(m, s[t]);
      }
      double l = 0.0;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (std::int64_t t = 0; t < n; ++t) {
        const double w = std::exp(s[t] - m);
        l += w;
        const detail::RowPtrs r = detail::row_at(kv, b, hk, t);
        for (std::int32_t d = 0; d < D; ++d) acc[d] += w * load_as_float(r.v, kv.dtype, d);
      }
      double* o = out->o.data() + (static_cast<std::size_t>(b) * H + h) * D;
      for (std::int32_t d = 0; d < D; ++d) o[d] = acc[d] / l;
      out->lse2[static_cast<std::size_t>(b) * H + h] = (m + std::log(l)) / std::log(2.0);
    }
  }
  return Status::ok();
}

// The same, written into a partial view of any output dtype.
template <KvView Kv>
Status decode(const DecodeProblem& p, const QueryView& q, const Kv& kv, const PartialView& out) {
  HATTN_RETURN_IF_ERROR(validate(p, out));
  Result r;
  HATTN_RETURN_IF_ERROR(decode(p, q, kv, &r));
  const std::int32_t H = p.num_q_heads, D = p.head_dim;
  for (std::int32_t b = 0; b < p.batch_size; ++b)
    for (std::int32_t h = 0; h < H; ++h) {
      const std::size_t i = static_cast<std::size_t>(b) * H + h;
      for (std::int32_t d = 0; d < D; ++d)
        store_from_float(out.o, out.dtype, b * out.stride_batch + h * out.stride_head + d,
                         static_cast<float>(r.o[i * D + d]));
      out.lse2[b * out.lse_stride_batch + h] = static_cast<float>(r.lse2[i]);
    }
  return Status::ok();
}

}  // namespace hattn::ref
