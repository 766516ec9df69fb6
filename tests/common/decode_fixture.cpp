#include "common/decode_fixture.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <sstream>

#include "common/catch_print.hpp"
#include "common/check.hpp"
#include "common/seed.hpp"
#include "hattn/cpu/dense_decode.hpp"
#include "hattn/cpu/isa.hpp"
#include "hattn/ref/decode.hpp"

namespace hattn_test {

using hattn::DType;
using hattn::KvLayout;

namespace {

// Padding, in elements, of padded cases: odd, so rows are only element-aligned.
constexpr std::int64_t kHeadPad = 3, kTokenPad = 5, kOuterPad = 7;
constexpr std::int32_t kIndptrBase = 2;  // garbage entries before indptr[0]
constexpr std::size_t kGuardBytes = 64;

std::size_t bytes_of(DType t, std::int64_t n) {
  return hattn::size_of(t) * static_cast<std::size_t>(n);
}

// Strides of K and V and the element offset of V from K in the same buffer
// (interleaved) for a page or sequence of `tokens` tokens. Interleaved K and
// V records share the page (or sequence) stride, but their head (NHD) or
// token (HND) strides differ, so a stride of K used for V would show.
struct PoolLayout {
  hattn::KvStrides k, v;
  std::int64_t v_offset;  // elements; 0 when K and V are separate buffers
};

PoolLayout pool_layout(const DecodeCase& c, std::int64_t tokens) {
  const std::int64_t H = c.num_kv_heads, D = c.head_dim;
  if (!c.padded) {
    const hattn::KvStrides s = hattn::packed_strides(c.layout, tokens, H, D);
    return {s, s, 0};
  }
  if (c.layout == KvLayout::kNHD) {
    // token = [K heads, each D + 3][V heads, each D + 1] + pad.
    const std::int64_t hk = D + kHeadPad, hv = D + 1, ts = H * (hk + hv) + kTokenPad;
    const std::int64_t outer = tokens * ts + kOuterPad;
    return {{outer, ts, hk}, {outer, ts, hv}, H * hk};
  }
  // head = [K tokens, each D + 5][V tokens, each D + 2] + pad.
  const std::int64_t tk = D + kTokenPad, tv = D + 2, hs = tokens * (tk + tv) + kHeadPad;
  const std::int64_t outer = H * hs + kOuterPad;
  return {{outer, tk, hs}, {outer, tv, hs}, tokens * tk};
}

}  // namespace

std::string DecodeCase::describe() const {
  std::ostringstream s;
  s << "kv=" << hattn::to_string(kv) << " q=" << hattn::to_string(q) << " o=" << hattn::to_string(o)
    << " D=" << head_dim << " Hkv=" << num_kv_heads << " group=" << group
    << (layout == KvLayout::kNHD ? " NHD" : " HND");
  if (view == ViewKind::kPaged)
    s << " paged P=" << page_size;
  else
    s << " dense";
  s << (padded ? " padded/interleaved" : " packed") << " lens={";
  for (std::size_t i = 0; i < lens.size(); ++i) s << (i ? "," : "") << lens[i];
  s << "}";
  if (q_scale != 1.0f) s << " q_scale=" << q_scale;
  if (sm_scale) s << " sm_scale=" << *sm_scale;
  return s.str();
}

void fill_nan(void* p, DType t, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i)
    hattn::store_from_float(p, t, static_cast<std::ptrdiff_t>(i),
                            std::numeric_limits<float>::quiet_NaN());
}

DecodeInputs::DecodeInputs(const DecodeCase& c, std::mt19937_64& rng, bool keep_values) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const std::int32_t B = static_cast<std::int32_t>(c.lens.size());
  const std::int32_t Hk = c.num_kv_heads, Hq = c.num_kv_heads * c.group, D = c.head_dim;
  problem_.batch_size = B;
  problem_.num_q_heads = Hq;
  problem_.num_kv_heads = Hk;
  problem_.head_dim = D;
  problem_.kv_dtype = c.kv;
  problem_.q_dtype = c.q;
  problem_.o_dtype = c.o;
  problem_.sm_scale = c.sm_scale;

  // Query: padding holds NaN so reading it would show.
  const std::int64_t qs_head = c.padded ? D + 5 : D;
  const std::int64_t qs_batch = c.padded ? Hq * qs_head + 3 : std::int64_t{Hq} * D;
  const std::int64_t q_elems = std::max<std::int64_t>(1, B * qs_batch);
  q_mem_.resize(bytes_of(c.q, q_elems));
  fill_nan(q_mem_.data(), c.q, static_cast<std::size_t>(q_elems));
  for (std::int32_t b = 0; b < B; ++b)
    for (std::int32_t h = 0; h < Hq; ++h)
      for (std::int32_t d = 0; d < D; ++d) {
        const std::int64_t at = b * qs_batch + h * qs_head + d;
        hattn::store_from_float(q_mem_.data(), c.q, at, normal(rng) * c.q_scale);
        if (keep_values) values_.q.push_back(hattn::load_as_float(q_mem_.data(), c.q, at));
      }
  query_ = {q_mem_.data(), c.q, B, Hq, D, qs_batch, qs_head};

  // KV storage: `outers` pages (or sequences) of `tokens` tokens, all NaN,
  // then the rows of each sequence written where the view will look.
  const std::int64_t max_len = c.lens.empty() ? 0 : *std::max_element(c.lens.begin(), c.lens.end());
  const bool paged = c.view == ViewKind::kPaged;
  const std::int64_t P = c.page_size;
  const std::int64_t tokens = paged ? P : std::max<std::int64_t>(1, max_len + (c.padded ? 3 : 0));
  std::int64_t outers = B;
  if (paged) {
    outers = 3;  // spare pages no sequence owns
    for (const std::int64_t n : c.lens) outers += (n + P - 1) / P;
  }
  const PoolLayout lay = pool_layout(c, tokens);
  const std::int64_t extent = outers * lay.k.outer;
  if (c.padded) {
    k_mem_.resize(bytes_of(c.kv, extent));
    fill_nan(k_mem_.data(), c.kv, static_cast<std::size_t>(extent));
  } else {
    k_mem_.resize(bytes_of(c.kv, extent));
    v_mem_.resize(bytes_of(c.kv, extent));
    fill_nan(k_mem_.data(), c.kv, static_cast<std::size_t>(extent));
    fill_nan(v_mem_.data(), c.kv, static_cast<std::size_t>(extent));
  }
  std::byte* kbase = k_mem_.data();
  std::byte* vbase = c.padded ? k_mem_.data() + bytes_of(c.kv, lay.v_offset) : v_mem_.data();

  // Where token t of sequence b lives: (outer index, token within it).
  std::vector<std::int32_t> page_of;  // pages in random order
  if (paged) {
    page_of.resize(static_cast<std::size_t>(outers));
    std::iota(page_of.begin(), page_of.end(), 0);
    std::shuffle(page_of.begin(), page_of.end(), rng);
    indptr_.assign(1, c.padded ? kIndptrBase : 0);
    if (c.padded) indices_ = {-5, 1 << 30};  // never read: before indptr[0]
    std::size_t next = 0;
    for (std::int32_t b = 0; b < B; ++b) {
      const std::int64_t n = c.lens[static_cast<std::size_t>(b)];
      const std::int64_t pages = (n + P - 1) / P;
      for (std::int64_t i = 0; i < pages; ++i) indices_.push_back(page_of[next++]);
      indptr_.push_back(static_cast<std::int32_t>(indices_.size()));
      last_page_len_.push_back(pages == 0 ? 0 : static_cast<std::int32_t>(n - (pages - 1) * P));
    }
  } else {
    for (const std::int64_t n : c.lens) seq_lens_.push_back(static_cast<std::int32_t>(n));
  }
  for (std::int32_t b = 0; b < B; ++b) {
    const std::int64_t n = c.lens[static_cast<std::size_t>(b)];
    values_.seq_offset.push_back(values_.k.size());
    for (std::int64_t t = 0; t < n; ++t) {
      const std::int64_t outer = paged ? indices_[static_cast<std::size_t>(indptr_[b] + t / P)] : b;
      const std::int64_t within = paged ? t % P : t;
      for (std::int32_t h = 0; h < Hk; ++h) {
        const std::int64_t ko = outer * lay.k.outer + within * lay.k.token + h * lay.k.head;
        const std::int64_t vo = outer * lay.v.outer + within * lay.v.token + h * lay.v.head;
        for (std::int32_t d = 0; d < D; ++d) {
          hattn::store_from_float(kbase, c.kv, ko + d, normal(rng));
          hattn::store_from_float(vbase, c.kv, vo + d, normal(rng));
          if (keep_values) {
            values_.k.push_back(hattn::load_as_float(kbase, c.kv, ko + d));
            values_.v.push_back(hattn::load_as_float(vbase, c.kv, vo + d));
          }
        }
      }
    }
  }

  if (paged) {
    paged_.k = kbase;
    paged_.v = vbase;
    paged_.dtype = c.kv;
    paged_.num_kv_heads = Hk;
    paged_.head_dim = D;
    paged_.page_size = c.page_size;
    paged_.num_pages = outers;
    paged_.k_strides = lay.k;
    paged_.v_strides = lay.v;
    paged_.batch_size = B;
    paged_.indptr = indptr_.data();
    paged_.indices = indices_.data();
    paged_.last_page_len = last_page_len_.data();
  } else {
    dense_.k = kbase;
    dense_.v = vbase;
    dense_.dtype = c.kv;
    dense_.num_kv_heads = Hk;
    dense_.head_dim = D;
    dense_.max_seq_len = tokens;
    dense_.k_strides = lay.k;
    dense_.v_strides = lay.v;
    dense_.batch_size = B;
    dense_.seq_lens = seq_lens_.data();
  }
}

OutputBuffer::OutputBuffer(const hattn::DecodeProblem& p, bool padded) {
  const std::int32_t B = p.batch_size, H = p.num_q_heads, D = p.head_dim;
  const std::int64_t s_head = padded ? D + 3 : D;
  const std::int64_t s_batch = padded ? H * s_head + 5 : std::int64_t{H} * D;
  const std::int64_t s_lse = padded ? H + 2 : H;
  const std::int64_t o_elems = B * s_batch, lse_elems = B * s_lse;
  const std::size_t es = hattn::size_of(p.o_dtype);
  o_mem_.resize(es * static_cast<std::size_t>(o_elems) + kGuardBytes);
  lse_mem_.resize(sizeof(float) * static_cast<std::size_t>(lse_elems) + kGuardBytes);
  fill_nan(o_mem_.data(), p.o_dtype, static_cast<std::size_t>(o_elems));
  fill_nan(lse_mem_.data(), DType::kF32, static_cast<std::size_t>(lse_elems));
  for (std::size_t i = 0; i < kGuardBytes; ++i) {
    o_mem_[o_mem_.size() - kGuardBytes + i] = std::byte{0xa5};
    lse_mem_[lse_mem_.size() - kGuardBytes + i] = std::byte{0x5a};
  }
  o_snap_ = o_mem_;
  lse_snap_ = lse_mem_;
  o_used_.assign(static_cast<std::size_t>(o_elems), false);
  lse_used_.assign(static_cast<std::size_t>(lse_elems), false);
  for (std::int32_t b = 0; b < B; ++b)
    for (std::int32_t h = 0; h < H; ++h) {
      lse_used_[static_cast<std::size_t>(b * s_lse + h)] = true;
      for (std::int32_t d = 0; d < D; ++d)
        o_used_[static_cast<std::size_t>(b * s_batch + h * s_head + d)] = true;
    }
  view_ = {o_mem_.data(), p.o_dtype, reinterpret_cast<float*>(lse_mem_.data()), B, H, D, s_batch,
           s_head,        s_lse};
}

std::vector<double> OutputBuffer::o() const {
  const hattn::PartialView& v = view_;
  std::vector<double> r;
  r.reserve(static_cast<std::size_t>(v.batch_size) * v.num_heads * v.head_dim);
  for (std::int32_t b = 0; b < v.batch_size; ++b)
    for (std::int32_t h = 0; h < v.num_heads; ++h)
      for (std::int32_t d = 0; d < v.head_dim; ++d)
        r.push_back(hattn::load_as_float(v.o, v.dtype, b * v.stride_batch + h * v.stride_head + d));
  return r;
}

std::vector<double> OutputBuffer::lse2() const {
  const hattn::PartialView& v = view_;
  std::vector<double> r;
  for (std::int32_t b = 0; b < v.batch_size; ++b)
    for (std::int32_t h = 0; h < v.num_heads; ++h) r.push_back(v.lse2[b * v.lse_stride_batch + h]);
  return r;
}

std::vector<std::byte> OutputBuffer::bits() const {
  std::vector<std::byte> r;
  const std::size_t es = hattn::size_of(view_.dtype);
  for (std::size_t i = 0; i < o_used_.size(); ++i)
    if (o_used_[i]) r.insert(r.end(), o_mem_.begin() + i * es, o_mem_.begin() + (i + 1) * es);
  for (std::size_t i = 0; i < lse_used_.size(); ++i)
    if (lse_used_[i]) r.insert(r.end(), lse_mem_.begin() + i * 4, lse_mem_.begin() + (i + 1) * 4);
  return r;
}

std::string OutputBuffer::check_untouched() const {
  auto scan = [](const char* what, const std::vector<std::byte>& mem,
                 const std::vector<std::byte>& snap, const std::vector<bool>& used,
                 std::size_t es) -> std::string {
    for (std::size_t byte = 0; byte < mem.size(); ++byte) {
      const std::size_t elem = byte / es;
      if (elem < used.size() && used[elem]) continue;
      if (mem[byte] != snap[byte]) {
        std::ostringstream s;
        s << what << ": byte " << byte << " ("
          << (elem < used.size() ? "padding element " + std::to_string(elem)
                                 : "guard byte " + std::to_string(byte - used.size() * es))
          << ") was written; " << seed_note();
        return s.str();
      }
    }
    return {};
  };
  std::string r = scan("o", o_mem_, o_snap_, o_used_, hattn::size_of(view_.dtype));
  if (r.empty()) r = scan("lse2", lse_mem_, lse_snap_, lse_used_, sizeof(float));
  return r;
}

std::vector<hattn::CpuIsa> available_isas() {
  std::vector<hattn::CpuIsa> r;
  hattn::for_each_value<hattn::SupportedCpuIsas>([&](auto isa) {
    if (hattn::cpu_isa_available(isa.value)) r.push_back(isa.value);
  });
  return r;
}

const hattn::CpuExecutor& shared_executor() {
  static const hattn::CpuExecutor executor;
  return executor;
}

void check_decode_case(const DecodeCase& c, const std::string& tag) {
  std::mt19937_64 rng = make_rng(tag);
  const DecodeInputs in(c, rng);
  const hattn::DecodeProblem& p = in.problem();
  const std::string desc = c.describe();
  INFO(tag << ": " << desc << "; " << seed_note());

  hattn::ref::Result ref;
  if (c.view == ViewKind::kPaged)
    REQUIRE(hattn::ref::decode(p, in.query(), in.paged(), &ref) == hattn::StatusCode::kSuccess);
  else
    REQUIRE(hattn::ref::decode(p, in.query(), in.dense(), &ref) == hattn::StatusCode::kSuccess);

  const std::int64_t H = p.num_q_heads, D = p.head_dim;
  const auto o_index = [&](std::size_t i) {
    const auto n = static_cast<std::int64_t>(i);
    return "o[b=" + std::to_string(n / (H * D)) + "][h=" + std::to_string(n / D % H) +
           "][d=" + std::to_string(n % D) + "]";
  };
  const auto lse_index = [&](std::size_t i) {
    const auto n = static_cast<std::int64_t>(i);
    return "lse2[b=" + std::to_string(n / H) + "][h=" + std::to_string(n % H) + "]";
  };

  // Score scale relative to unit (see scale_for_scores).
  const double kappa = std::abs(static_cast<double>(p.scale())) * c.q_scale * std::sqrt(D);
  // Every ISA with exact (f32) products, and on CPUs with AVX512_BF16 and
  // bf16 KV also the opt-in bf16-product kernel, with its own tolerance.
  using Precision = hattn::cpu::DenseDecode::Precision;
  struct Variant {
    hattn::cpu::DenseDecode backend;
    std::string name;
  };
  std::vector<Variant> variants;
  for (const hattn::CpuIsa isa : available_isas()) {
    variants.push_back({hattn::cpu::DenseDecode(isa), std::string(hattn::to_string(isa))});
    CHECK(variants.back().backend.isa() == isa);
    const hattn::cpu::DenseDecode bf16dot(isa, Precision::kBf16Products);
    if (bf16dot.uses_bf16_products(c.kv))
      variants.push_back({bf16dot, std::string(hattn::to_string(isa)) + "+bf16-products"});
  }
  for (const Variant& var : variants) {
    const hattn::cpu::DenseDecode& backend = var.backend;
    const bool bf16_products = backend.uses_bf16_products(c.kv);
    const std::string context = tag + ": " + desc + " isa=" + var.name;
    INFO("isa=" << var.name);
    REQUIRE(hattn::cpu::DenseDecode::can_implement(p) == hattn::StatusCode::kSuccess);
    std::vector<std::byte> ws(hattn::cpu::DenseDecode::workspace_size(p));
    hattn::cpu::DecodePlan plan;
    OutputBuffer out(p, c.padded);
    if (c.view == ViewKind::kPaged) {
      REQUIRE(backend.plan(p, in.paged(), ws.data(), ws.size(), &plan) ==
              hattn::StatusCode::kSuccess);
      REQUIRE(backend.run(plan, in.query(), in.paged(), out.view(), shared_executor()) ==
              hattn::StatusCode::kSuccess);
    } else {
      REQUIRE(backend.plan(p, in.dense(), ws.data(), ws.size(), &plan) ==
              hattn::StatusCode::kSuccess);
      REQUIRE(backend.run(plan, in.query(), in.dense(), out.view(), shared_executor()) ==
              hattn::StatusCode::kSuccess);
    }
    Tolerance o_tol = scale_for_scores(output_tolerance(c.o), kappa);
    Tolerance lse_tol = scale_for_scores(kLse2Tolerance, kappa);
    if (bf16_products) {
      o_tol = with_bf16_products(o_tol, bf16_products_for_scores(kBf16ProductsOutTolerance, kappa));
      lse_tol =
          with_bf16_products(lse_tol, bf16_products_for_scores(kBf16ProductsLse2Tolerance, kappa));
    }
    const std::vector<double> o = out.o(), lse = out.lse2();
    const std::string o_err = compare("o", o, ref.o, o_tol, context, o_index);
    CHECK(o_err == "");
    const std::string lse_err = compare("lse2", lse, ref.lse2, lse_tol, context, lse_index);
    CHECK(lse_err == "");
    const std::string guard_err = out.check_untouched();
    CHECK(guard_err == "");
    // Empty sequences: exactly o = 0 and lse2 = -inf, not merely close.
    for (std::size_t b = 0; b < c.lens.size(); ++b) {
      if (c.lens[b] != 0) continue;
      bool exact = true;
      for (std::int64_t i = 0; i < H * D; ++i)
        exact =
            exact && o[b * static_cast<std::size_t>(H * D) + static_cast<std::size_t>(i)] == 0.0;
      for (std::int64_t h = 0; h < H; ++h)
        exact = exact && lse[b * static_cast<std::size_t>(H) + static_cast<std::size_t>(h)] ==
                             -std::numeric_limits<double>::infinity();
      INFO("empty sequence b=" << b);
      CHECK(exact);
    }
  }
}

}  // namespace hattn_test
