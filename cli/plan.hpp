#pragma once
// The planner's search as the plan, sweep and fit commands run it (progress bar, Ctrl-C).
#include "cli/context.hpp"
#include "common/json_io.hpp"
#include "planner/search.hpp"

#include <functional>
#include <string>

namespace mop::cli {

planner::SearchResult run_search(const PlanInputs& in, const std::string& family, int top,
                                 int threads, bool show_progress,
                                 std::function<bool(const strategy::Plan&)> filter = {});
Json ranked_json(const planner::RankedPlan& r);

} // namespace mop::cli
