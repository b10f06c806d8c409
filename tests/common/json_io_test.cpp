#include "common/error.hpp"
#include "common/json_io.hpp"

#include "tests/support/errors.hpp"

#include <doctest/doctest.h>
#include <filesystem>
#include <fstream>

namespace common_json_io_test {

namespace fs = std::filesystem;
using mop::InputError;
using mop::Json;

TEST_CASE("broken JSON names the origin and the line" * doctest::test_suite("plumbing")) {
  const std::string msg =
      mop::test::input_error_of([] { mop::parse_json("{\n \"a\": 1,\n oops }", "x.json"); });
  CHECK(msg.find("x.json") != std::string::npos);
  CHECK(msg.find("line 3") != std::string::npos);
}

TEST_CASE("a missing file is one sentence naming it" * doctest::test_suite("plumbing")) {
  const std::string msg =
      mop::test::input_error_of([] { mop::read_json_file("/nonexistent/config.json"); });
  CHECK(msg == "/nonexistent/config.json: no such file.");
}

TEST_CASE("fields: missing, wrong type and non-positive values name the field" *
          doctest::test_suite("plumbing")) {
  const Json j = Json::parse(R"({"a": 3, "b": -2, "c": "x", "d": 2.0, "e": null})");
  const mop::JsonFields f(j, "m.json");
  CHECK(f.positive_int("a") == 3);
  CHECK(f.positive_int("d") == 2);
  CHECK(f.positive_int_or("e", 7) == 7); // null counts as absent, as HF configs use it
  CHECK(mop::test::input_error_of([&] { f.positive_int("b"); }) ==
        "m.json: field 'b' must be a positive integer (got -2).");
  CHECK(mop::test::input_error_of([&] { f.positive_int("zz"); }) ==
        "m.json: field 'zz' is missing; it must be a positive integer.");
  CHECK(mop::test::input_error_of([&] { f.bool_or("c", false); }) ==
        "m.json: field 'c' must be true or false (got \"x\").");
}

TEST_CASE("atomic write leaves either the whole new file or the old one" *
          doctest::test_suite("plumbing")) {
  const fs::path dir = fs::temp_directory_path() / "mop-json-io-test";
  fs::create_directories(dir);
  const std::string path = (dir / "out.json").string();
  mop::write_file_atomically(path, "{\"v\": 1}");
  CHECK(mop::read_json_file(path)["v"] == 1);
  mop::write_file_atomically(path, "{\"v\": 2}");
  CHECK(mop::read_json_file(path)["v"] == 2);
  int files = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    (void)e;
    ++files;
  }
  CHECK(files == 1); // no temporary left behind
  CHECK_THROWS_AS(mop::write_file_atomically((dir / "no/such/dir/x.json").string(), "{}"),
                  InputError);
  fs::remove_all(dir);
}

TEST_CASE("JSON nested deeper than the ceiling is refused before parsing, with its line" *
          doctest::test_suite("plumbing")) {
  // 100,000 '[' overflowed the stack of the recursive copy and dump of a parsed value.
  const std::string deep = "{\"a\":\n" + std::string(100000, '[') + std::string(100000, ']') + "}";
  CHECK(mop::test::input_error_of([&] { mop::parse_json(deep, "deep.json"); }) ==
        "deep.json nests JSON deeper than 100 levels (line 2).");
  // Exactly at the ceiling parses: 99 lists inside the top-level object are 100 levels.
  const std::string at_limit = "{\"a\":" + std::string(99, '[') + std::string(99, ']') + "}";
  CHECK(mop::parse_json(at_limit, "ok.json").is_object());
  // Brackets inside strings (and escaped quotes) are text, not nesting.
  const std::string in_string = "{\"a\": \"\\\"" + std::string(1000, '[') + "\"}";
  CHECK(mop::parse_json(in_string, "s.json")["a"].get<std::string>().size() == 1001);
}

TEST_CASE("a number beyond a double is one sentence naming the file, the number and the line" *
          doctest::test_suite("plumbing")) {
  CHECK(mop::test::input_error_of([] {
          mop::parse_json("{\n\"hidden_size\": 1e309}", "big.json");
        }) == "big.json: the number 1e309 (line 2) is out of the range of a double.");
  CHECK(mop::test::input_error_of([] { mop::parse_json("[-1e400]", "neg.json"); }) ==
        "neg.json: the number -1e400 (line 1) is out of the range of a double.");
}

TEST_CASE("fields: integers in a range, and quoted values stay bounded" *
          doctest::test_suite("plumbing")) {
  const Json j = Json::parse(R"({"w": 4294967304, "u": 18446744073709551615, "f": 8.0,
                                 "n": -1, "x": 1.5})");
  const mop::JsonFields f(j, "p.json");
  // 4294967304 = 2^32 + 8: an int cast would read it as 8.
  CHECK(mop::test::input_error_of([&] { f.int_in("w", 1, 1 << 20); }) ==
        "p.json: field 'w' must be an integer from 1 to 1048576 (got 4294967304).");
  CHECK(mop::test::input_error_of([&] { f.int_in("u", 1, 1 << 20); }) ==
        "p.json: field 'u' must be an integer from 1 to 1048576 (got 18446744073709551615).");
  CHECK(mop::test::input_error_of([&] { f.positive_int("u"); }) ==
        "p.json: field 'u' must be a positive integer (got 18446744073709551615).");
  CHECK(f.int_in("f", 1, 8) == 8);
  CHECK(f.int_in_or("missing", 1, 8, 3) == 3);
  CHECK(mop::test::input_error_of([&] { f.int_in("n", 0, 3); }).ends_with("(got -1)."));
  CHECK(mop::test::input_error_of([&] { f.int_in("x", 0, 3); }).ends_with("(got 1.5)."));

  Json big = Json::object();
  big["s"] = std::string(1'000'000, 'x');
  big["l"] = Json::array();
  for (int i = 0; i < 100000; ++i)
    big["l"].push_back(i);
  const mop::JsonFields g(big, "big.json");
  const std::string s_msg = mop::test::input_error_of([&] { g.positive_int("s"); });
  CHECK(s_msg.size() < 250); // 120 characters of the string, then "..."
  CHECK(s_msg.find("xxx...\")") != std::string::npos);
  CHECK(mop::test::input_error_of([&] { g.positive_int("l"); }) ==
        "big.json: field 'l' must be a positive integer (got a list of 100000 values).");
  const Json small = Json::parse(R"({"l": [1, "a", {"b": null}]})");
  CHECK(mop::test::input_error_of([&] { mop::JsonFields(small, "s.json").positive_int("l"); }) ==
        "s.json: field 'l' must be a positive integer (got [1,\"a\",{\"b\":null}]).");
}

TEST_CASE("fields: a key outside the known ones is named" * doctest::test_suite("plumbing")) {
  const Json j = Json::parse(R"({"world": 8, "wrold": 8})");
  const mop::JsonFields f(j, "plan.json");
  CHECK(mop::test::input_error_of([&] {
          f.allow_only({"world", "pp"});
        }) == "plan.json: field 'wrold' is not known; allowed: world, pp.");
  f.allow_only({"world", "wrold"}); // no throw
}

TEST_CASE("fields: a figure past the magnitudes a cost model can carry is refused, 0 is kept" *
          doctest::test_suite("plumbing")) {
  // 1e-300 FLOP/s made a GEMM take infinite time; 1e308 bytes overflowed the first product.
  const Json j = Json::parse(
      R"({"tiny": 1e-300, "huge": 1e308, "zero": 0, "launch": 2e-6, "flops": 9.89e14})");
  const mop::JsonFields f(j, "c.json");
  CHECK(mop::test::input_error_of([&] { f.positive_number("tiny"); }) ==
        "c.json: field 'tiny' (1e-300) is outside the range mop accepts for a figure, 1e-15 to "
        "1e+20 in magnitude (or 0 where 0 is allowed).");
  CHECK(mop::test::input_error_of([&] { f.number_or("huge", 1); }) != "");
  CHECK(f.non_negative_number("zero") == 0);
  CHECK(f.positive_number("launch") == 2e-6);
  CHECK(f.positive_number("flops") == 9.89e14);
}

} // namespace common_json_io_test
