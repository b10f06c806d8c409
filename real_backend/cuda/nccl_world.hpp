#pragma once
// The CUDA executor's world of processes over NCCL (comm.hpp's ProcessWorld): the world
// communicator made from an id that rank 0 hands to every rank over the ranks' TCP world, one
// communicator per group split from it at prepare() (every rank splits once per Schedule group,
// in the Schedule's order, since ncclCommSplit is collective over the world; color = the first
// member of the rank's list, key = its place in it), and the collectives through the backend's
// table (api.hpp), each waiting for its result. Pipeline sends and receives stay on the TCP world
// (buffered: two stages that both send first cannot deadlock); per-direction NCCL communicators
// for them are docs/ROADMAP.md's. Plain C++: no CUDA header.
#include "real_backend/cpu/comm.hpp"

#include <memory>

namespace mop::real::cuda {

// Takes over `tcp`, the ranks' world already met. Throws CommError naming the NCCL call that
// failed.
std::unique_ptr<ProcessWorld> nccl_world(std::unique_ptr<ProcessWorld> tcp);

} // namespace mop::real::cuda
