#pragma once
// The planner's search as the plan, sweep and fit commands run it (progress bar, Ctrl-C).
#include "cli/context.hpp"
#include "common/json_io.hpp"
#include "strategies/search.hpp"

#include <string>

namespace mop::cli {

strategy::SearchResult run_search(const PlanInputs& in, const std::string& family, int top,
                                  int threads, bool show_progress);
Json ranked_json(const strategy::RankedPlan& r);

} // namespace mop::cli
