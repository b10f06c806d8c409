#pragma once
// In-process collectives for ranks that are threads: the semantics of NCCL's collectives and
// point-to-point calls, with deterministic sums (always in group-rank order, whatever the
// threads' timing), so a run is bit-reproducible.
//
// Rules, as in NCCL: every member of a group calls the same collectives in the same order with
// the same sizes; a size mismatch is an error (CommError naming the group and the call). A rank
// that throws aborts the world: every other rank's call still waiting for its peers, and every
// later call, throws CommError, so a failure never hangs (a call whose members have all arrived
// completes first: its peers may be reading its buffers). A deadlock is detected, not guessed
// from a clock: when every rank that has not finished waits for a call or a message that only
// another rank could supply, the world is aborted with a sentence naming what each rank waits
// for. A rank that computes, however long, is never a deadlock. Each world rank is driven by one
// thread at a time. In place as in NCCL: all_gather with
// send == recv + rank·n, reduce_scatter with recv == send + rank·n; all_to_all_v's buffers must
// not overlap.
//
// A World is either in-process (its ranks are threads of this program: World::run) or one rank
// of a world of processes (World(std::unique_ptr<ProcessWorld>)): then each process drives only
// its own rank, and every call goes through the ProcessWorld's transport (TCP sockets for the CPU
// executor, real_backend/cpu/socket_world.hpp; NCCL for the CUDA one) with the same semantics and
// the same deterministic sums. A process world cannot see its peers wait, so it detects no
// deadlock: it aborts a call that waits longer than its timeout.
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace mop::real {

class CommError : public std::runtime_error {
public:
  explicit CommError(const std::string& sentence) : std::runtime_error(sentence) {}
};

// The element types the collectives take.
enum class Elem { none, f32, f64, i32, i64 };
const char* elem_name(Elem e);
std::size_t elem_size(Elem e);
template <class T> constexpr Elem elem_of() {
  if constexpr (std::is_same_v<T, float>)
    return Elem::f32;
  else if constexpr (std::is_same_v<T, double>)
    return Elem::f64;
  else if constexpr (std::is_same_v<T, std::int32_t>)
    return Elem::i32;
  else {
    static_assert(std::is_same_v<T, std::int64_t>, "collectives take float, double, int32, int64");
    return Elem::i64;
  }
}

// acc[i] = acc[i] + src[i], or with `max` the larger (NaN-propagating), for n elements of type
// e: the arithmetic of every reduction of a Comm, whatever carries its data.
void combine(Elem e, void* acc, const void* src, std::size_t n, bool max);

// One process's handle on a group of a world of processes: Comm's collectives, type-erased
// (counts in elements of `e`), with Comm's semantics and its sums in group-rank order.
class Link {
public:
  virtual ~Link() = default;
  virtual void all_reduce(void* data, std::size_t n, Elem e, bool max) = 0;
  virtual void all_gather(const void* send, std::size_t n, Elem e, void* recv) = 0;
  virtual void reduce_scatter(const void* send, std::size_t n, Elem e, void* recv) = 0;
  virtual void all_to_all_v(const void* send, const std::vector<std::size_t>& send_counts,
                            void* recv, const std::vector<std::size_t>& recv_counts, Elem e) = 0;
  virtual void send_recv_ring(const void* send, void* recv, std::size_t n, int shift, Elem e) = 0;
  virtual void barrier() = 0;
};

// One rank of a world whose ranks are processes: its transport. Every call comes from one thread.
class ProcessWorld {
public:
  virtual ~ProcessWorld() = default;
  virtual int size() const = 0;
  virtual int rank() const = 0;
  // Called once by every rank before its first group(), with the same number of lists in the
  // same order on every rank: this rank's member list of each group the program may use. A
  // transport whose groups must be made collectively (NCCL's splits) makes them here.
  virtual void prepare(const std::vector<std::vector<int>>& groups) { (void)groups; }
  // The group over `members` (world ranks in group order, this rank among them, checked by the
  // caller); every member asks for it with the same list.
  virtual std::shared_ptr<Link> group(const std::vector<int>& members) = 0;
  // Pipeline point-to-point: send is buffered (returns before the peer receives); recv waits for
  // the next message from `from` and checks its type and size.
  virtual void send(int to, const void* data, std::size_t n, Elem e) = 0;
  virtual void recv(int from, void* data, std::size_t n, Elem e) = 0;
  // Fails every waiting and later call here, and tells the peers so that theirs fail too.
  virtual void abort(const std::string& why) = 0;
};

struct WorldState; // shared by all ranks of a World
struct GroupState; // shared by the members of one group

// One rank's handle on a group (a default-constructed one belongs to no group and its
// collectives throw). Cheap to copy. Collectives are templates instantiated for
// float, double, std::int32_t and std::int64_t.
class Comm {
public:
  Comm() = default;
  int rank() const { return rank_; } // rank inside the group
  int size() const { return size_; }
  const std::vector<int>& members() const; // world ranks, in group order

  // Sum over the group, in place.
  template <class T> void all_reduce(T* data, std::size_t n) const;
  // Max over the group, in place.
  template <class T> void all_reduce_max(T* data, std::size_t n) const;
  // recv[size() * n]: member r's n elements at offset r * n.
  template <class T> void all_gather(const T* send, std::size_t n, T* recv) const;
  // send[size() * n]: block r goes to member r; recv[n] = sum over members of their block rank().
  template <class T> void reduce_scatter(const T* send, std::size_t n, T* recv) const;
  // send holds size() blocks in member order, send_counts[r] elements for member r; recv gets
  // member r's block for me at the offset of the sum of recv_counts before r. recv_counts must
  // equal what the members send (checked).
  template <class T>
  void all_to_all_v(const T* send, const std::vector<std::size_t>& send_counts, T* recv,
                    const std::vector<std::size_t>& recv_counts) const;
  // Ring exchange: send n elements to member (rank() + shift) mod size(), receive n from member
  // (rank() - shift) mod size(). send and recv must not overlap.
  template <class T>
  void send_recv_ring(const T* send, T* recv, std::size_t n, int shift = 1) const;
  void barrier() const;

private:
  friend class World;
  std::shared_ptr<GroupState> group_;
  std::shared_ptr<Link> link_; // a world of processes: the group's transport
  std::shared_ptr<const std::vector<int>> link_members_;
  WorldState* world_ = nullptr;
  int rank_ = 0;
  int size_ = 1;
};

class World {
public:
  explicit World(int ranks);
  // This process's rank of a world of processes.
  explicit World(std::unique_ptr<ProcessWorld> process);
  ~World();
  World(const World&) = delete;
  World& operator=(const World&) = delete;
  int size() const;
  // A world of processes: the one rank this process drives; -1 for an in-process world.
  int process_rank() const;

  // A world of processes: ProcessWorld::prepare; nothing for an in-process world.
  void prepare(const std::vector<std::vector<int>>& groups);

  // The communicator over `members` (world ranks, in group order) for world rank `me`, which
  // must be one of them. Every member calls it with the same list; the same list always names
  // the same group.
  Comm group(const std::vector<int>& members, int me);

  // Point-to-point (pipeline): send is buffered and returns at once; recv blocks until the
  // matching send (same from/to, in order) has arrived; sizes must match.
  template <class T> void send(int from, int to, const T* data, std::size_t n);
  template <class T> void recv(int to, int from, T* data, std::size_t n);

  // Wakes every waiting call; they, and every later call, throw CommError(why).
  void abort(const std::string& why);

  // Runs fn(world, rank) for every rank on its own thread and joins them. If any rank throws,
  // the world is aborted and, after all threads end, the first failure that the abort did not
  // cause is rethrown. A rank whose fn returns has finished: ranks still waiting for it are a
  // deadlock.
  static void run(int ranks, const std::function<void(World&, int)>& fn);

private:
  std::unique_ptr<WorldState> state_;
  std::unique_ptr<ProcessWorld> process_;
};

} // namespace mop::real
