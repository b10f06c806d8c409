// Files the program reads and writes, end to end: special files as inputs are refused at once,
// unusable data is refused, output targets are written by their kind and never clobbered, a
// failed write to stdout or to a file is exit 1 with one sentence. Special files are made in a
// scratch folder; /dev/full appears only as the shell's redirect of stdout.
#include "common/json_io.hpp"
#include "tests/cli/run_mop.hpp"

#include <algorithm>
#include <doctest/doctest.h>
#include <filesystem>
#include <fstream>
#include <string>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>
#include <vector>

namespace cli_files_test {

namespace fs = std::filesystem;
using mop::test::count_lines;
using mop::test::run_mop;

namespace {

// A hang fails the test (exit 124) instead of stopping the test run.
const std::string in_time = "timeout 120 ";
const std::string simulate = "simulate --model tiny-moe --cluster h100 --nodes 1 --seq 4K "
                             "--plan mop";

struct Scratch {
  fs::path dir;
  Scratch() {
    std::string pattern = (fs::temp_directory_path() / "mop-cli-files-XXXXXX").string();
    REQUIRE(::mkdtemp(pattern.data()) != nullptr);
    dir = pattern;
  }
  ~Scratch() { fs::remove_all(dir); }
  std::string operator/(const std::string& name) const { return (dir / name).string(); }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(dir))
      out.push_back(e.path().filename().string());
    std::sort(out.begin(), out.end());
    return out;
  }
};

mode_t type_of(const std::string& path) {
  struct stat st {};
  REQUIRE(::lstat(path.c_str(), &st) == 0);
  return st.st_mode & S_IFMT;
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// Exit 1, one line on stderr naming `part`.
void check_refused(const mop::test::MopResult& r, const std::string& part) {
  CHECK(r.status == 1);
  CHECK(count_lines(r.err) == 1);
  CHECK(contains(r.err, part));
}

} // namespace

TEST_CASE("inputs: a FIFO or a device in place of any input file is refused at once" *
          doctest::test_suite("plumbing")) {
  Scratch s;
  REQUIRE(::mkfifo((s / "fifo.json").c_str(), 0600) == 0);
  const std::string fifo = s / "fifo.json";
  for (const std::string& args :
       {"model show " + fifo, "hw show " + fifo,
        "memory --model tiny-moe --cluster " + fifo + " --nodes 1 --seq 4K",
        "memory --model tiny-moe --cluster h100 --nodes 1 --seq 4K --plan " + fifo,
        "memory --model tiny-moe --cluster h100 --nodes 1 --seq 4K --calibration " + fifo,
        "validate --dataset " + fifo, "run --executor cpu --model tiny-moe --data " + fifo}) {
    CAPTURE(args);
    check_refused(run_mop(args, in_time), "is a FIFO (named pipe), not a regular file");
  }
  // /dev/zero would be read for ever: a node of the same device in the scratch folder (the
  // real one, only read, where nodes cannot be made).
  const std::string zero =
      ::mknod((s / "zero").c_str(), S_IFCHR | 0666, makedev(1, 5)) == 0 ? s / "zero" : "/dev/zero";
  for (const std::string& args : {"model show " + zero, "validate --dataset " + zero,
                                  "run --executor cpu --model tiny-moe --data " + zero}) {
    CAPTURE(args);
    check_refused(run_mop(args, in_time), "is a character device, not a regular file");
  }
}

TEST_CASE("inputs: a dataset without rows or a folder as a dataset is refused" *
          doctest::test_suite("plumbing")) {
  Scratch s;
  std::ofstream(s / "empty.jsonl").close();
  check_refused(run_mop("validate --dataset " + s / "empty.jsonl"), "holds no rows");
  check_refused(run_mop("validate --dataset " + s.dir.string()), "is a folder");
}

TEST_CASE("inputs: run --data refuses an empty, a binary and a too short file" *
          doctest::test_suite("plumbing")) {
  Scratch s;
  std::ofstream(s / "empty.txt").close();
  std::ofstream(s / "bin", std::ios::binary) << std::string("\x7f"
                                                            "ELF\0\0",
                                                            6);
  std::ofstream(s / "short.txt") << "only forty bytes of text, not a sequence";
  const std::string run = "run --executor cpu --model tiny-moe --seq 64 --data ";
  check_refused(run_mop(run + s / "empty.txt"), "is empty");
  check_refused(run_mop(run + s / "bin"), "is not text");
  check_refused(run_mop(run + s / "short.txt"), "a sequence of 64 tokens needs at least 65");
}

TEST_CASE("outputs: --trace through a symbolic link writes what it points to, the link stays" *
          doctest::test_suite("plumbing")) {
  Scratch s;
  fs::create_symlink(s / "real.json", s / "link.json");
  const auto r = run_mop(simulate + " --trace " + s / "link.json", in_time);
  REQUIRE(r.status == 0);
  CHECK(type_of(s / "link.json") == S_IFLNK);
  CHECK(mop::Json::parse(mop::test::slurp(s / "real.json")).contains("traceEvents"));
  CHECK(s.names() == std::vector<std::string>{"link.json", "real.json"});
}

TEST_CASE("outputs: --trace to a FIFO without a reader is refused, the FIFO stays" *
          doctest::test_suite("plumbing")) {
  Scratch s;
  REQUIRE(::mkfifo((s / "fifo").c_str(), 0600) == 0);
  check_refused(run_mop(simulate + " --trace " + s / "fifo", in_time), "no process reads");
  CHECK(type_of(s / "fifo") == S_IFIFO);
  CHECK(s.names() == std::vector<std::string>{"fifo"});
}

TEST_CASE("outputs: --trace to a character device writes through it and leaves the node" *
          doctest::test_suite("plumbing")) {
  Scratch s;
  if (::mknod((s / "null").c_str(), S_IFCHR | 0666, makedev(1, 3)) != 0 ||
      ::mknod((s / "full").c_str(), S_IFCHR | 0666, makedev(1, 7)) != 0) {
    MESSAGE("skipped: this process may not make device nodes");
    return;
  }
  CHECK(run_mop(simulate + " --trace " + s / "null", in_time).status == 0);
  CHECK(type_of(s / "null") == S_IFCHR);
  // A node of /dev/full: every write fails with ENOSPC.
  check_refused(run_mop(simulate + " --trace " + s / "full", in_time), "No space left on device");
  CHECK(type_of(s / "full") == S_IFCHR);
  CHECK(s.names() == std::vector<std::string>{"full", "null"});
}

TEST_CASE("outputs: a failed --trace write is exit 1 and leaves no file behind" *
          doctest::test_suite("plumbing")) {
  Scratch s;
  // A 64-block file size limit (RLIMIT_FSIZE, at most 64 KiB) fails the write of the trace
  // (hundreds of KiB) with EFBIG as a full disk fails it with ENOSPC; SIGXFSZ ignored so that
  // the write returns the error.
  const auto r = run_mop(simulate + " --trace " + s / "t.json", "ulimit -f 64; trap '' XFSZ; ");
  check_refused(r, "File too large");
  CHECK(s.names().empty());
  std::ofstream(s / "t.json") << "old";
  const auto again = run_mop(simulate + " --trace " + s / "t.json", "ulimit -f 64; trap '' XFSZ; ");
  check_refused(again, "the file was left as it was");
  CHECK(mop::test::slurp(s / "t.json") == "old");
  CHECK(s.names() == std::vector<std::string>{"t.json"});
}

TEST_CASE("outputs: a --trace path that cannot be written is refused before the simulation" *
          doctest::test_suite("plumbing")) {
  Scratch s;
  fs::create_directory(s / "dir");
  // The model does not exist: the trace path is checked first, so its sentence is the one seen.
  check_refused(
      run_mop("simulate --model no-such-model --cluster h100 --nodes 1 --seq 4K --trace " +
              s / "missing/t.json"),
      "does not exist");
  check_refused(
      run_mop("simulate --model no-such-model --cluster h100 --nodes 1 --seq 4K --trace " +
              s / "dir"),
      "is a folder");
  CHECK(s.names() == std::vector<std::string>{"dir"});
}

TEST_CASE("stdout: a failed write is exit 1 with one sentence, not exit 0 with a cut output" *
          doctest::test_suite("plumbing")) {
  Scratch s;
  // The shell opens /dev/full for stdout: every write to it fails with ENOSPC. Outputs of 6 and
  // 9 KiB fail in a flush on the way (the buffer holds 4 KiB), the 1 KiB table at exit.
  for (const std::string args :
       {"model show kimi-k2 --json", "hw show h200 --json", "model list"}) {
    CAPTURE(args);
    const std::string cmd = std::string(MOP_BINARY) + " " + args + " >/dev/full 2>" + s / "err";
    const int raw = std::system(cmd.c_str());
    REQUIRE(WIFEXITED(raw));
    CHECK(WEXITSTATUS(raw) == 1);
    const std::string err = mop::test::slurp(s / "err");
    CHECK(err == "mop: cannot write the output to stdout (No space left on device).\n");
  }
}

TEST_CASE("messages quoting a path or an argument with a newline stay on one line" *
          doctest::test_suite("plumbing")) {
  Scratch s;
  const std::string odd = s / "a\nb.json";
  for (const std::string& args :
       {"model show '" + odd + "'", "validate --dataset '" + odd + "'",
        std::string("model show kimi-k2 'extra\nargument'"), std::string("'no\nsuch' --help"),
        simulate + " --trace '" + s / "no\ndir/t.json" + "'"}) {
    CAPTURE(args);
    const auto r = run_mop(args, in_time);
    CHECK(r.status != 0);
    CHECK(count_lines(r.err) == 1);
    CHECK(contains(r.err, "\\n"));
  }
}

TEST_CASE("a file name that is not UTF-8 prints as valid JSON, not an internal error" *
          doctest::test_suite("plumbing")) {
  Scratch s;
  const std::string name = s / "bad\xff.json"; // the model's name comes from the file name
  fs::copy_file(std::string(MOP_SOURCE_DIR) + "/configs/models/tiny-moe.json", name);
  const auto r = run_mop("model show '" + name + "' --json");
  CHECK(r.status == 0);
  const mop::Json j = mop::parse_json(r.out, "stdout");
  CHECK(j.at("name").get<std::string>().find("\xef\xbf\xbd") != std::string::npos); // U+FFFD
}

} // namespace cli_files_test
