#pragma once
// Evaluating a plan: lower it and play it on the event engine, fast enough for a search.
//
// A step's micro-batches repeat: after the pipeline fills, each one adds the same time. So when
// a plan has many micro-batches, the step is simulated with two smaller counts m1 < m2 (both
// past the warm-up, both multiples of pp) and extrapolated linearly to the plan's count:
// T(M) = T(m2) + (M - m2)·(T(m2) - T(m1))/(m2 - m1), each part of the breakdown likewise.
// GPipe, whose memory grows with every micro-batch, is always simulated in full.
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "sim/result.hpp"
#include "sim/schedule.hpp"
#include "strategies/lower.hpp"

namespace mop::planner {

// Which lowering writes the Schedule the engine plays: the cost-only lowering
// (strategies/lower.cpp), or the program lowering (lowering/program.hpp) the executors run, for
// every plan it builds (the cost-only one for the others: check_programmable names why).
enum class Lowering { cost_only, program };

struct StepEvaluation {
  sim::Schedule schedule; // the schedule simulated last (m2 micro-batches when extrapolated)
  sim::SimResult result;  // its result, with step_time_s and breakdown extrapolated to the plan
  int micro_batches = 0;  // the plan's, per replica
  int micro_batches_simulated = 0; // in `schedule`
  double step_time_s = 0;
  double tokens_per_step = 0;      // the plan's whole batch
  double model_flops_per_step = 0; // the plan's whole batch
  bool program = false;            // the program lowering wrote `schedule`
  int folded_layers = 0; // layers of the model `schedule` leaves out (planner/fold.hpp)
};

// Whether the Schedule is checked (sim::check_schedule) before it is played: `mop simulate`
// and the tests check every Schedule; the search, which plays thousands of Schedules of the
// same lowerings, does not (a lowering's Schedules are held structurally sound by its tests).
enum class Check { schedule, skip };

// `max_simulated`: simulate at most this many micro-batches (at least 2·pp, so both runs reach
// the pipeline's steady state); 0 simulates every micro-batch. `memory_by_layer`: the reported
// run keeps each class's memory peak per layer (sim::ClassMemory::by_layer).
StepEvaluation evaluate_step(const strategy::Plan& plan, const strategy::LoweringContext& ctx,
                             const hw::ClusterSpec& cluster, const hw::Calibration& calibration,
                             int max_simulated = 16, Lowering lowering = Lowering::cost_only,
                             Check check = Check::schedule, bool memory_by_layer = false);

} // namespace mop::planner
