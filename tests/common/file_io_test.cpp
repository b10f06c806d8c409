// The one reader of input files and the one writer of output files: what each accepts, what it
// refuses with a sentence, and what it leaves on disk. Special files (FIFOs, device nodes,
// sockets, links) are made inside a scratch folder, never taken from /dev.
#include "common/error.hpp"
#include "common/file_io.hpp"
#include "common/json_io.hpp"
#include "common/limits.hpp"

#include <algorithm>
#include <chrono>
#include <csignal>
#include <doctest/doctest.h>
#include <fcntl.h>
#include <filesystem>
#include <fstream>
#include <poll.h>
#include <string>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
#include <vector>

namespace common_file_io_test {

namespace fs = std::filesystem;
using mop::InputError;

namespace {

std::string message_of(auto&& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// A fresh folder (mkdtemp) removed with everything in it at the end of the test.
struct Scratch {
  fs::path dir;
  Scratch() {
    std::string pattern = (fs::temp_directory_path() / "mop-file-io-XXXXXX").string();
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

void put(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

std::string get(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// A character device node like /dev/null (1,3) or /dev/full (1,7), made in the scratch folder;
// false where this process may not make device nodes.
bool make_char_device(const std::string& path, unsigned minor) {
  return ::mknod(path.c_str(), S_IFCHR | 0666, makedev(1, minor)) == 0;
}

mode_t type_of(const std::string& path) {
  struct stat st {};
  REQUIRE(::lstat(path.c_str(), &st) == 0);
  return st.st_mode & S_IFMT;
}

// Binds a Unix socket at `path`; returns its descriptor.
int bind_socket(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  REQUIRE(path.size() < sizeof addr.sun_path);
  std::copy(path.begin(), path.end(), addr.sun_path);
  REQUIRE(::bind(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0);
  return fd;
}

} // namespace

TEST_CASE("input: a regular file and a symbolic link to one are read whole" *
          doctest::test_suite("plumbing")) {
  Scratch s;
  put(s / "a.json", "{\"v\": 1}\n");
  fs::create_symlink(s / "a.json", s / "link.json");
  CHECK(mop::read_input_file(s / "a.json") == "{\"v\": 1}\n");
  CHECK(mop::read_input_file(s / "link.json") == "{\"v\": 1}\n");
  put(s / "empty", "");
  CHECK(mop::read_input_file(s / "empty").empty());
}

TEST_CASE("input: a FIFO is refused at once, not waited on" * doctest::test_suite("plumbing")) {
  Scratch s;
  REQUIRE(::mkfifo((s / "fifo").c_str(), 0600) == 0);
  const auto t0 = std::chrono::steady_clock::now();
  const std::string msg = message_of([&] { mop::read_input_file(s / "fifo"); });
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5));
  CHECK(msg == s / "fifo" + " is a FIFO (named pipe), not a regular file; mop reads inputs only "
                            "from regular files.");
  CHECK(contains(message_of([&] { mop::read_json_file(s / "fifo"); }), "FIFO"));
}

TEST_CASE("input: a folder, a device and a socket are refused with what they are" *
          doctest::test_suite("plumbing")) {
  Scratch s;
  fs::create_directory(s / "dir");
  CHECK(contains(message_of([&] { mop::read_input_file(s / "dir"); }), "dir is a folder"));
  // Reading /dev/zero would never end; a node of the same device in the scratch folder, or the
  // real one (read, never written) where nodes cannot be made.
  const std::string zero = make_char_device(s / "zero", 5) ? s / "zero" : "/dev/zero";
  CHECK(message_of([&] { mop::read_input_file(zero); }) ==
        zero + " is a character device, not a regular file; mop reads inputs only from regular "
               "files.");
  const int sock = bind_socket(s / "sock");
  CHECK(contains(message_of([&] { mop::read_input_file(s / "sock"); }), "sock is a socket"));
  ::close(sock);
}

TEST_CASE("input: a missing file, an empty path and a path with a newline are one sentence" *
          doctest::test_suite("plumbing")) {
  CHECK(message_of([] { mop::read_input_file("/nonexistent/x.json"); }) ==
        "/nonexistent/x.json: no such file.");
  CHECK(message_of([] { mop::read_input_file(""); }) == "an input file path is empty.");
  const std::string msg = message_of([] { mop::read_input_file("/nonexistent/a\nb.json"); });
  CHECK(msg == "/nonexistent/a\\nb.json: no such file.");
}

TEST_CASE("input: a file over the limit is refused before it is read, one at the limit is read" *
          doctest::test_suite("plumbing")) {
  Scratch s;
  // Sparse files: the size is set without writing 64 MiB.
  put(s / "at", "");
  put(s / "over", "");
  fs::resize_file(fs::path(s / "at"), mop::limits::max_input_file_bytes);
  fs::resize_file(fs::path(s / "over"), mop::limits::max_input_file_bytes + 1);
  CHECK(mop::read_input_file(s / "at").size() ==
        static_cast<std::size_t>(mop::limits::max_input_file_bytes));
  CHECK(message_of([&] { mop::read_input_file(s / "over"); }) ==
        s / "over" + " is larger than 64 MiB, the most mop reads from an input file.");
}

TEST_CASE("output: a new file and a replaced file hold the whole text and no temporary is left" *
          doctest::test_suite("plumbing")) {
  Scratch s;
  mop::write_output_file(s / "out.json", "first");
  CHECK(get(s / "out.json") == "first");
  ::chmod((s / "out.json").c_str(), 0640);
  mop::write_output_file(s / "out.json", "second");
  CHECK(get(s / "out.json") == "second");
  CHECK((fs::status(fs::path(s / "out.json")).permissions() & fs::perms::all) ==
        (fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read));
  CHECK(s.names() == std::vector<std::string>{"out.json"});
  // The old name keeps working for code that writes checkpoints.
  mop::write_file_atomically(s / "out.json", "third");
  CHECK(get(s / "out.json") == "third");
  CHECK(s.names() == std::vector<std::string>{"out.json"});
}

TEST_CASE("output: a symbolic link stays and what it points to gets the text" *
          doctest::test_suite("plumbing")) {
  Scratch s;
  put(s / "real.json", "old");
  fs::create_symlink("real.json", s / "link.json"); // relative: resolved from the link's folder
  mop::write_output_file(s / "link.json", "new");
  CHECK(type_of(s / "link.json") == S_IFLNK);
  CHECK(get(s / "real.json") == "new");
  // A dangling link: the file it names is created.
  fs::create_symlink(s / "later.json", s / "dangling.json");
  mop::write_output_file(s / "dangling.json", "made");
  CHECK(type_of(s / "dangling.json") == S_IFLNK);
  CHECK(get(s / "later.json") == "made");
  CHECK(s.names() ==
        std::vector<std::string>{"dangling.json", "later.json", "link.json", "real.json"});
  // A loop of links is a sentence, not a hang.
  fs::create_symlink(s / "loop-b", s / "loop-a");
  fs::create_symlink(s / "loop-a", s / "loop-b");
  CHECK(contains(message_of([&] { mop::write_output_file(s / "loop-a", "x"); }),
                 "too many levels of symbolic links"));
}

TEST_CASE("output: a FIFO is written through when read, and refused at once without a reader" *
          doctest::test_suite("plumbing")) {
  Scratch s;
  REQUIRE(::mkfifo((s / "fifo").c_str(), 0600) == 0);
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(message_of([&] { mop::write_output_file(s / "fifo", "x"); }) ==
        s / "fifo" + " is a FIFO (named pipe) that no process reads; start the reader first.");
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5));
  // 1 MiB: more than a pipe holds (64 KiB), so the writer must wait for the reader.
  const std::string text(1 << 20, 'x');
  std::string received;
  std::thread reader([&] { received = get(s / "fifo"); });
  // The reader opens the FIFO when its thread runs: retry until it is there.
  for (int i = 0; i < 500; ++i) {
    if (message_of([&] { mop::write_output_file(s / "fifo", text); }).empty())
      break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  reader.join();
  CHECK(received == text);
  CHECK(type_of(s / "fifo") == S_IFIFO);
  CHECK(s.names() == std::vector<std::string>{"fifo"});
}

TEST_CASE("output: a FIFO whose reader leaves is a sentence, not a SIGPIPE" *
          doctest::test_suite("plumbing")) {
  Scratch s;
  REQUIRE(::mkfifo((s / "fifo").c_str(), 0600) == 0);
  // The reader opens, then closes without reading once the writer has filled the pipe: the
  // writer's next write gets EPIPE (and, by default, a SIGPIPE that would kill the process).
  const int rd = ::open((s / "fifo").c_str(), O_RDONLY | O_NONBLOCK);
  REQUIRE(rd >= 0);
  std::thread closer([&] {
    pollfd p{rd, POLLIN, 0};
    ::poll(&p, 1, 10000);
    ::close(rd);
  });
  const std::string msg =
      message_of([&] { mop::write_output_file(s / "fifo", std::string(1 << 20, 'x')); });
  closer.join();
  CHECK(contains(msg, "Broken pipe"));
  sigset_t pending;
  sigpending(&pending);
  CHECK(sigismember(&pending, SIGPIPE) == 0); // consumed, not left for later
}

TEST_CASE("output: a character device is written through and stays a device" *
          doctest::test_suite("plumbing")) {
  Scratch s;
  if (!make_char_device(s / "null", 3) || !make_char_device(s / "full", 7)) {
    MESSAGE("skipped: this process may not make device nodes");
    return;
  }
  mop::write_output_file(s / "null", "discarded");
  CHECK(type_of(s / "null") == S_IFCHR);
  // Writing to /dev/full always fails with ENOSPC (Linux Documentation/admin-guide/devices.txt).
  CHECK(message_of([&] { mop::write_output_file(s / "full", "lost"); }) ==
        "writing " + s / "full" + " failed (No space left on device).");
  CHECK(type_of(s / "full") == S_IFCHR);
  CHECK(s.names() == std::vector<std::string>{"full", "null"});
}

TEST_CASE("output: a folder, a socket and a missing folder are refused, nothing is created" *
          doctest::test_suite("plumbing")) {
  Scratch s;
  fs::create_directory(s / "dir");
  CHECK(message_of([&] { mop::write_output_file(s / "dir", "x"); }) ==
        s / "dir" + " is a folder; give the output a file name inside it.");
  const int sock = bind_socket(s / "sock");
  CHECK(message_of([&] { mop::write_output_file(s / "sock", "x"); }) ==
        s / "sock" + " is a socket; mop writes outputs to regular files, FIFOs and character "
                     "devices only.");
  ::close(sock);
  CHECK(message_of([&] { mop::write_output_file(s / "no/such/out.json", "x"); }) ==
        s / "no/such/out.json" + ": the folder " + s / "no/such" + " does not exist.");
  CHECK(message_of([&] { mop::write_output_file("", "x"); }) == "the output file path is empty.");
  CHECK(s.names() == std::vector<std::string>{"dir", "sock"});
  CHECK(fs::is_empty(fs::path(s / "dir")));
}

TEST_CASE("output: a failed write leaves the old file whole and no temporary file" *
          doctest::test_suite("plumbing")) {
  Scratch s;
  put(s / "out.json", "old");
  // In a child process: a file size limit of 4 KiB (RLIMIT_FSIZE) makes the 64 KiB write fail
  // with EFBIG, the way a full disk fails it with ENOSPC.
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    std::signal(SIGXFSZ, SIG_IGN);
    const rlimit limit{4096, 4096};
    ::setrlimit(RLIMIT_FSIZE, &limit);
    const std::string msg =
        message_of([&] { mop::write_output_file(s / "out.json", std::string(65536, 'x')); });
    ::_exit(msg == "writing " + s / "out.json" +
                        " failed (File too large); the file was left as it was."
                ? 0
                : 1);
  }
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  CHECK(get(s / "out.json") == "old");
  CHECK(s.names() == std::vector<std::string>{"out.json"});
}

TEST_CASE("check_output_path refuses up front what the writer would refuse, and writes nothing" *
          doctest::test_suite("plumbing")) {
  Scratch s;
  fs::create_directory(s / "dir");
  REQUIRE(::mkfifo((s / "fifo").c_str(), 0600) == 0);
  CHECK_THROWS_AS(mop::check_output_path(s / "dir"), InputError);
  CHECK_THROWS_AS(mop::check_output_path(s / "missing/out.json"), InputError);
  CHECK_NOTHROW(mop::check_output_path(s / "new.json"));
  CHECK_NOTHROW(mop::check_output_path(s / "fifo")); // a reader may come later
  CHECK(s.names() == std::vector<std::string>{"dir", "fifo"});
}

} // namespace common_file_io_test
