#include "common/error.hpp"
#include "common/json_io.hpp"

#include <doctest/doctest.h>
#include <filesystem>
#include <fstream>

namespace fs = std::filesystem;
using mop::InputError;
using mop::Json;

namespace {
std::string message_of(auto&& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}
} // namespace

TEST_CASE("broken JSON names the origin and the line" * doctest::test_suite("plumbing")) {
  const std::string msg = message_of([] { mop::parse_json("{\n \"a\": 1,\n oops }", "x.json"); });
  CHECK(msg.find("x.json") != std::string::npos);
  CHECK(msg.find("line 3") != std::string::npos);
}

TEST_CASE("a missing file is one sentence naming it" * doctest::test_suite("plumbing")) {
  const std::string msg = message_of([] { mop::read_json_file("/nonexistent/config.json"); });
  CHECK(msg == "/nonexistent/config.json: no such file.");
}

TEST_CASE("fields: missing, wrong type and non-positive values name the field" *
          doctest::test_suite("plumbing")) {
  const Json j = Json::parse(R"({"a": 3, "b": -2, "c": "x", "d": 2.0, "e": null})");
  const mop::JsonFields f(j, "m.json");
  CHECK(f.positive_int("a") == 3);
  CHECK(f.positive_int("d") == 2);
  CHECK(f.positive_int_or("e", 7) == 7); // null counts as absent, as HF configs use it
  CHECK(message_of([&] { f.positive_int("b"); }) ==
        "m.json: field 'b' must be a positive integer (got -2).");
  CHECK(message_of([&] { f.positive_int("zz"); }) ==
        "m.json: field 'zz' is missing; it must be a positive integer.");
  CHECK(message_of([&] { f.bool_or("c", false); }) ==
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
