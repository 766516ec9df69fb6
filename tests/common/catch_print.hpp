#pragma once
// Lets Catch print hattn's types in failed assertions, e.g.
//   CHECK(backend.plan(...) == StatusCode::kInvalidArgument)
// shows the code and message that came back.

#include <catch2/catch.hpp>

#include <string>

#include "hattn/core/dtype.hpp"
#include "hattn/core/status.hpp"
#include "hattn/cpu/isa.hpp"

namespace Catch {
template <>
struct StringMaker<hattn::StatusCode> {
  static std::string convert(hattn::StatusCode c) { return std::string(hattn::to_string(c)); }
};
template <>
struct StringMaker<hattn::Status> {
  static std::string convert(const hattn::Status& s) {
    return std::string(hattn::to_string(s.code())) + " (\"" + s.message() + "\")";
  }
};
template <>
struct StringMaker<hattn::CpuIsa> {
  static std::string convert(hattn::CpuIsa i) { return std::string(hattn::to_string(i)); }
};
template <>
struct StringMaker<hattn::DType> {
  static std::string convert(hattn::DType t) { return std::string(hattn::to_string(t)); }
};
}  // namespace Catch
