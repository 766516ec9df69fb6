// Portable fused GEMV for the model's decode projections (see gemv.hpp), for
// CPUs without AVX2: eight partial sums per dot product in plain C++ (the
// compiler vectorizes them for the baseline ISA).

#include <array>

#include "model/gemv.hpp"
#include "model/gemv_kernel.hpp"

namespace hattn::model::detail {
namespace {

struct Portable {
  static constexpr int kLanes = 8;
  using Reg = std::array<float, kLanes>;
  static Reg zero() noexcept { return Reg{}; }
  static Reg fma(const Reg& a, const Reg& b, Reg c) noexcept {
    for (int l = 0; l < kLanes; ++l) c[l] += a[l] * b[l];
    return c;
  }
  static float sum(const Reg& v) noexcept {
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
  }
  template <DType kDtype>
  static float widen(const unsigned char* row, std::int64_t i) noexcept {
    if constexpr (kDtype == DType::kF32) {
      return reinterpret_cast<const float*>(row)[i];
    } else if constexpr (kDtype == DType::kBF16) {
      return to_float(reinterpret_cast<const bf16*>(row)[i]);
    } else {
      return to_float(reinterpret_cast<const f16*>(row)[i]);
    }
  }
  template <DType kDtype>
  static Reg load_w_tail(const unsigned char* row, std::int64_t i, int n) noexcept {
    Reg r{};
    for (int l = 0; l < n; ++l) r[l] = widen<kDtype>(row, i + l);
    return r;
  }
  template <DType kDtype>
  static Reg load_w(const unsigned char* row, std::int64_t i) noexcept {
    return load_w_tail<kDtype>(row, i, kLanes);
  }
  static Reg load_x_tail(const float* p, int n) noexcept {
    Reg r{};
    for (int l = 0; l < n; ++l) r[l] = p[l];
    return r;
  }
  static Reg load_x(const float* p) noexcept { return load_x_tail(p, kLanes); }
};

}  // namespace

void gemv_rows_scalar(const void* w, DType dtype, std::int64_t in, std::int64_t r0, std::int64_t r1,
                      const float* x, std::int64_t num_tokens, float* y,
                      std::int64_t y_stride) noexcept {
  gemv::run<Portable>(w, dtype, in, r0, r1, x, num_tokens, y, y_stride);
}

}  // namespace hattn::model::detail
