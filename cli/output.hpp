#pragma once
// Printing helpers shared by the subcommands: JSON on stdout, text tables.
#include "common/json_io.hpp"

#include <string>
#include <vector>

namespace mop::cli {

// Prints one JSON object on stdout (the whole of stdout with --json).
void print_json(const Json& j);

// A plain text table: columns left-aligned for text, right-aligned for numbers.
struct TextTable {
  std::vector<std::string> header;
  std::vector<std::vector<std::string>> rows;
  std::vector<bool> right_align; // per column; default: left
  std::string render() const;
};

} // namespace mop::cli
