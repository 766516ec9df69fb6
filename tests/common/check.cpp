#include "common/check.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "common/seed.hpp"

namespace hattn_test {

namespace {
double g_worst_ratio = 0.0;
}

double worst_tolerance_ratio() { return g_worst_ratio; }
void set_worst_tolerance_ratio(double r) { g_worst_ratio = r; }

std::string fmt(double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.9g", x);
  return buf;
}

std::string compare(std::string_view what, std::span<const double> got, std::span<const double> ref,
                    const Tolerance& tol, const std::string& context,
                    const std::function<std::string(std::size_t)>& index_name) {
  std::ostringstream msg;
  if (got.size() != ref.size()) {
    msg << what << ": size " << got.size() << " != reference size " << ref.size() << "; " << context
        << "; " << seed_note();
    return msg.str();
  }
  constexpr int kShow = 8;
  std::size_t failures = 0;
  double sq_err = 0.0, sq_ref = 0.0, worst_ratio = 0.0, max_abs = 0.0;
  std::ostringstream first;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double a = got[i], b = ref[i];
    bool ok;
    double allowed = 0.0;
    if (std::isnan(a) || std::isnan(b)) {
      ok = false;
    } else if (std::isinf(b) || std::isinf(a)) {
      ok = a == b;
    } else {
      allowed = tol.atol + tol.rtol * std::abs(b);
      const double err = std::abs(a - b);
      ok = err <= allowed;
      sq_err += err * err;
      sq_ref += b * b;
      worst_ratio = std::max(worst_ratio, err / allowed);
      max_abs = std::max(max_abs, err);
    }
    if (!ok) {
      if (failures < kShow) {
        first << "\n    ";
        if (index_name)
          first << index_name(i);
        else
          first << '[' << i << ']';
        first << ": got " << fmt(a) << ", ref " << fmt(b) << ", |diff| " << fmt(std::abs(a - b))
              << " > allowed " << fmt(allowed);
      }
      ++failures;
    }
  }
  static const bool verbose = std::getenv("HATTN_TEST_VERBOSE") != nullptr;
  if (verbose)
    std::printf("  %.*s: worst |diff|/allowed %.3g, max |diff| %.3g; %s\n",
                static_cast<int>(what.size()), what.data(), worst_ratio, max_abs, context.c_str());
  const double nmse = sq_ref > 0.0 ? sq_err / sq_ref : 0.0;
  if (failures == 0 && nmse <= tol.nmse) {
    g_worst_ratio = std::max(g_worst_ratio, worst_ratio);  // failures are reported already
    return {};
  }
  msg << what << ": " << failures << " of " << got.size()
      << " elements outside |a-b| <= atol + rtol|b| (atol " << fmt(tol.atol) << ", rtol "
      << fmt(tol.rtol) << "), NMSE " << fmt(nmse) << " (bound " << fmt(tol.nmse) << "), max |diff| "
      << fmt(max_abs) << ", worst |diff|/allowed " << fmt(worst_ratio) << "; " << context << "; "
      << seed_note() << first.str();
  if (failures > kShow) msg << "\n    ...";
  return msg.str();
}

}  // namespace hattn_test
