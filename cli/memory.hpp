#pragma once
// The `mop memory` report, shared with `mop simulate` (whose JSON has every key of memory's).
#include "cli/context.hpp"
#include "common/json_io.hpp"
#include "strategies/presets.hpp"

namespace mop::cli {

Json breakdown_json(const strategy::MemoryBreakdown& b);
Json memory_json(const strategy::ResolvedPlan& r);
void print_memory_text(const strategy::ResolvedPlan& r, const PlanInputs& in);

} // namespace mop::cli
