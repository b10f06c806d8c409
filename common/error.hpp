#pragma once
// The one error type for bad input: its message is the sentence the user reads.
#include <stdexcept>
#include <string>
#include <string_view>

namespace mop {

// Thrown where a bad input is found (a file, a field, a value); caught once in main, which
// prints what() and exits 1. The sentence is kept to one line of bounded length whatever it
// quotes: control characters (a newline in a path) are escaped and an overlong sentence is cut.
class InputError : public std::runtime_error {
public:
  explicit InputError(const std::string& sentence);
};

// `text` as an error sentence may quote it: control characters escaped (\n, \x01), at most
// `max_chars` characters kept, the rest replaced by "...".
std::string quote_for_message(std::string_view text, std::size_t max_chars = 120);

} // namespace mop
