#include "real_backend/cpu/socket_world.hpp"

#include "common/error.hpp"

#include <algorithm>
#include <arpa/inet.h>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <map>
#include <mutex>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <thread>
#include <unistd.h>
#include <utility>
#include <vector>

namespace mop::real {

namespace socket_detail {
namespace {

using Clock = std::chrono::steady_clock;

constexpr std::uint64_t kMagic = 0x6d6f702d776f726cULL; // "mop-worl"
constexpr std::uint32_t kVersion = 1;
constexpr std::uint64_t kP2p = 0; // the pipeline's channel; a group's is never 0
constexpr std::uint64_t kMaxPayload = std::uint64_t{1} << 36;

// What a message is: a collective's kind (checked against the receiver's), a pipeline message,
// or the connection's own control.
enum class Kind : std::uint32_t {
  all_reduce = 1,
  all_reduce_max,
  all_gather,
  reduce_scatter,
  all_to_all_v,
  ring,
  barrier,
  p2p = 100,
  bye = 200,  // the peer is done: its connection closes next
  abort = 201 // the peer failed: the payload says why
};

const char* kind_name(Kind k) {
  switch (k) {
  case Kind::all_reduce:
    return "all_reduce";
  case Kind::all_reduce_max:
    return "all_reduce_max";
  case Kind::all_gather:
    return "all_gather";
  case Kind::reduce_scatter:
    return "reduce_scatter";
  case Kind::all_to_all_v:
    return "all_to_all_v";
  case Kind::ring:
    return "send_recv_ring";
  case Kind::barrier:
    return "barrier";
  case Kind::p2p:
    return "send";
  case Kind::bye:
    return "goodbye";
  case Kind::abort:
    return "abort";
  }
  return "?";
}

struct Header {
  std::uint64_t channel = 0;
  std::uint32_t kind = 0;
  std::uint32_t elem = 0;
  std::uint64_t count = 0; // elements
  std::uint64_t bytes = 0; // payload
};

struct Frame {
  Header h;
  std::vector<std::byte> payload;
};

struct Hello {
  std::uint64_t magic = kMagic;
  std::uint32_t version = kVersion;
  std::int32_t rank = 0;
  std::int32_t world = 0;
  std::uint16_t port = 0; // the sender's listening port
  std::uint16_t pad = 0;
};

struct Address {
  std::uint32_t ip = 0; // network order
  std::uint16_t port = 0;
  std::uint16_t pad = 0;
};

std::string errno_text() {
  return std::strerror(errno);
}

// Whole-buffer IO on a blocking socket; false when the peer is gone.
bool write_all(int fd, const void* data, std::size_t n) {
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR)
      continue;
    if (w <= 0)
      return false;
    p += w;
    n -= static_cast<std::size_t>(w);
  }
  return true;
}

bool read_all(int fd, void* data, std::size_t n) {
  auto* p = static_cast<char*>(data);
  while (n > 0) {
    const ssize_t r = ::recv(fd, p, n, 0);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      return false;
    p += r;
    n -= static_cast<std::size_t>(r);
  }
  return true;
}

// Waits until `fd` is readable; false at the deadline.
bool readable_by(int fd, Clock::time_point deadline) {
  for (;;) {
    const double left = std::chrono::duration<double>(deadline - Clock::now()).count();
    if (left <= 0)
      return false;
    pollfd p{fd, POLLIN, 0};
    const int r = ::poll(&p, 1, static_cast<int>(std::min(left * 1000, 1000.0)) + 1);
    if (r > 0)
      return true;
    if (r < 0 && errno != EINTR)
      throw CommError(fmt::format("cannot wait on a socket: {}", errno_text()));
  }
}

void close_fd(int& fd) {
  if (fd >= 0)
    ::close(fd);
  fd = -1;
}

void no_delay(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

// A listening socket on every interface at `port` (0: the kernel's choice); its port.
int listen_on(std::uint16_t port, std::uint16_t& bound, int backlog) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    throw CommError(fmt::format("cannot open a socket: {}", errno_text()));
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_ANY);
  a.sin_port = htons(port);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(fd, backlog) != 0) {
    const std::string why = errno_text();
    ::close(fd);
    throw CommError(port != 0 ? fmt::format("rank 0 cannot listen on the meeting port {}: {}",
                                            port, why)
                              : fmt::format("cannot listen for the other ranks: {}", why));
  }
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  bound = ntohs(a.sin_port);
  return fd;
}

// Accepts one connection before the deadline; -1 at the deadline. `from` gets the peer's IPv4.
int accept_by(int listener, Clock::time_point deadline, std::uint32_t& from) {
  if (!readable_by(listener, deadline))
    return -1;
  sockaddr_in a{};
  socklen_t len = sizeof a;
  const int fd = ::accept4(listener, reinterpret_cast<sockaddr*>(&a), &len, SOCK_CLOEXEC);
  if (fd < 0)
    throw CommError(fmt::format("cannot accept a rank's connection: {}", errno_text()));
  from = a.sin_addr.s_addr;
  no_delay(fd);
  return fd;
}

// Connects to ip:port, retrying until the deadline (the listener may not be up yet).
int connect_by(std::uint32_t ip, std::uint16_t port, Clock::time_point deadline,
               const std::string& what) {
  std::string last = "timed out";
  while (Clock::now() < deadline) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
      throw CommError(fmt::format("cannot open a socket: {}", errno_text()));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = ip;
    a.sin_port = htons(port);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0) {
      no_delay(fd);
      return fd;
    }
    last = errno_text();
    ::close(fd);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  throw CommError(fmt::format("cannot reach {}: {}", what, last));
}

std::pair<std::string, std::uint16_t> split_rendezvous(const std::string& rv) {
  const std::size_t colon = rv.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == rv.size())
    throw InputError(fmt::format("the meeting point '{}' is not host:port", rv));
  const std::string port_text = rv.substr(colon + 1);
  if (port_text.size() > 5 ||
      !std::all_of(port_text.begin(), port_text.end(), [](char c) { return c >= '0' && c <= '9'; }))
    throw InputError(fmt::format("the meeting point '{}' has no port number", rv));
  const int port = std::stoi(port_text);
  if (port < 1 || port > 65535)
    throw InputError(fmt::format("the meeting point '{}' has a port outside 1..65535", rv));
  std::string host = rv.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  return {host, static_cast<std::uint16_t>(port)};
}

std::uint32_t resolve_ipv4(const std::string& host) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const int rc = ::getaddrinfo(host.c_str(), nullptr, &hints, &res);
  if (rc != 0 || res == nullptr)
    throw CommError(
        fmt::format("cannot resolve the meeting host '{}': {}", host, ::gai_strerror(rc)));
  const std::uint32_t ip = reinterpret_cast<const sockaddr_in*>(res->ai_addr)->sin_addr.s_addr;
  ::freeaddrinfo(res);
  return ip;
}

// The channel of a group: a hash of its member list, never kP2p.
std::uint64_t channel_of(const std::vector<int>& members) {
  std::uint64_t h = 1469598103934665603ULL;
  for (int m : members) {
    h ^= static_cast<std::uint64_t>(static_cast<std::uint32_t>(m));
    h *= 1099511628211ULL;
  }
  return h == kP2p ? 1 : h;
}

class SocketWorld;

class SocketLink : public Link {
public:
  SocketLink(SocketWorld& w, std::vector<int> members, int me)
      : w_(w), members_(std::move(members)), me_(me), channel_(channel_of(members_)),
        name_(fmt::format("[{}]", fmt::join(members_, ", "))) {}

  void all_reduce(void* data, std::size_t n, Elem e, bool max) override;
  void all_gather(const void* send, std::size_t n, Elem e, void* recv) override;
  void reduce_scatter(const void* send, std::size_t n, Elem e, void* recv) override;
  void all_to_all_v(const void* send, const std::vector<std::size_t>& send_counts, void* recv,
                    const std::vector<std::size_t>& recv_counts, Elem e) override;
  void send_recv_ring(const void* send, void* recv, std::size_t n, int shift, Elem e) override;
  void barrier() override;

private:
  int size() const { return static_cast<int>(members_.size()); }
  void post(int member, Kind k, Elem e, const void* data, std::size_t n);
  std::vector<std::byte> take(int member, Kind k, Elem e, std::size_t n);

  SocketWorld& w_;
  std::vector<int> members_;
  int me_;
  std::uint64_t channel_;
  std::string name_;
};

class SocketWorld : public ProcessWorld {
public:
  SocketWorld(const std::string& rendezvous, int world_size, int rank,
              const SocketWorldOptions& o)
      : size_(world_size), rank_(rank), o_(o), fds_(static_cast<std::size_t>(world_size), -1),
        write_m_(static_cast<std::size_t>(world_size)),
        ended_(static_cast<std::size_t>(world_size), false) {
    if (world_size < 1 || rank < 0 || rank >= world_size)
      throw InputError(fmt::format("rank {} is not a rank of a world of {}", rank, world_size));
    if (world_size == 1)
      return;
    const auto [host, port] = split_rendezvous(rendezvous);
    try {
      meet(host, port);
    } catch (...) {
      for (int& fd : fds_)
        close_fd(fd);
      throw;
    }
    for (int p = 0; p < size_; ++p)
      if (p != rank_)
        readers_.emplace_back([this, p] { read_loop(p); });
  }

  ~SocketWorld() override {
    if (size_ == 1)
      return;
    const Header bye{kP2p, static_cast<std::uint32_t>(Kind::bye), 0, 0, 0};
    for (int p = 0; p < size_; ++p)
      if (p != rank_)
        write_frame(p, bye, nullptr, false);
    {
      // Wait (briefly) for every peer's goodbye, so that no peer reads our close as a crash.
      std::unique_lock lock(m_);
      cv_.wait_for(lock, std::chrono::seconds(10), [&] { return gone_ == size_ - 1; });
    }
    closing_ = true;
    for (int fd : fds_)
      if (fd >= 0)
        ::shutdown(fd, SHUT_RDWR);
    for (std::thread& t : readers_)
      t.join();
    for (int& fd : fds_)
      close_fd(fd);
  }

  int size() const override { return size_; }
  int rank() const override { return rank_; }

  std::shared_ptr<Link> group(const std::vector<int>& members) override {
    const auto it = std::find(members.begin(), members.end(), rank_);
    return std::make_shared<SocketLink>(*this, members, static_cast<int>(it - members.begin()));
  }

  void send(int to, const void* data, std::size_t n, Elem e) override {
    post(to, kP2p, Kind::p2p, e, data, n);
  }

  void recv(int from, void* data, std::size_t n, Elem e) override {
    const Frame f = take(from, kP2p, "recv");
    check_frame(f, Kind::p2p, e, n, from, "the pipeline");
    if (!f.payload.empty())
      std::memcpy(data, f.payload.data(), f.payload.size());
  }

  void abort(const std::string& why) override {
    if (!set_abort(why))
      return;
    const Header h{kP2p, static_cast<std::uint32_t>(Kind::abort), 0, 0, why.size()};
    for (int p = 0; p < size_; ++p)
      if (p != rank_)
        write_frame(p, h, why.data(), false);
  }

  // A message to world rank `to` (this rank: filed locally).
  void post(int to, std::uint64_t channel, Kind k, Elem e, const void* data, std::size_t n) {
    throw_if_aborted();
    const std::size_t bytes = n * elem_size(e);
    const Header h{channel, static_cast<std::uint32_t>(k), static_cast<std::uint32_t>(e), n, bytes};
    if (to == rank_) {
      Frame f{h, std::vector<std::byte>(bytes)};
      if (bytes > 0)
        std::memcpy(f.payload.data(), data, bytes);
      file(to, std::move(f));
      return;
    }
    if (!write_frame(to, h, data, true))
      fail(fmt::format("rank {} cannot send to rank {}: its connection is closed", rank_, to));
  }

  // The next message from world rank `from` on `channel`, waiting at most the call timeout.
  Frame take(int from, std::uint64_t channel, const std::string& call) {
    std::unique_lock lock(m_);
    auto& q = inbox_[{from, channel}];
    const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                             std::chrono::duration<double>(o_.call_timeout_s));
    while (q.empty()) {
      if (!why_.empty())
        throw CommError(why_);
      if (ended_[static_cast<std::size_t>(from)]) {
        lock.unlock();
        fail(fmt::format("rank {} waits in {} for rank {}, which has finished: were the ranks "
                         "started with different arguments?",
                         rank_, call, from));
      }
      if (cv_.wait_until(lock, deadline) == std::cv_status::timeout && q.empty() && why_.empty()) {
        lock.unlock();
        fail(fmt::format("rank {} waited {:g} s in {} for rank {}, which sent nothing: a deadlock "
                         "or a stalled rank",
                         rank_, o_.call_timeout_s, call, from));
      }
    }
    Frame f = std::move(q.front());
    q.pop_front();
    return f;
  }

  void check_frame(const Frame& f, Kind k, Elem e, std::size_t n, int from,
                   const std::string& where) {
    const auto got = static_cast<Kind>(f.h.kind);
    const auto got_e = static_cast<Elem>(f.h.elem);
    const auto call = [](Kind kind, std::uint64_t count, Elem elem) {
      return kind == Kind::barrier ? std::string("barrier")
                                   : fmt::format("{} of {} {}", kind_name(kind), count,
                                                 elem_name(elem));
    };
    if (got != k || got_e != e || f.h.count != n)
      fail(fmt::format("mismatched calls on {}: rank {} called {} but rank {} called {} (were the "
                       "ranks started with different arguments?)",
                       where, rank_, call(k, n, e), from, call(got, f.h.count, got_e)));
  }

  [[noreturn]] void fail(const std::string& why) {
    abort(why);
    throw CommError(why);
  }

private:
  void throw_if_aborted() {
    std::lock_guard lock(m_);
    if (!why_.empty())
      throw CommError(why_);
  }

  // Records the first failure and wakes every waiter; false when one was recorded already.
  bool set_abort(const std::string& why) {
    {
      std::lock_guard lock(m_);
      if (!why_.empty())
        return false;
      why_ = why;
    }
    cv_.notify_all();
    return true;
  }

  void file(int from, Frame f) {
    {
      std::lock_guard lock(m_);
      inbox_[{from, f.h.channel}].push_back(std::move(f));
    }
    cv_.notify_all();
  }

  bool write_frame(int to, const Header& h, const void* payload, bool must) {
    const int fd = fds_[static_cast<std::size_t>(to)];
    if (fd < 0)
      return !must;
    std::lock_guard lock(write_m_[static_cast<std::size_t>(to)]);
    return write_all(fd, &h, sizeof h) && (h.bytes == 0 || write_all(fd, payload, h.bytes));
  }

  void read_loop(int peer) {
    read_frames(peer);
    {
      std::lock_guard lock(m_);
      ++gone_;
      ended_[static_cast<std::size_t>(peer)] = true;
    }
    cv_.notify_all();
  }

  void read_frames(int peer) {
    const int fd = fds_[static_cast<std::size_t>(peer)];
    for (;;) {
      Frame f;
      if (!read_all(fd, &f.h, sizeof f.h) || f.h.bytes > kMaxPayload) {
        if (!closing_)
          set_abort(fmt::format("rank {} closed its connection to rank {} (it exited or "
                                "crashed)",
                                peer, rank_));
        return;
      }
      f.payload.resize(f.h.bytes);
      if (f.h.bytes > 0 && !read_all(fd, f.payload.data(), f.h.bytes)) {
        if (!closing_)
          set_abort(fmt::format("rank {} closed its connection to rank {} in the middle of a "
                                "message",
                                peer, rank_));
        return;
      }
      const auto k = static_cast<Kind>(f.h.kind);
      if (k == Kind::bye)
        return;
      if (k == Kind::abort) {
        const std::string why(reinterpret_cast<const char*>(f.payload.data()), f.payload.size());
        set_abort(why.empty() ? fmt::format("rank {} failed", peer) : why);
        continue; // its goodbye follows
      }
      file(peer, std::move(f));
    }
  }

  // The meeting (see the header). Fills fds_.
  void meet(const std::string& host, std::uint16_t port) {
    const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                             std::chrono::duration<double>(o_.connect_timeout_s));
    std::uint16_t mine = 0;
    int listener = listen_on(rank_ == 0 ? port : 0, mine, std::min(size_, 4096));
    try {
      std::vector<Address> table(static_cast<std::size_t>(size_));
      if (rank_ == 0) {
        for (int joined = 1; joined < size_; ++joined) {
          std::uint32_t ip = 0;
          const int fd = accept_by(listener, deadline, ip);
          if (fd < 0)
            throw CommError(fmt::format("rank 0 waited {:g} s at port {} but only {} of {} ranks "
                                        "came",
                                        o_.connect_timeout_s, port, joined, size_));
          Hello h;
          if (!readable_by(fd, deadline) || !read_all(fd, &h, sizeof h) || h.magic != kMagic) {
            ::close(fd);
            --joined; // not one of ours (a port scanner, a stale process): ignore it
            continue;
          }
          if (h.version != kVersion || h.world != size_ || h.rank <= 0 || h.rank >= size_ ||
              fds_[static_cast<std::size_t>(h.rank)] >= 0) {
            ::close(fd);
            throw CommError(fmt::format("a process that says it is rank {} of {} met rank 0 of a "
                                        "world of {}: two runs share the meeting point",
                                        h.rank, h.world, size_));
          }
          fds_[static_cast<std::size_t>(h.rank)] = fd;
          table[static_cast<std::size_t>(h.rank)] = Address{ip, h.port, 0};
        }
        for (int p = 1; p < size_; ++p)
          if (!write_all(fds_[static_cast<std::size_t>(p)], table.data(),
                         table.size() * sizeof(Address)))
            throw CommError(fmt::format("rank {} left before it got the others' addresses", p));
      } else {
        const int fd = connect_by(resolve_ipv4(host), port, deadline,
                                  fmt::format("rank 0 at {}:{}", host, port));
        fds_[0] = fd;
        const Hello h{kMagic, kVersion, rank_, size_, mine, 0};
        if (!write_all(fd, &h, sizeof h) || !readable_by(fd, deadline) ||
            !read_all(fd, table.data(), table.size() * sizeof(Address)))
          throw CommError(fmt::format("rank 0 at {}:{} did not answer rank {}", host, port,
                                      rank_));
        // The ranks below connect to me; I connect to those above 0 and below me.
        for (int p = 1; p < rank_; ++p) {
          const Address& a = table[static_cast<std::size_t>(p)];
          const int c = connect_by(a.ip, a.port, deadline, fmt::format("rank {}", p));
          fds_[static_cast<std::size_t>(p)] = c;
          const Hello me{kMagic, kVersion, rank_, size_, mine, 0};
          if (!write_all(c, &me, sizeof me))
            throw CommError(fmt::format("rank {} closed the connection from rank {}", p, rank_));
        }
        for (int p = rank_ + 1; p < size_; ++p) {
          std::uint32_t ip = 0;
          const int c = accept_by(listener, deadline, ip);
          if (c < 0)
            throw CommError(fmt::format("rank {} waited {:g} s for the ranks above it to connect",
                                        rank_, o_.connect_timeout_s));
          Hello up;
          if (!readable_by(c, deadline) || !read_all(c, &up, sizeof up) || up.magic != kMagic ||
              up.world != size_ || up.rank <= rank_ || up.rank >= size_ ||
              fds_[static_cast<std::size_t>(up.rank)] >= 0) {
            ::close(c);
            throw CommError(fmt::format("rank {} got a connection that is not from a rank above "
                                        "it in this world",
                                        rank_));
          }
          fds_[static_cast<std::size_t>(up.rank)] = c;
        }
      }
    } catch (...) {
      ::close(listener);
      throw;
    }
    ::close(listener);
  }

  const int size_, rank_;
  const SocketWorldOptions o_;
  std::vector<int> fds_;
  std::vector<std::mutex> write_m_;
  std::vector<std::thread> readers_;
  std::mutex m_;
  std::condition_variable cv_;
  std::map<std::pair<int, std::uint64_t>, std::deque<Frame>> inbox_;
  int gone_ = 0;             // peers whose connection ended (goodbye, or closed)
  std::vector<bool> ended_; // per peer: nothing more will come from it
  std::string why_; // the world's failure; empty while it runs
  std::atomic<bool> closing_{false};
};

// ---- collectives over messages ---------------------------------------------------------

void SocketLink::post(int member, Kind k, Elem e, const void* data, std::size_t n) {
  w_.post(members_[static_cast<std::size_t>(member)], channel_, k, e, data, n);
}

std::vector<std::byte> SocketLink::take(int member, Kind k, Elem e, std::size_t n) {
  const int from = members_[static_cast<std::size_t>(member)];
  Frame f = w_.take(from, channel_, fmt::format("{} on group {}", kind_name(k), name_));
  w_.check_frame(f, k, e, n, from, fmt::format("group {}", name_));
  return std::move(f.payload);
}

void SocketLink::all_reduce(void* data, std::size_t n, Elem e, bool max) {
  const Kind k = max ? Kind::all_reduce_max : Kind::all_reduce;
  for (int r = 0; r < size(); ++r)
    if (r != me_)
      post(r, k, e, data, n);
  // Member 0's values, then each member's combined in group-rank order (the in-process order).
  const std::size_t bytes = n * elem_size(e);
  std::vector<std::byte> mine(bytes);
  if (bytes > 0)
    std::memcpy(mine.data(), data, bytes);
  for (int r = 0; r < size(); ++r) {
    const std::vector<std::byte> part = r == me_ ? mine : take(r, k, e, n);
    if (r == 0) {
      if (bytes > 0)
        std::memcpy(data, part.data(), bytes);
    } else {
      combine(e, data, part.data(), n, max);
    }
  }
}

void SocketLink::all_gather(const void* send, std::size_t n, Elem e, void* recv) {
  const std::size_t bytes = n * elem_size(e);
  for (int r = 0; r < size(); ++r)
    if (r != me_)
      post(r, Kind::all_gather, e, send, n);
  auto* out = static_cast<std::byte*>(recv);
  std::byte* my_block = out + static_cast<std::size_t>(me_) * bytes;
  if (bytes > 0 && my_block != send)
    std::memmove(my_block, send, bytes);
  for (int r = 0; r < size(); ++r)
    if (r != me_) {
      const std::vector<std::byte> part = take(r, Kind::all_gather, e, n);
      if (bytes > 0)
        std::memcpy(out + static_cast<std::size_t>(r) * bytes, part.data(), bytes);
    }
}

void SocketLink::reduce_scatter(const void* send, std::size_t n, Elem e, void* recv) {
  const std::size_t bytes = n * elem_size(e);
  const auto* in = static_cast<const std::byte*>(send);
  for (int r = 0; r < size(); ++r)
    if (r != me_)
      post(r, Kind::reduce_scatter, e, in + static_cast<std::size_t>(r) * bytes, n);
  std::vector<std::byte> mine(in + static_cast<std::size_t>(me_) * bytes,
                              in + static_cast<std::size_t>(me_ + 1) * bytes);
  std::vector<std::byte> acc;
  for (int r = 0; r < size(); ++r) {
    std::vector<std::byte> part = r == me_ ? mine : take(r, Kind::reduce_scatter, e, n);
    if (r == 0)
      acc = std::move(part);
    else
      combine(e, acc.data(), part.data(), n, false);
  }
  if (bytes > 0)
    std::memcpy(recv, acc.data(), bytes);
}

void SocketLink::all_to_all_v(const void* send, const std::vector<std::size_t>& send_counts,
                              void* recv, const std::vector<std::size_t>& recv_counts, Elem e) {
  const auto n = static_cast<std::size_t>(size());
  if (send_counts.size() != n || recv_counts.size() != n)
    w_.fail(fmt::format("all_to_all_v on group {}: rank {} passed {} send counts and {} receive "
                        "counts for a group of {}",
                        name_, members_[static_cast<std::size_t>(me_)], send_counts.size(),
                        recv_counts.size(), n));
  const std::size_t es = elem_size(e);
  const auto* in = static_cast<const std::byte*>(send);
  std::size_t at = 0;
  const std::byte* my_block = nullptr;
  for (std::size_t r = 0; r < n; ++r) {
    if (static_cast<int>(r) == me_)
      my_block = in + at * es;
    else
      post(static_cast<int>(r), Kind::all_to_all_v, e, in + at * es, send_counts[r]);
    at += send_counts[r];
  }
  auto* out = static_cast<std::byte*>(recv);
  std::size_t to = 0;
  for (std::size_t r = 0; r < n; ++r) {
    const std::size_t bytes = recv_counts[r] * es;
    if (static_cast<int>(r) == me_) {
      if (recv_counts[r] != send_counts[r])
        w_.fail(fmt::format("all_to_all_v on group {}: rank {} expects {} elements from itself "
                            "but sends itself {}",
                            name_, members_[r], recv_counts[r], send_counts[r]));
      if (bytes > 0)
        std::memcpy(out + to * es, my_block, bytes);
    } else {
      const std::vector<std::byte> part =
          take(static_cast<int>(r), Kind::all_to_all_v, e, recv_counts[r]);
      if (bytes > 0)
        std::memcpy(out + to * es, part.data(), bytes);
    }
    to += recv_counts[r];
  }
}

void SocketLink::send_recv_ring(const void* send, void* recv, std::size_t n, int shift, Elem e) {
  const int s = ((shift % size()) + size()) % size();
  const int to = (me_ + s) % size(), from = (me_ - s + size()) % size();
  if (to == me_) {
    if (n > 0)
      std::memcpy(recv, send, n * elem_size(e));
    return;
  }
  post(to, Kind::ring, e, send, n);
  const std::vector<std::byte> part = take(from, Kind::ring, e, n);
  if (n > 0)
    std::memcpy(recv, part.data(), n * elem_size(e));
}

void SocketLink::barrier() {
  for (int r = 0; r < size(); ++r)
    if (r != me_)
      post(r, Kind::barrier, Elem::none, nullptr, 0);
  for (int r = 0; r < size(); ++r)
    if (r != me_)
      take(r, Kind::barrier, Elem::none, 0);
}

} // namespace
} // namespace socket_detail

std::unique_ptr<ProcessWorld> socket_world(const std::string& rendezvous, int world_size,
                                           int rank, const SocketWorldOptions& options) {
  return std::make_unique<socket_detail::SocketWorld>(rendezvous, world_size, rank, options);
}

} // namespace mop::real
