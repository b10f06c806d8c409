#pragma once
// The planner's pruning rule: a lower bound on a plan's step time that costs no simulation.
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "strategies/lower.hpp"
#include "strategies/plan.hpp"

namespace mop::planner {

// A lower bound on the plan's step time: the busiest stage's compute kernels (forward, backward,
// recompute) run back to back at full speed, with no communication, bubble or optimizer. The
// event engine can only add to it, so a candidate whose bound exceeds a simulated step time
// cannot beat that plan.
double compute_lower_bound_s(const strategy::Plan& plan, const strategy::LoweringContext& ctx,
                             const hw::ClusterSpec& cluster, const hw::Calibration& calibration);

} // namespace mop::planner
