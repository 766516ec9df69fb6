#pragma once
// The supported lists of core/supported.hpp as vectors, so sweeps iterate
// over exactly what the library says it supports.

#include <type_traits>
#include <vector>

#include "hattn/core/supported.hpp"

namespace hattn_test {

template <class List>
struct ListValues;
template <auto... Vs>
struct ListValues<hattn::ValueList<Vs...>> {
  using T = std::common_type_t<decltype(Vs)...>;
  static std::vector<T> get() { return {static_cast<T>(Vs)...}; }
};

template <class List>
auto list_values() {
  return ListValues<List>::get();
}

}  // namespace hattn_test
