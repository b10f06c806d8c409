#pragma once
// Shared by the libFuzzer targets: what counts as a finding, and a scratch file for readers
// that take a path.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <string_view>
#include <unistd.h>

namespace mop::fuzz {

// A broken invariant is a finding like a crash: print what broke and abort, so libFuzzer saves
// the input.
[[noreturn]] inline void invariant_failed(const char* what, const char* file, int line) {
  std::fprintf(stderr, "mop fuzz: invariant broken at %s:%d: %s\n", file, line, what);
  std::abort();
}

#define MOP_FUZZ_CHECK(cond)                                                                       \
  do {                                                                                             \
    if (!(cond))                                                                                   \
      ::mop::fuzz::invariant_failed(#cond, __FILE__, __LINE__);                                    \
  } while (false)

// A count, a time or a byte figure: finite and not negative.
inline bool sane(double x) {
  return std::isfinite(x) && x >= 0;
}

inline std::string_view as_text(const std::uint8_t* data, std::size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

// One file per process (libFuzzer runs inputs one at a time), rewritten for each input and
// removed at exit. `suffix` keeps readers that look at the extension on their usual path.
class ScratchFile {
public:
  explicit ScratchFile(const std::string& suffix) {
    const char* dir = std::getenv("TMPDIR");
    path_ = std::string(dir && *dir ? dir : "/tmp") + "/mop-fuzz-" +
            std::to_string(static_cast<long>(::getpid())) + suffix;
  }
  ~ScratchFile() { std::remove(path_.c_str()); }
  ScratchFile(const ScratchFile&) = delete;
  ScratchFile& operator=(const ScratchFile&) = delete;

  const std::string& write(const std::uint8_t* data, std::size_t size) {
    std::ofstream out(path_, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
    return path_;
  }
  const std::string& path() const { return path_; }

private:
  std::string path_;
};

} // namespace mop::fuzz
