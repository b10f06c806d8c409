#pragma once
// The output layer shared by every command: JSON on stdout, text tables, CSV, and -o FILE.
#include "common/json_io.hpp"

#include <CLI/CLI.hpp>
#include <string>
#include <vector>

namespace mop::cli {

// Adds `--json`, `--format table|json|csv` and `-o,--output FILE` to a command. `json` is the
// command's JSON switch: `--format json` and `--format csv` set it (CSV is the command's JSON
// written as a table, below). With -o, everything the command prints goes to FILE instead of
// stdout, written whole or not at all (common/file_io.hpp write_output_file); a command that
// fails leaves FILE untouched.
void add_output_options(CLI::App* cmd, bool& json);

// Prints one JSON object on stdout (the whole of stdout with --json), or, with --format csv,
// its rows as CSV (csv_of).
void print_json(const Json& j);

// A JSON result as CSV: the rows of its first array of objects among "results", "rows",
// "points", "rank_classes", "models", "clusters" (else of its first array of objects, else the
// object itself as one row); nested objects flattened into dotted columns, arrays as JSON text;
// one header with every column; cells quoted as RFC 4180 asks (comma, quote, CR or LF inside).
std::string csv_of(const Json& j);

// Makes print_json write CSV (what --format csv does; sweep's --csv).
void use_csv();

// Called once by main: the -o file gets what was printed (commit, after success) or stays as
// it was (discard, after a failure). Both are no-ops without -o.
void commit_output();
void discard_output();

// A plain text table: columns left-aligned for text, right-aligned for numbers.
struct TextTable {
  std::vector<std::string> header;
  std::vector<std::vector<std::string>> rows;
  std::vector<bool> right_align; // per column; default: left
  std::string render() const;
};

} // namespace mop::cli
