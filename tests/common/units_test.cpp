#include "common/error.hpp"
#include "common/units.hpp"

#include <doctest/doctest.h>

namespace common_units_test {

using mop::parse_count;

TEST_CASE("sizes use binary suffixes as CLI.md defines them (K = 1024, 1M = 1,048,576)" *
          doctest::test_suite("plumbing")) {
  CHECK(parse_count("4096", "--seq") == 4096);
  CHECK(parse_count("4K", "--seq") == 4096);
  CHECK(parse_count("128k", "--seq") == 131072);
  CHECK(parse_count("1M", "--seq") == 1048576);
  CHECK(parse_count("2G", "--bytes") == 2147483648LL);
}

TEST_CASE("a size that is not a positive whole number is refused with the argument's name" *
          doctest::test_suite("plumbing")) {
  for (const char* bad : {"", "0", "-4K", "4.5K", "K", "12Q", "1e6", "99999999999999999999"}) {
    CAPTURE(bad);
    try {
      parse_count(bad, "--seq");
      FAIL("accepted");
    } catch (const mop::InputError& e) {
      CHECK(std::string(e.what()).find("--seq") != std::string::npos);
    }
  }
}

TEST_CASE("parameter counts print as papers print them" * doctest::test_suite("plumbing")) {
  CHECK(mop::format_params(1.0264e12) == "1.03T");
  CHECK(mop::format_params(46.7e9) == "46.7B");
  CHECK(mop::format_params(8.03e9) == "8.03B");
  CHECK(mop::format_bytes(150.1e9) == "139.8 GiB");
}

TEST_CASE("durations print in the unit that keeps them readable" *
          doctest::test_suite("plumbing")) {
  CHECK(mop::format_seconds(725.914) == "725.914 s");
  CHECK(mop::format_seconds(0.00213) == "2.130 ms");
  CHECK(mop::format_seconds(41e-6) == "41.000 us");
}

} // namespace common_units_test
