#pragma once
// One way to turn a runtime value into a compile-time constant: look it up in a
// ValueList. The same lists (core/supported.hpp) drive can_implement, explicit
// instantiation, tests and benchmarks, so "supported" means one thing.

#include <cstddef>
#include <type_traits>
#include <utility>

#include "hattn/core/status.hpp"

namespace hattn {

template <auto... Vs>
struct ValueList {
  static constexpr std::size_t size = sizeof...(Vs);
};

template <class List>
struct ListTraits;
template <auto... Vs>
struct ListTraits<ValueList<Vs...>> {
  template <class T>
  static constexpr bool contains([[maybe_unused]] T v) noexcept {
    return ((static_cast<T>(Vs) == v) || ...);
  }
  template <class F>
  static constexpr void for_each(F&& f) {
    (f(std::integral_constant<decltype(Vs), Vs>{}), ...);
  }
};

template <class List, class T>
constexpr bool contains(T value) noexcept {
  return ListTraits<List>::contains(value);
}

// Call f(std::integral_constant<..., V>{}) for every V in the list, in order.
template <class List, class F>
constexpr void for_each_value(F&& f) {
  ListTraits<List>::for_each(std::forward<F>(f));
}

// Call f(std::integral_constant<..., V>{}) for the V equal to `value`. Returns
// kNotSupported when the value is not in the list, otherwise what f returns
// (f may return Status or void).
template <class List, class T, class F>
Status dispatch(T value, F&& f) {
  Status result(StatusCode::kNotSupported, "value not in the supported list");
  for_each_value<List>([&](auto c) {
    if (static_cast<T>(c.value) == value) {
      if constexpr (std::is_void_v<decltype(f(c))>) {
        f(c);
        result = Status::ok();
      } else {
        result = f(c);
      }
    }
  });
  return result;
}

}  // namespace hattn
