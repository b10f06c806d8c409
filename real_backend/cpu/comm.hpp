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
#include <cstddef>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace mop::real {

class CommError : public std::runtime_error {
public:
  explicit CommError(const std::string& sentence) : std::runtime_error(sentence) {}
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
  WorldState* world_ = nullptr;
  int rank_ = 0;
  int size_ = 1;
};

class World {
public:
  explicit World(int ranks);
  ~World();
  World(const World&) = delete;
  World& operator=(const World&) = delete;
  int size() const;

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
};

} // namespace mop::real
