#pragma once
// The one error type for bad input: its message is the sentence the user reads.
#include <stdexcept>
#include <string>

namespace mop {

// Thrown where a bad input is found (a file, a field, a value); caught once in main, which
// prints what() and exits 1.
class InputError : public std::runtime_error {
public:
  explicit InputError(const std::string& sentence);
};

} // namespace mop
