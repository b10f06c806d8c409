// Plan JSON text -> Plan, resolved and validated as `mop simulate --plan FILE` does for the
// tiny MoE model on h200 nodes (the node count follows the plan's world so that the degrees can
// multiply to it), then its memory and a simulated step. An InputError is the accepted answer
// to a bad plan; anything else is a finding.
#include "common/error.hpp"
#include "common/json_io.hpp"
#include "fuzz/fuzz_support.hpp"
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "planner/evaluate.hpp"
#include "strategies/hardware.hpp"
#include "strategies/plan.hpp"
#include "strategies/presets.hpp"
#include "workload/catalog.hpp"

#include <utility>

namespace {

// Integer fields of a plan JSON as to_json writes them back: {section or nullptr, key}.
constexpr std::pair<const char*, const char*> kDegrees[] = {
    {nullptr, "world"},  {nullptr, "pp"},     {nullptr, "micro_batch"},
    {"attention", "tp"}, {"attention", "cp"}, {"moe", "ep"},
    {"moe", "etp"},      {"dense", "tp"},     {"embedding", "tp"}};

void check_breakdown(const mop::strategy::MemoryBreakdown& b) {
  using mop::fuzz::sane;
  MOP_FUZZ_CHECK(sane(b.weights) && sane(b.grads) && sane(b.optimizer) && sane(b.activations) &&
                 sane(b.comm_buffers) && sane(b.other));
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace mop;
  static const workload::ModelSpec model = workload::load_model("tiny-moe");
  static const hw::ClusterSpec h200 = hw::load_cluster("h200");
  static fuzz::ScratchFile file(".json");
  try {
    // The plan's world decides the cluster: a multiple of 8 fills whole 8-GPU nodes, a smaller
    // world is one node of that many GPUs; anything else is left for validation to refuse.
    const Json input = parse_json(fuzz::as_text(data, size), "plan.json");
    const strategy::Plan peek = strategy::plan_from_json(input, "plan.json");
    strategy::PlanContext ctx;
    ctx.model = &model;
    ctx.seq = 256;
    ctx.hw = strategy::memory_hardware(h200);
    if (peek.world > 0 && peek.world < 8)
      ctx.cluster = {peek.world, 1};
    else if (peek.world > 0 && peek.world % 8 == 0 && peek.world <= 8 * 1024)
      ctx.cluster = {8, peek.world / 8};

    const strategy::ResolvedPlan r = strategy::resolve_plan(file.write(data, size), ctx);
    const strategy::MemoryReport& m = r.memory;
    MOP_FUZZ_CHECK(!m.classes.empty());
    MOP_FUZZ_CHECK(fuzz::sane(m.peak_hbm_bytes) && m.peak_hbm_bytes > 0);
    MOP_FUZZ_CHECK(fuzz::sane(m.peak_host_bytes));
    for (const strategy::RankClassMemory& c : m.classes) {
      check_breakdown(c.hbm);
      check_breakdown(c.host);
      MOP_FUZZ_CHECK(c.ranks > 0 && c.layers >= 0);
      MOP_FUZZ_CHECK(fuzz::sane(c.micro_batches_in_flight));
    }
    // Every degree the file gives as an integer is the one used, never truncated to another.
    const Json used = strategy::to_json(r.plan);
    for (const auto& [section, key] : kDegrees) {
      const Json* given =
          section
              ? (input.contains(section) && input[section].is_object() ? &input[section] : nullptr)
              : &input;
      if (given && given->contains(key) && (*given)[key].is_number_integer()) {
        const Json& out = section ? used.at(section) : used;
        MOP_FUZZ_CHECK(out.at(key).get<std::int64_t>() == (*given)[key].get<std::int64_t>());
      }
    }
    (void)used.dump();
    (void)strategy::summary(r.plan);

    const planner::StepEvaluation e = planner::evaluate_step(
        r.plan, strategy::LoweringContext{&model, ctx.seq, ctx.cluster.gpus_per_node, ctx.hw, {}},
        h200, hw::Calibration{});
    MOP_FUZZ_CHECK(fuzz::sane(e.step_time_s) && e.step_time_s > 0);
    const sim::Breakdown& b = e.result.breakdown;
    MOP_FUZZ_CHECK(fuzz::sane(b.compute) && fuzz::sane(b.exposed_comm) && fuzz::sane(b.bubble) &&
                   fuzz::sane(b.offload_stall) && fuzz::sane(b.optimizer));
    MOP_FUZZ_CHECK(fuzz::sane(e.tokens_per_step) && fuzz::sane(e.model_flops_per_step));
  } catch (const InputError&) {
  }
  return 0;
}
