#pragma once
// The planner's analytic tier (DESIGN.md's fidelity level 1): a lower bound on a plan's step time
// from the lowering's own per-layer ops, in microseconds and without building a Schedule.
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "strategies/lower.hpp"
#include "strategies/plan.hpp"

#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

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

// The per-pass times of plans already bounded, by their strategy::pass_key: a search's plans
// often differ only in what no pass reads (where the optimizer runs, activation offload), and
// then only their stages are rebuilt. One cache serves one model, sequence length, cluster and
// calibration; it may be shared by threads.
class PassTimesCache {
public:
  struct Times {
    double forward = 0, backward = 0, compute = 0; // one micro-batch through the pass
  };
  // The times stored for `key`, or nullptr.
  std::shared_ptr<const std::vector<Times>> find(const strategy::Plan& key) const;
  void store(strategy::Plan key, std::shared_ptr<const std::vector<Times>> times);

private:
  struct Hash {
    std::size_t operator()(const strategy::Plan& p) const {
      return strategy::plan_hash(p) ^ std::hash<std::string>{}(p.family);
    }
  };
  // A pass key's family names its attention kernel (strategy::pass_key): compared too.
  struct Same {
    bool operator()(const strategy::Plan& a, const strategy::Plan& b) const {
      return strategy::same_plan(a, b) && a.family == b.family;
    }
  };
  mutable std::mutex mutex_;
  std::unordered_map<strategy::Plan, std::shared_ptr<const std::vector<Times>>, Hash, Same> map_;
};

// The bound, every part over every stage. The event engine plays the same ops with dependencies
// and shared resources, which only delay them, so a candidate whose bound exceeds a simulated
// step time cannot beat that plan (tests/planner/search_test.cpp holds it to the engine).
StepBound step_lower_bound(const strategy::Plan& plan, const strategy::LoweringContext& ctx,
                           const hw::ClusterSpec& cluster, const hw::Calibration& calibration,
                           PassTimesCache* cache = nullptr);

inline double step_lower_bound_s(const strategy::Plan& plan, const strategy::LoweringContext& ctx,
                                 const hw::ClusterSpec& cluster, const hw::Calibration& calibration,
                                 PassTimesCache* cache = nullptr) {
  return step_lower_bound(plan, ctx, cluster, calibration, cache).seconds();
}

} // namespace mop::planner
