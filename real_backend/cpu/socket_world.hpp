#pragma once
// A world of processes over TCP for the CPU executor (`mop run --executor cpu` under torchrun,
// Slurm, MPI or --nproc-per-node): the ProcessWorld of real_backend/cpu/comm.hpp, so the program
// interpreter runs one rank per process with the in-process World's collectives, sums in the
// same group-rank order (a run's bits do not depend on how its ranks are hosted).
//
// Meeting: rank 0 listens at the rendezvous host:port (the launch environment's, as NCCL's
// bootstrap does for the CUDA executor); every other rank connects to it with its own listening
// port, rank 0 answers with everyone's address, and each rank connects to the ranks below it:
// one connection per pair. One reader thread per peer files every incoming message by its
// channel (a group, or the pipeline's point-to-point), so a send never waits for its receiver
// and two ranks that both send first cannot deadlock. A collective sends each member what it
// needs and combines what it receives in group-rank order: simple and exact for the tiny models
// the CPU executor trains, not a bandwidth-optimal algorithm.
//
// Failure: a rank that aborts tells its peers, whose waiting calls then fail with its reason; a
// peer whose connection drops without saying goodbye fails the world ("rank 3 closed its
// connection"); a call that waits longer than `call_timeout_s` fails with what it waited for
// (a process world cannot see that every peer is waiting: a deadlock ends at the timeout).
#include "real_backend/cpu/comm.hpp"

#include <memory>
#include <string>

namespace mop::real {

struct SocketWorldOptions {
  double connect_timeout_s = 300; // for every rank to meet (processes start at different times)
  double call_timeout_s = 900;    // one call's wait for a peer's message
};

// This process's rank `rank` of `world_size` meeting at `rendezvous` ("host:port"; rank 0
// listens on the port on every interface). Throws InputError with one sentence for a malformed
// rendezvous, CommError when the world cannot meet (a peer that never comes, a port in use, a
// peer from another world).
std::unique_ptr<ProcessWorld> socket_world(const std::string& rendezvous, int world_size,
                                           int rank, const SocketWorldOptions& options = {});

} // namespace mop::real
