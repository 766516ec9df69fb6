#pragma once
// Status: the one error type of hattn. Cheap to copy, never allocates: the
// message is a string with static storage duration, so noexcept hot paths can
// return a descriptive error.

#include <cstdint>
#include <new>
#include <string_view>

namespace hattn {

enum class StatusCode : std::uint8_t {
  kSuccess,
  kInvalidArgument,
  kNotSupported,
  kWorkspaceTooSmall,
  kOutOfMemory,
  kCudaError,
  kInternal,
};

constexpr std::string_view to_string(StatusCode code) noexcept {
  switch (code) {
    case StatusCode::kSuccess: return "success";
    case StatusCode::kInvalidArgument: return "invalid argument";
    case StatusCode::kNotSupported: return "not supported";
    case StatusCode::kWorkspaceTooSmall: return "workspace too small";
    case StatusCode::kOutOfMemory: return "out of memory";
    case StatusCode::kCudaError: return "CUDA error";
    case StatusCode::kInternal: return "internal error";
  }
  return "unknown status";
}

class [[nodiscard]] Status {
 public:
  constexpr Status() noexcept = default;
  // `message` must have static storage duration (a string literal).
  constexpr Status(StatusCode code, const char* message) noexcept
      : code_(code), message_(message) {}

  static constexpr Status ok() noexcept { return {}; }

  constexpr bool is_ok() const noexcept { return code_ == StatusCode::kSuccess; }
  constexpr explicit operator bool() const noexcept { return is_ok(); }
  constexpr StatusCode code() const noexcept { return code_; }
  constexpr const char* message() const noexcept { return message_; }

  friend constexpr bool operator==(const Status& a, StatusCode c) noexcept { return a.code_ == c; }

 private:
  StatusCode code_ = StatusCode::kSuccess;
  const char* message_ = "";
};

namespace detail {

// f() (returning Status) for a caller that must not throw: std::bad_alloc
// from anywhere in f becomes kOutOfMemory with `oom`, any other exception
// kInternal with `other`.
template <class F>
Status status_of(F&& f, const char* oom, const char* other) noexcept {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    return {StatusCode::kOutOfMemory, oom};
  } catch (...) {
    return {StatusCode::kInternal, other};
  }
}

}  // namespace detail

}  // namespace hattn

// Return early from a function returning Status when `expr` fails.
#define HATTN_RETURN_IF_ERROR(expr)                                    \
  do {                                                                 \
    if (::hattn::Status hattn_s_ = (expr); !hattn_s_) return hattn_s_; \
  } while (0)
