#pragma once
// The planner's analytic tier (DESIGN.md's fidelity level 1): a lower bound on a plan's step time
// from the lowering's own per-layer ops, in microseconds and without building a Schedule.
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "strategies/lower.hpp"
#include "strategies/plan.hpp"

namespace mop::planner {

// The parts of the bound (seconds per step), each one a time the engine can only add to:
struct StepBound {
  // The busiest stage's compute stream: its compute kernels back to back (forward, backward,
  // recompute, every micro-batch; a GPU optimizer step).
  double compute = 0;
  // A stage's data path: each stage runs every micro-batch's forward and backward as one chain
  // (compute and the collectives the data waits for: TP/SP, EP, Ulysses), after the first
  // micro-batch's forward through the stages before it (the pipeline's fill) and before the last
  // backward through them (its drain), or before a step that sits on the path.
  double path = 0;
  // The host: every host AdamW of the step back to back; streamed into the forward, followed by
  // what the path runs after the last layer's first forward.
  double host = 0;
  // The data-parallel stream: a stage's ZeRO gathers and gradient reductions back to back.
  double dp = 0;
  double seconds() const;
};

// The bound, every part over every stage. The event engine plays the same ops with dependencies
// and shared resources, which only delay them, so a candidate whose bound exceeds a simulated
// step time cannot beat that plan (tests/planner/search_test.cpp holds it to the engine).
StepBound step_lower_bound(const strategy::Plan& plan, const strategy::LoweringContext& ctx,
                           const hw::ClusterSpec& cluster, const hw::Calibration& calibration);

inline double step_lower_bound_s(const strategy::Plan& plan, const strategy::LoweringContext& ctx,
                                 const hw::ClusterSpec& cluster,
                                 const hw::Calibration& calibration) {
  return step_lower_bound(plan, ctx, cluster, calibration).seconds();
}

} // namespace mop::planner
