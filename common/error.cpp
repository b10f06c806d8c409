#include "common/error.hpp"

#include <fmt/format.h>

namespace mop {

namespace {

// A whole sentence stays readable on one terminal screen even when it quotes several values.
constexpr std::size_t max_sentence_chars = 1000;

} // namespace

std::string quote_for_message(std::string_view text, std::size_t max_chars) {
  std::string out;
  std::size_t kept = 0;
  for (const char c : text) {
    if (kept == max_chars) {
      out += "...";
      break;
    }
    const auto u = static_cast<unsigned char>(c);
    if (c == '\n')
      out += "\\n";
    else if (c == '\r')
      out += "\\r";
    else if (c == '\t')
      out += "\\t";
    else if (u < 0x20 || u == 0x7f)
      out += fmt::format("\\x{:02x}", u);
    else
      out += c;
    ++kept;
  }
  return out;
}

InputError::InputError(const std::string& sentence)
    : std::runtime_error(quote_for_message(sentence, max_sentence_chars)) {}

} // namespace mop
