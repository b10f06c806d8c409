#pragma once
// Parsing and printing of quantities as users write them.
#include <cstdint>
#include <string>
#include <string_view>

namespace mop {

// A token count or byte size: "4096", "4K", "128K", "1M", "2G" (K = 1024, binary, as CLI.md says).
// `what` names the argument in the error sentence ("--seq").
std::int64_t parse_count(std::string_view text, std::string_view what);

// "1.03T", "32.9B", "46.7B", "8.03B", "671M": parameter counts in decimal units, as papers print
// them.
std::string format_params(double params);
// "139.8 GiB", "512 MiB": binary units for memory.
std::string format_bytes(double bytes);
// "725.9 s", "2.13 ms", "41.0 us": a duration in the unit that keeps three significant digits.
std::string format_seconds(double seconds);
// "1.45e11" style for FLOPs.
std::string format_flops(double flops);

} // namespace mop
