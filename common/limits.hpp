#pragma once
// Every ceiling mop puts on its inputs, in one place. Each is far above what any real model,
// cluster or run reaches, and low enough that the arithmetic on it cannot overflow 64 bits and
// the work it implies finishes in seconds. A value past a ceiling is an InputError that names it.
#include <cstdint>

namespace mop::limits {

// Input files: a Hugging Face config or a cluster JSON is kilobytes; the largest dataset
// shipped is under a megabyte. Bigger inputs are refused before they are read.
inline constexpr std::int64_t max_input_file_bytes = std::int64_t{64} << 20;
// JSON nesting: real inputs nest 4-5 levels; the parser recurses once per level.
inline constexpr int max_json_depth = 100;
// Error sentences quote at most this many characters of an offending value.
inline constexpr std::size_t max_quoted_chars = 120;

} // namespace mop::limits
