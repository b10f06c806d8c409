#pragma once
// Runs the built `mop` program and captures its exit status, stdout and stderr.
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <sys/wait.h>
#include <unistd.h>

namespace mop::test {

struct MopResult {
  int status = -1;
  std::string out, err;
};

inline std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// `args` is passed to the shell as written (quote what needs quoting); `before` is shell text
// run first in the same shell (`ulimit -f 64;`).
inline MopResult run_mop(const std::string& args, const std::string& before = "") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("mop-cli-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string cmd = before + std::string(MOP_BINARY) + " " + args + " >" +
                          (dir / "out").string() + " 2>" + (dir / "err").string();
  const int raw = std::system(cmd.c_str());
  MopResult r;
  r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  r.out = slurp(dir / "out");
  r.err = slurp(dir / "err");
  fs::remove_all(dir);
  return r;
}

inline int count_lines(const std::string& s) {
  int n = 0;
  for (char c : s)
    n += c == '\n' ? 1 : 0;
  return n;
}

} // namespace mop::test
