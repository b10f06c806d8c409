#pragma once
// The planner's search: every valid plan of the chosen families, pruned by the analytic memory
// model and by a provable lower bound on step time, the survivors ranked by the event engine.
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "planner/evaluate.hpp"
#include "strategies/memory.hpp"
#include "strategies/presets.hpp"

#include <atomic>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace mop::planner {

struct SearchOptions {
  std::vector<std::string> families; // empty: all
  // Only plans this accepts are considered (e.g. a family without context parallelism).
  std::function<bool(const strategy::Plan&)> filter;
  int top = 5;
  int threads = 2;
  // Simulate at most this many candidates; when reached before the bound proves the rest
  // slower, the result says so (`exhaustive` false).
  int max_simulations = 400;
  int max_simulated_micro_batches = 8; // per evaluation (steady-state extrapolation)
  std::function<void(std::int64_t done, std::int64_t total)> progress; // called from one thread
  const std::atomic<bool>* stop = nullptr; // set (e.g. by Ctrl-C): return the best so far
};

struct RankedPlan {
  strategy::Plan plan;
  strategy::MemoryReport memory; // analytic
  StepEvaluation eval;           // simulated: its numbers (no Schedule, no per-op timings)
  double lower_bound_s = 0;
  double peak_hbm_bytes = 0;  // the engine's peak plus the fragmentation allowance
  double peak_host_bytes = 0; // per node
  bool fits = false;          // by the engine's peaks
  double tokens_per_s_per_gpu = 0;
  double tflops_per_gpu = 0;
  double mfu = 0;
};

struct SearchResult {
  std::int64_t candidates_evaluated = 0; // plans considered (every valid plan of the families)
  std::int64_t fit_memory = 0;           // of which the analytic memory model lets through
  std::int64_t simulated = 0;            // of which the event engine played
  bool exhaustive = true;                // the bound proved every unsimulated candidate slower
  bool stopped = false;                  // interrupted
  std::vector<RankedPlan> results;       // best first, at most `top`, all fitting
  // When nothing fits: the candidate closest to fitting, and what ran out first.
  std::optional<strategy::Plan> closest;
  strategy::MemoryReport closest_memory;
  // When no family has a valid plan at all: the rule the first candidate broke (with overrides,
  // e.g. "--tp 3" on a model of 32 heads).
  std::string no_plan_reason;
};

// One plan's evaluation as the search ranks it (the engine's peaks and the fragmentation
// allowance decide `fits`), e.g. a framework configuration beside the search's best.
RankedPlan rank_plan(const strategy::Plan& plan, const strategy::PlanContext& ctx,
                     const hw::ClusterSpec& cluster, const hw::Calibration& calibration,
                     int max_simulated_micro_batches = 8);

// Rank results by step time, then tokens per second, then enumeration order, so the answer
// never depends on the number of threads.
SearchResult search_plans(const strategy::PlanContext& ctx, const hw::ClusterSpec& cluster,
                          const hw::Calibration& calibration, const SearchOptions& options);

// One sentence on why the best plan beats the runner-up, from their breakdowns.
std::string why_best(const RankedPlan& best, const RankedPlan& runner_up);

} // namespace mop::planner
