#pragma once
// The sentence of the InputError a callable throws, for tests of refusals.
#include "common/error.hpp"

#include <string>

namespace mop::test {

// What `f()` refuses with, or "" when it accepts its input.
std::string input_error_of(auto&& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

} // namespace mop::test
