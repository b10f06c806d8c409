#pragma once
// The discrete-event engine: plays a Schedule on the hardware model (docs/ENGINE.md).
//
// Every rank class runs in one event loop. An op starts when its dependencies, its remote
// dependencies and the previous op on its stream have ended; it then progresses as a fluid at a
// rate in (0, 1] that the ops running beside it on the same GPU set (SMs, NVLink, NIC, PCIe, host
// CPU are shared resources). Deterministic: ties break by (class, op index).
#include "sim/result.hpp"
#include "sim/schedule.hpp"

namespace mop::hw {
struct ClusterSpec;
struct Calibration;
} // namespace mop::hw

namespace mop::sim {

struct EngineOptions {
  // Fraction of a compute kernel's speed lost while a communication kernel runs on the same GPU:
  // an NCCL channel is one thread block pinned to one SM for the whole collective, and Hopper
  // collectives use 16–32 channels (DeepEP V1 dispatch/combine likewise takes 20–24 SMs,
  // reference/hardware.md §3.4). 24 of H100/H200's 132 SMs = 0.18; Galvatron's fixed overlap
  // coefficient of 1.1–1.3 (reference/simulator-anchors.md §2.13) means 9–23 % lost. Calibratable.
  double compute_slowdown_with_comm = 24.0 / 132.0;
  bool record_memory_timeline = true;
  // Keep each class's memory peak per piece of its program as well (ClassMemory::by_layer).
  bool memory_by_layer = false;
  // Run check_schedule first. simulate() indexes the Schedule without bounds checks, so turn this
  // off only for a Schedule already checked or one written by a lowering whose tests check its
  // Schedules (the planner's search, planner::Check::skip).
  bool check_schedule_first = true;
};

// Whether the host launches anything for the op (Schedule::host_issue_s): not for a barrier, the
// host's own AdamW or a recv without a communicator.
bool launches_kernels(const Op& op);

// Standalone duration of one op (no contention), from the hw cost functions. A recv takes 0: it
// completes when its matching send does. Throws std::invalid_argument for a collective whose
// group index is out of range; the hw functions throw mop::InputError for a bad shape.
double op_duration_s(const Op& op, const Schedule& s, const hw::ClusterSpec& c,
                     const hw::Calibration& cal);

// What the class's GPU spent [from_s, to_s) on (the step's breakdown is that of the critical
// class over [0, step]), from its ops' times in a SimResult.
Breakdown breakdown_between(const RankClass& rc, const std::vector<OpTiming>& times, double from_s,
                            double to_s);

// Plays the Schedule. Throws std::invalid_argument when check_schedule fails or when some op can
// never start (a dependency cycle the check was told to skip).
SimResult simulate(const Schedule& s, const hw::ClusterSpec& c, const hw::Calibration& cal,
                   const EngineOptions& o = {});

} // namespace mop::sim
