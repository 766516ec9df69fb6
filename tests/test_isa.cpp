// ISA detection, selection and the HATTN_CPU_ISA override.

#include <catch2/catch.hpp>

#include <cstdlib>
#include <optional>
#include <string>

#include "common/catch_print.hpp"
#include "common/decode_fixture.hpp"
#include "hattn/cpu/dense_decode.hpp"
#include "hattn/cpu/isa.hpp"

using hattn::CpuIsa;

namespace {

// Sets HATTN_CPU_ISA for its lifetime and restores the previous value.
class ScopedIsaEnv {
 public:
  explicit ScopedIsaEnv(const char* value) {
    if (const char* old = std::getenv("HATTN_CPU_ISA")) old_ = std::string(old);
    if (value)
      ::setenv("HATTN_CPU_ISA", value, 1);
    else
      ::unsetenv("HATTN_CPU_ISA");
  }
  ~ScopedIsaEnv() {
    if (old_)
      ::setenv("HATTN_CPU_ISA", old_->c_str(), 1);
    else
      ::unsetenv("HATTN_CPU_ISA");
  }
  ScopedIsaEnv(const ScopedIsaEnv&) = delete;
  ScopedIsaEnv& operator=(const ScopedIsaEnv&) = delete;

 private:
  std::optional<std::string> old_;
};

}  // namespace

TEST_CASE("ISA availability is consistent", "[isa]") {
  const CpuIsa best = hattn::cpu_isa_supported();
  INFO("best ISA: " << hattn::to_string(best));
  CHECK(hattn::cpu_isa_available(CpuIsa::kScalar));
  CHECK(hattn::cpu_isa_available(best));
  // Available ISAs are exactly those up to the best one.
  hattn::for_each_value<hattn::SupportedCpuIsas>([&](auto isa) {
    CHECK(hattn::cpu_isa_available(isa.value) ==
          (static_cast<int>(isa.value) <= static_cast<int>(best)));
  });
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    CHECK(best == CpuIsa::kAvx512);
  CHECK(hattn::cpu_has_avx512_bf16() ==
        (best == CpuIsa::kAvx512 && __builtin_cpu_supports("avx512bf16")));
#endif
}

TEST_CASE("DenseDecode uses the ISA it is given when the CPU has it", "[isa]") {
  hattn::for_each_value<hattn::SupportedCpuIsas>([&](auto isa) {
    const hattn::cpu::DenseDecode backend(isa.value);
    INFO("requested " << hattn::to_string(isa.value));
    if (hattn::cpu_isa_available(isa.value))
      CHECK(backend.isa() == isa.value);
    else
      CHECK(backend.isa() == hattn::cpu_isa_supported());
  });
  // The suite runs every decode case on each of these; say which they are.
  std::string names;
  for (const CpuIsa isa : hattn_test::available_isas())
    names.append(" ").append(hattn::to_string(isa));
  WARN("ISAs tested on this host:" << names);
}

TEST_CASE("HATTN_CPU_ISA lowers the default ISA, never raises it", "[isa][env]") {
  const CpuIsa best = hattn::cpu_isa_supported();
  {
    const ScopedIsaEnv env(nullptr);
    CHECK(hattn::cpu_isa_default() == best);
    CHECK(hattn::cpu::DenseDecode().isa() == best);
  }
  hattn::for_each_value<hattn::SupportedCpuIsas>([&](auto isa) {
    const std::string name(hattn::to_string(isa.value));
    const ScopedIsaEnv env(name.c_str());
    INFO("HATTN_CPU_ISA=" << name);
    const CpuIsa want = hattn::cpu_isa_available(isa.value) ? isa.value : best;
    CHECK(hattn::cpu_isa_default() == want);
    CHECK(hattn::cpu::DenseDecode().isa() == want);  // default argument reads it
  });
  for (const char* junk : {"", "AVX512", "sse2", "avx512 ", "neon"}) {
    const ScopedIsaEnv env(junk);
    INFO("HATTN_CPU_ISA='" << junk << "'");
    CHECK(hattn::cpu_isa_default() == best);
  }
}

TEST_CASE("bf16 products are used exactly where asked for and supported", "[isa]") {
  using Precision = hattn::cpu::DenseDecode::Precision;
  hattn::for_each_value<hattn::SupportedCpuIsas>([&](auto isa) {
    for (const Precision prec : {Precision::kF32, Precision::kBf16Products}) {
      const hattn::cpu::DenseDecode backend(isa.value, prec);
      CHECK(backend.precision() == prec);
      hattn::for_each_value<hattn::SupportedKvDTypes>([&](auto kv) {
        INFO("isa " << hattn::to_string(backend.isa()) << ", KV " << hattn::to_string(kv.value)
                    << ", bf16 products requested: " << (prec == Precision::kBf16Products));
        CHECK(backend.uses_bf16_products(kv.value) ==
              (prec == Precision::kBf16Products && kv.value == hattn::DType::kBF16 &&
               backend.isa() == CpuIsa::kAvx512 && hattn::cpu_has_avx512_bf16()));
      });
    }
  });
}
