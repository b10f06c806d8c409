#include "common/file_io.hpp"

#include "common/error.hpp"
#include "common/limits.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <ctime>
#include <fcntl.h>
#include <filesystem>
#include <fmt/format.h>
#include <pthread.h>
#include <sys/stat.h>
#include <system_error>
#include <unistd.h>
#include <vector>

namespace mop {

namespace {

namespace fs = std::filesystem;

// Linux's own limit on symbolic links followed while resolving one path (MAXSYMLINKS).
constexpr int max_symlink_hops = 40;

std::string shown(const std::string& path) {
  return quote_for_message(path, limits::max_quoted_chars);
}

// Thread-safe strerror.
std::string reason(int err) {
  return std::system_category().message(err);
}

const char* kind_of(mode_t mode) {
  if (S_ISDIR(mode))
    return "a folder";
  if (S_ISFIFO(mode))
    return "a FIFO (named pipe)";
  if (S_ISCHR(mode))
    return "a character device";
  if (S_ISBLK(mode))
    return "a block device";
  if (S_ISSOCK(mode))
    return "a socket";
  if (S_ISLNK(mode))
    return "a symbolic link";
  return "not a regular file";
}

class FileDescriptor {
public:
  explicit FileDescriptor(int fd) : fd_(fd) {}
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor() {
    if (fd_ >= 0)
      ::close(fd_);
  }
  int get() const { return fd_; }
  // Closes now and reports the error close() gives (a delayed write error on some filesystems).
  int close() {
    const int rc = ::close(fd_);
    fd_ = -1;
    return rc == 0 ? 0 : errno;
  }

private:
  int fd_;
};

// Writes all of `text`; returns 0 or the errno of the failed write.
int write_all(int fd, std::string_view text) {
  std::size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      return errno;
    }
    if (n == 0)
      return EIO;
    done += static_cast<std::size_t>(n);
  }
  return 0;
}

// While alive, a write to a pipe whose reader is gone fails with EPIPE instead of killing the
// process with SIGPIPE; a SIGPIPE raised meanwhile is consumed, one pending before is kept.
class SigpipeBlocked {
public:
  SigpipeBlocked() {
    sigemptyset(&pipe_);
    sigaddset(&pipe_, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_, &old_);
    sigset_t pending;
    sigpending(&pending);
    was_pending_ = sigismember(&pending, SIGPIPE) == 1;
  }
  SigpipeBlocked(const SigpipeBlocked&) = delete;
  SigpipeBlocked& operator=(const SigpipeBlocked&) = delete;
  ~SigpipeBlocked() {
    if (!was_pending_) {
      sigset_t pending;
      sigpending(&pending);
      if (sigismember(&pending, SIGPIPE) == 1) {
        const timespec now{0, 0};
        sigtimedwait(&pipe_, nullptr, &now);
      }
    }
    pthread_sigmask(SIG_SETMASK, &old_, nullptr);
  }

private:
  sigset_t pipe_{}, old_{};
  bool was_pending_ = false;
};

// What an output path leads to once symbolic links are followed.
struct OutputTarget {
  enum class Kind { absent, regular, stream } kind = Kind::absent;
  std::string path; // with symbolic links resolved: where the bytes go
  mode_t mode = 0;  // the file type and permissions of an existing target
};

std::string parent_folder(const std::string& path) {
  const std::string dir = fs::path(path).parent_path().string();
  return dir.empty() ? "." : dir;
}

// `path` in a sentence, with the file a symbolic link led to when it differs.
std::string named(const std::string& path, const std::string& resolved) {
  return resolved == path ? shown(path)
                          : fmt::format("{} (a link to {})", shown(path), shown(resolved));
}

OutputTarget classify_output(const std::string& path) {
  if (path.empty())
    throw InputError("the output file path is empty.");
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) {
    if (S_ISFIFO(st.st_mode) || S_ISCHR(st.st_mode))
      return {OutputTarget::Kind::stream, path, st.st_mode}; // open() follows the links
    if (S_ISDIR(st.st_mode))
      throw InputError(
          fmt::format("{} is a folder; give the output a file name inside it.", shown(path)));
    if (!S_ISREG(st.st_mode))
      throw InputError(fmt::format("{} is {}; mop writes outputs to regular files, FIFOs and "
                                   "character devices only.",
                                   shown(path), kind_of(st.st_mode)));
  } else if (errno == ELOOP) {
    throw InputError(fmt::format("{}: too many levels of symbolic links.", shown(path)));
  } else if (errno != ENOENT) {
    throw InputError(fmt::format("{} cannot be written ({}).", shown(path), reason(errno)));
  }
  // A regular file, nothing, or symbolic links to either: follow the links to the file that is
  // replaced or created, so that the temporary file goes beside it and the links stay.
  std::string p = path;
  for (int hops = 0;; ++hops) {
    if (::lstat(p.c_str(), &st) != 0) {
      const int err = errno;
      if (err != ENOENT)
        throw InputError(fmt::format("{} cannot be written ({}).", named(path, p), reason(err)));
      const std::string dir = parent_folder(p);
      struct stat ds {};
      if (::stat(dir.c_str(), &ds) != 0 || !S_ISDIR(ds.st_mode))
        throw InputError(
            fmt::format("{}: the folder {} does not exist.", named(path, p), shown(dir)));
      return {OutputTarget::Kind::absent, p, 0};
    }
    if (S_ISREG(st.st_mode))
      return {OutputTarget::Kind::regular, p, st.st_mode};
    if (!S_ISLNK(st.st_mode)) // replaced meanwhile
      throw InputError(
          fmt::format("{} changed while it was being checked; nothing was written.", shown(path)));
    if (hops == max_symlink_hops)
      throw InputError(fmt::format("{}: too many levels of symbolic links.", shown(path)));
    std::vector<char> buffer(static_cast<std::size_t>(st.st_size > 0 ? st.st_size : 255) + 1);
    ssize_t n = 0;
    while ((n = ::readlink(p.c_str(), buffer.data(), buffer.size())) ==
           static_cast<ssize_t>(buffer.size()))
      buffer.resize(buffer.size() * 2);
    if (n < 0)
      throw InputError(fmt::format("{} cannot be written ({}).", named(path, p), reason(errno)));
    const fs::path link(std::string(buffer.data(), static_cast<std::size_t>(n)));
    p = link.is_absolute() ? link.string() : (fs::path(parent_folder(p)) / link).string();
  }
}

void write_through(const std::string& path, const OutputTarget& t, std::string_view text) {
  const bool fifo = S_ISFIFO(t.mode);
  // O_NONBLOCK: opening a FIFO for writing fails at once (ENXIO) when no process reads it.
  const int fd = ::open(t.path.c_str(), O_WRONLY | O_CLOEXEC | O_NOCTTY | (fifo ? O_NONBLOCK : 0));
  if (fd < 0) {
    const int err = errno;
    if (fifo && err == ENXIO)
      throw InputError(fmt::format("{} is a FIFO (named pipe) that no process reads; start the "
                                   "reader first.",
                                   named(path, t.path)));
    throw InputError(fmt::format("{} cannot be written ({}).", named(path, t.path), reason(err)));
  }
  FileDescriptor file(fd);
  struct stat st {};
  if (::fstat(fd, &st) != 0 || (st.st_mode & S_IFMT) != (t.mode & S_IFMT))
    throw InputError(
        fmt::format("{} changed while it was being opened; nothing was written.", shown(path)));
  // A reader is there: from now on wait for it rather than fail on a full pipe.
  if (fifo && ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK) != 0)
    throw InputError(fmt::format("{} cannot be written ({}).", named(path, t.path), reason(errno)));
  int err = 0;
  {
    const SigpipeBlocked no_sigpipe;
    err = write_all(fd, text);
  }
  if (err == 0)
    err = file.close();
  if (err != 0)
    throw InputError(fmt::format("writing {} failed ({}).", named(path, t.path), reason(err)));
}

// A name no other file in the folder has, recognisable as mop's: ".NAME.mop-tmp-PID-N".
std::string temporary_name(const std::string& target) {
  static std::atomic<unsigned> counter{0};
  std::string name = fs::path(target).filename().string();
  if (name.size() > 200) // NAME_MAX is 255 bytes on Linux filesystems
    name.resize(200);
  return (fs::path(parent_folder(target)) /
          fmt::format(".{}.mop-tmp-{}-{}", name, static_cast<long>(::getpid()), counter++))
      .string();
}

// Opens a new named temporary file beside `target`; fills `temp` with its name.
int create_named_temporary(const std::string& target, std::string& temp) {
  for (int attempt = 0; attempt < 100; ++attempt) {
    temp = temporary_name(target);
    const int fd = ::open(temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOCTTY, 0666);
    if (fd >= 0 || errno != EEXIST)
      return fd;
  }
  errno = EEXIST;
  return -1;
}

// Gives the unnamed (O_TMPFILE) file `fd` the name `temp`; returns false when this system
// cannot (no /proc and no CAP_DAC_READ_SEARCH for AT_EMPTY_PATH).
bool link_unnamed(int fd, const std::string& target, std::string& temp) {
  const std::string self = fmt::format("/proc/self/fd/{}", fd);
  for (int attempt = 0; attempt < 100; ++attempt) {
    temp = temporary_name(target);
    if (::linkat(AT_FDCWD, self.c_str(), AT_FDCWD, temp.c_str(), AT_SYMLINK_FOLLOW) == 0)
      return true;
    const int by_proc = errno;
    if (::linkat(fd, "", AT_FDCWD, temp.c_str(), AT_EMPTY_PATH) == 0)
      return true;
    if (by_proc != EEXIST && errno != EEXIST) // a name taken is retried with the next one
      return false;
  }
  return false;
}

void write_replacing(const std::string& path, const OutputTarget& t, std::string_view text) {
  const std::string dir = parent_folder(t.path);
  std::string temp; // the temporary file's name once it has one
  struct Cleanup {
    std::string& name;
    ~Cleanup() {
      if (!name.empty())
        ::unlink(name.c_str());
    }
  } cleanup{temp};
  const char* untouched =
      t.kind == OutputTarget::Kind::regular ? "the file was left as it was" : "no file was created";
  auto cannot_create = [&](int err) {
    throw InputError(
        fmt::format("{} cannot be written ({}); {}.", named(path, t.path), reason(err), untouched));
  };
  auto write_failed = [&](int err) {
    throw InputError(
        fmt::format("writing {} failed ({}); {}.", named(path, t.path), reason(err), untouched));
  };

  bool unnamed = true;
  int fd = ::open(dir.c_str(), O_TMPFILE | O_WRONLY | O_CLOEXEC, 0666);
  if (fd < 0) {
    // EOPNOTSUPP, EISDIR, EINVAL: this filesystem has no O_TMPFILE; a named file does the same
    // job, and any other error shows again when it is created.
    unnamed = false;
    fd = create_named_temporary(t.path, temp);
    if (fd < 0) {
      const int err = errno;
      temp.clear();
      cannot_create(err);
    }
  }
  FileDescriptor file(fd);
  if (t.kind == OutputTarget::Kind::regular)
    (void)::fchmod(fd, t.mode & 07777); // keep the replaced file's permissions
  int err = write_all(fd, text);
  if (err == 0 && ::fsync(fd) != 0)
    err = errno;
  if (err != 0)
    write_failed(err);
  if (unnamed && !link_unnamed(fd, t.path, temp)) {
    // The file is complete but cannot be named here: write it again as a named file.
    temp.clear();
    file.close();
    FileDescriptor named_file(create_named_temporary(t.path, temp));
    if (named_file.get() < 0) {
      err = errno;
      temp.clear();
      cannot_create(err);
    }
    if (t.kind == OutputTarget::Kind::regular)
      (void)::fchmod(named_file.get(), t.mode & 07777);
    err = write_all(named_file.get(), text);
    if (err == 0 && ::fsync(named_file.get()) != 0)
      err = errno;
    if (err == 0)
      err = named_file.close();
    if (err != 0)
      write_failed(err);
  } else if ((err = file.close()) != 0) {
    write_failed(err);
  }
  if (::rename(temp.c_str(), t.path.c_str()) != 0)
    cannot_create(errno);
  temp.clear(); // renamed: nothing to clean up
  // Make the rename itself durable; a folder that cannot be synced loses nothing written.
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    (void)::fsync(dir_fd);
    ::close(dir_fd);
  }
}

} // namespace

std::string read_input_file(const std::string& path) {
  if (path.empty())
    throw InputError("an input file path is empty.");
  // O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOCTTY: a terminal device must not
  // become the controlling terminal. Both are harmless for the regular files accepted.
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT)
      throw InputError(fmt::format("{}: no such file.", shown(path)));
    struct stat st {};
    if (::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) // a socket fails with ENXIO
      throw InputError(fmt::format("{} is {}, not a regular file; mop reads inputs only from "
                                   "regular files.",
                                   shown(path), kind_of(st.st_mode)));
    throw InputError(fmt::format("{} cannot be read ({}).", shown(path), reason(err)));
  }
  FileDescriptor file(fd);
  struct stat st {};
  if (::fstat(fd, &st) != 0)
    throw InputError(fmt::format("{} cannot be read ({}).", shown(path), reason(errno)));
  if (!S_ISREG(st.st_mode))
    throw InputError(fmt::format("{} is {}, not a regular file; mop reads inputs only from "
                                 "regular files.",
                                 shown(path), kind_of(st.st_mode)));
  const auto too_large = [&] {
    return InputError(fmt::format("{} is larger than {} MiB, the most mop reads from an input "
                                  "file.",
                                  shown(path), limits::max_input_file_bytes >> 20));
  };
  if (st.st_size > limits::max_input_file_bytes)
    throw too_large();
  // One byte more than the limit is read so that a file grown past it since fstat is noticed.
  const auto cap = static_cast<std::size_t>(limits::max_input_file_bytes) + 1;
  std::string text(std::min(cap, static_cast<std::size_t>(st.st_size) + 1), '\0');
  std::size_t size = 0;
  for (;;) {
    if (size == text.size()) {
      if (text.size() == cap)
        throw too_large();
      text.resize(std::min(cap, 2 * text.size()));
    }
    const ssize_t n = ::read(fd, text.data() + size, text.size() - size);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      throw InputError(fmt::format("reading {} failed ({}).", shown(path), reason(errno)));
    }
    if (n == 0)
      break;
    size += static_cast<std::size_t>(n);
  }
  text.resize(size);
  return text;
}

void write_output_file(const std::string& path, std::string_view text) {
  const OutputTarget t = classify_output(path);
  if (t.kind == OutputTarget::Kind::stream)
    write_through(path, t, text);
  else
    write_replacing(path, t, text);
}

void check_output_path(const std::string& path) {
  const OutputTarget t = classify_output(path);
  if (t.kind == OutputTarget::Kind::stream)
    return;
  // The temporary file is created in the target's folder and renamed there.
  const std::string dir = parent_folder(t.path);
  if (::access(dir.c_str(), W_OK | X_OK) != 0)
    throw InputError(fmt::format("{} cannot be written: the folder {} is not writable ({}).",
                                 named(path, t.path), shown(dir), reason(errno)));
}

} // namespace mop
