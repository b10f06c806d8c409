#pragma once
// NCCL for the CUDA executor's ranks in separate processes: the world communicator from the
// launch environment's meeting point (NCCL_COMM_ID=host:port, rank 0's bootstrap listening), one
// communicator per group split from it, and the collectives the program interpreter runs with
// the in-process World's semantics (real_backend/cpu/comm.hpp): all-to-all-v as grouped send /
// recv, the ring exchange and pipeline pairs inside one group call. Buffers are device-reachable
// pointers; each call is issued on `stream` (a cudaStream_t, nullptr for the default stream) and
// returns without waiting. Plain C++ header; errors throw std::runtime_error naming the call.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace mop::real::cuda {

enum class NcclType { f32, f64, i32, i64 };

// The unique id NCCL's bootstrap derives from a meeting point host:port (every rank computes
// the same one; rank 0's communicator listens there). Needs no GPU. Throws on a malformed one.
std::vector<unsigned char> nccl_unique_id(const std::string& rendezvous);

class NcclComm {
public:
  NcclComm() = default; // belongs to no group
  ~NcclComm();
  NcclComm(NcclComm&& o) noexcept;
  NcclComm& operator=(NcclComm&& o) noexcept;
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  // The world: `world_size` processes meeting at `rendezvous` (empty for a world of one).
  static NcclComm world(const std::string& rendezvous, int world_size, int rank);
  // The world from an id that rank 0 made (nccl_unique_id("")) and handed to every rank.
  static NcclComm world_from_id(const std::vector<unsigned char>& id, int world_size, int rank);
  // Collective over this communicator: every member calls it, in the same order; members with
  // the same color >= 0 form a new communicator ranked by key; color < 0 joins none (the result
  // belongs to no group).
  NcclComm split(int color, int key) const;

  bool valid() const { return comm_ != nullptr; }
  int rank() const;
  int size() const;

  void all_reduce(void* data, std::size_t n, NcclType t, bool max, void* stream) const;
  void all_gather(const void* send, void* recv, std::size_t n, NcclType t, void* stream) const;
  void reduce_scatter(const void* send, void* recv, std::size_t n, NcclType t, void* stream) const;
  // Blocks in member order: send_counts[r] elements to member r, recv_counts[r] from it.
  void all_to_all_v(const void* send, const std::vector<std::size_t>& send_counts, void* recv,
                    const std::vector<std::size_t>& recv_counts, NcclType t, void* stream) const;
  // n elements to member (rank + shift) mod size, n from member (rank - shift) mod size.
  void send_recv_ring(const void* send, void* recv, std::size_t n, int shift, NcclType t,
                      void* stream) const;
  // A pipeline's pair: send to one peer and receive from another in one group call (either may
  // be -1 for none), so two stages that both send first cannot deadlock.
  void send_recv(const void* send, std::size_t send_n, int to, void* recv, std::size_t recv_n,
                 int from, NcclType t, void* stream) const;

private:
  void* comm_ = nullptr; // ncclComm_t
};

// The interpreter's collectives on a communicator, each waiting for its result (the interpreter
// syncs after every op): on a stream of the backend's own; host buffers (the results the ranks
// gather) are staged through device memory.
void sync_all_reduce(const NcclComm& c, void* data, std::size_t n, NcclType t, bool max);
void sync_all_gather(const NcclComm& c, const void* send, void* recv, std::size_t n, NcclType t);
void sync_reduce_scatter(const NcclComm& c, const void* send, void* recv, std::size_t n,
                         NcclType t);
void sync_all_to_all_v(const NcclComm& c, const void* send,
                       const std::vector<std::size_t>& send_counts, void* recv,
                       const std::vector<std::size_t>& recv_counts, NcclType t);
void sync_send_recv_ring(const NcclComm& c, const void* send, void* recv, std::size_t n, int shift,
                         NcclType t);

} // namespace mop::real::cuda
