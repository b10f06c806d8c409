#include "common/units.hpp"

#include "common/error.hpp"

#include <cctype>
#include <charconv>
#include <cmath>
#include <fmt/format.h>
#include <limits>

namespace mop {

std::int64_t parse_count(std::string_view text, std::string_view what) {
  auto fail = [&]() -> std::int64_t {
    throw InputError(fmt::format("{} must be a positive whole number such as 4096, 4K, 128K or 1M "
                                 "(K = 1024); got '{}'.",
                                 what, text));
  };
  if (text.empty())
    return fail();
  std::int64_t multiplier = 1;
  std::string_view digits = text;
  switch (std::toupper(static_cast<unsigned char>(text.back()))) {
  case 'K':
    multiplier = std::int64_t{1} << 10;
    break;
  case 'M':
    multiplier = std::int64_t{1} << 20;
    break;
  case 'G':
    multiplier = std::int64_t{1} << 30;
    break;
  case 'T':
    multiplier = std::int64_t{1} << 40;
    break;
  default:
    break;
  }
  if (multiplier != 1)
    digits.remove_suffix(1);
  std::int64_t value = 0;
  auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), value);
  if (ec != std::errc{} || end != digits.data() + digits.size() || value <= 0)
    return fail();
  if (value > std::numeric_limits<std::int64_t>::max() / multiplier)
    return fail();
  return value * multiplier;
}

std::string format_params(double params) {
  const double a = std::fabs(params);
  if (a >= 1e12)
    return fmt::format("{:.3g}T", params / 1e12);
  if (a >= 1e9)
    return fmt::format("{:.3g}B", params / 1e9);
  if (a >= 1e6)
    return fmt::format("{:.3g}M", params / 1e6);
  if (a >= 1e3)
    return fmt::format("{:.3g}K", params / 1e3);
  return fmt::format("{:.0f}", params);
}

std::string format_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  int u = 0;
  double v = bytes;
  while (std::fabs(v) >= 1024.0 && u < 5) {
    v /= 1024.0;
    ++u;
  }
  return u == 0 ? fmt::format("{:.0f} B", v) : fmt::format("{:.1f} {}", v, units[u]);
}

std::string format_seconds(double seconds) {
  const double a = std::fabs(seconds);
  if (a >= 1 || a == 0)
    return fmt::format("{:.3f} s", seconds);
  if (a >= 1e-3)
    return fmt::format("{:.3f} ms", seconds * 1e3);
  return fmt::format("{:.3f} us", seconds * 1e6);
}

std::string format_flops(double flops) {
  return fmt::format("{:.3e}", flops);
}

} // namespace mop
