#pragma once
// The `mop memory` report, shared with `mop simulate` (whose JSON has every key of memory's).
#include "cli/context.hpp"
#include "common/json_io.hpp"
#include "strategies/presets.hpp"

namespace mop::cli {

Json breakdown_json(const strategy::MemoryBreakdown& b);
Json memory_json(const strategy::ResolvedPlan& r);
void print_memory_text(const strategy::ResolvedPlan& r, const PlanInputs& in);
// Uneven routing (--routing): the model, the load the plan reserves its routed buffers for and
// the rank holding the most routed rows, with its hottest layer and expert. Null without it.
Json routing_json(const PlanInputs& in, const strategy::Plan& p);
// The same as lines of text (empty without uneven routing).
std::string routing_text(const PlanInputs& in, const strategy::Plan& p);

} // namespace mop::cli
