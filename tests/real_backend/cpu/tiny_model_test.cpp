// The data a run trains on: a text file is read through the one input reader and refused when it
// cannot give one sequence of text.
#include "real_backend/cpu/tiny_model.hpp"

#include "common/error.hpp"

#include <doctest/doctest.h>
#include <filesystem>
#include <fstream>
#include <string>
#include <sys/stat.h>
#include <unistd.h>

namespace real_backend_cpu_tiny_model_test {

using namespace mop::real;
namespace fs = std::filesystem;

namespace {

struct Scratch {
  fs::path dir;
  Scratch() {
    std::string pattern = (fs::temp_directory_path() / "mop-data-XXXXXX").string();
    REQUIRE(::mkdtemp(pattern.data()) != nullptr);
    dir = pattern;
  }
  ~Scratch() { fs::remove_all(dir); }
  std::string file(const std::string& name, const std::string& bytes) const {
    std::ofstream(dir / name, std::ios::binary) << bytes;
    return (dir / name).string();
  }
};

std::string message_of(auto&& f) {
  try {
    f();
  } catch (const mop::InputError& e) {
    return e.what();
  }
  return "";
}

} // namespace

TEST_CASE("data file: every byte is a token, high bytes included, and sequences follow the text" *
          doctest::test_suite("plumbing")) {
  Scratch s;
  // "ab" followed by byte 0xff: with a vocabulary of 256 every byte value is a token id.
  const std::string text = std::string("ab\xff", 3);
  const DataSource d = DataSource::text_file(s.file("t.txt", text), 256, 1);
  CHECK_NOTHROW(d.check_sequence_length(2)); // 2 inputs + 1 label = the 3 bytes
  const Batch b = d.batch(0, 1, 2);
  // One span of the text: the first label is the second input.
  CHECK(b.labels[0] == b.tokens[1]);
  for (const auto t : b.tokens)
    CHECK((t == 'a' || t == 'b' || t == 0xff));
}

TEST_CASE("data file: empty, binary (a NUL byte) and too short for a sequence are refused" *
          doctest::test_suite("plumbing")) {
  Scratch s;
  const std::string empty = s.file("empty.txt", "");
  CHECK(message_of([&] { DataSource::text_file(empty, 256, 1); }) ==
        "the data file '" + empty + "' is empty; --data needs a text file");
  const std::string binary = s.file("bin", std::string("\x7f"
                                                       "ELF\0\0\x01",
                                                       7));
  CHECK(message_of([&] { DataSource::text_file(binary, 256, 1); }) ==
        "the data file '" + binary +
            "' is not text (a NUL byte at offset 4); --data trains on the bytes of a text file");
  const std::string short_text = s.file("short.txt", "hello");
  const DataSource d = DataSource::text_file(short_text, 256, 1);
  CHECK_NOTHROW(d.check_sequence_length(4)); // 4 inputs + 1 label = the 5 bytes
  CHECK(message_of([&] { d.check_sequence_length(64); }) ==
        "the data file '" + short_text +
            "' holds 5 bytes; a sequence of 64 tokens needs at least 65");
  // The synthetic stream has no length to run out of.
  CHECK_NOTHROW(DataSource::synthetic(256, 1).check_sequence_length(1 << 20));
}

TEST_CASE("data file: a FIFO, a folder and a missing file are refused without blocking" *
          doctest::test_suite("plumbing")) {
  Scratch s;
  REQUIRE(::mkfifo((s.dir / "fifo").c_str(), 0600) == 0);
  CHECK(message_of([&] {
          DataSource::text_file((s.dir / "fifo").string(), 256, 1);
        }).find("is a FIFO") != std::string::npos);
  CHECK(message_of([&] { DataSource::text_file(s.dir.string(), 256, 1); }).find("is a folder") !=
        std::string::npos);
  CHECK(message_of([&] { DataSource::text_file((s.dir / "none").string(), 256, 1); }) ==
        (s.dir / "none").string() + ": no such file.");
}

} // namespace real_backend_cpu_tiny_model_test
