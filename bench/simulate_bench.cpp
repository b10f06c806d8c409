// Wall time of one evaluation as the search runs it (lower without op names, play, steady-state
// extrapolation; no structural check: `mop simulate` adds it; an interleaved pipeline replayed
// on chunks, planner/replay.hpp; a single stage's repeated layers folded, planner/fold.hpp) for the
// two reference cases; the plan is resolved once, outside the timed loop. The process allocates
// as `mop` does (common/allocator.hpp).
#include "common/allocator.hpp"
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "planner/bound.hpp"
#include "planner/evaluate.hpp"
#include "planner/replay.hpp"
#include "planner/search.hpp"
#include "strategies/hardware.hpp"
#include "strategies/presets.hpp"
#include "workload/catalog.hpp"
#include "workload/routing.hpp"

#include <benchmark/benchmark.h>

namespace {

const bool kAllocatorSet = (mop::keep_freed_memory(), true);

void run(benchmark::State& state, const char* model_id, const char* cluster_id, int nodes,
         std::int64_t seq, const char* family,
         mop::planner::Lowering lowering = mop::planner::Lowering::cost_only,
         bool engine = false) {
  const auto model = mop::workload::load_model(model_id);
  const auto cluster = mop::hw::load_cluster(cluster_id);
  mop::strategy::PlanContext ctx;
  ctx.model = &model;
  ctx.seq = seq;
  ctx.cluster = {cluster.node.gpus_per_node, nodes};
  ctx.hw = mop::strategy::memory_hardware(cluster);
  const auto plan = mop::strategy::resolve_plan(family, ctx).plan;
  // Evaluated as the search evaluates: no op names, no structural check.
  mop::strategy::LoweringContext lc{&model, seq, cluster.node.gpus_per_node, ctx.hw, {}};
  lc.names = false;
  std::int64_t ops = 0, events = 0;
  for (auto _ : state) {
    const auto e =
        lowering == mop::planner::Lowering::cost_only && !engine
            ? mop::planner::evaluate_for_search(plan, lc, cluster, mop::hw::Calibration{}, 16)
            : mop::planner::evaluate_step(plan, lc, cluster, mop::hw::Calibration{}, 16, lowering,
                                          mop::planner::Check::skip);
    for (const auto& c : e.schedule.classes)
      ops += static_cast<std::int64_t>(c.ops.size()) * 1;
    events += e.result.events;
    benchmark::DoNotOptimize(e.step_time_s);
  }
  state.SetLabel(mop::strategy::summary(plan));
  state.counters["ops_per_eval"] =
      benchmark::Counter(static_cast<double>(ops), benchmark::Counter::kAvgIterations);
  state.counters["events_per_s"] =
      benchmark::Counter(static_cast<double>(events), benchmark::Counter::kIsRate);
}

void BM_KimiK2_12xH200_1M_mop(benchmark::State& state) {
  run(state, "kimi-k2", "h200", 12, std::int64_t{1} << 20, "mop");
}
BENCHMARK(BM_KimiK2_12xH200_1M_mop)->Unit(benchmark::kMillisecond);

// The same plan with every layer played (the search folds its 60 MoE layers, planner/fold.hpp).
void BM_KimiK2_12xH200_1M_mop_every_layer(benchmark::State& state) {
  run(state, "kimi-k2", "h200", 12, std::int64_t{1} << 20, "mop", mop::planner::Lowering::cost_only,
      true);
}
BENCHMARK(BM_KimiK2_12xH200_1M_mop_every_layer)->Unit(benchmark::kMillisecond);

void BM_Llama3_405B_128xH100_8K_megatron(benchmark::State& state) {
  run(state, "llama3-405b", "h100", 128, 8192, "megatron");
}
BENCHMARK(BM_Llama3_405B_128xH100_8K_megatron)->Unit(benchmark::kMillisecond);

// The same interleaved plan (PP 32 × VP 4) on the event engine, op by op, where the search
// replays it on chunks (planner/replay.hpp).
void BM_Llama3_405B_128xH100_8K_megatron_engine(benchmark::State& state) {
  run(state, "llama3-405b", "h100", 128, 8192, "megatron", mop::planner::Lowering::cost_only, true);
}
BENCHMARK(BM_Llama3_405B_128xH100_8K_megatron_engine)->Unit(benchmark::kMillisecond);

// The same two evaluations with the program lowering (the Schedule the CPU interpreter runs).
void BM_KimiK2_12xH200_1M_mop_program(benchmark::State& state) {
  run(state, "kimi-k2", "h200", 12, std::int64_t{1} << 20, "mop", mop::planner::Lowering::program);
}
BENCHMARK(BM_KimiK2_12xH200_1M_mop_program)->Unit(benchmark::kMillisecond);

void BM_Llama3_405B_128xH100_8K_megatron_program(benchmark::State& state) {
  run(state, "llama3-405b", "h100", 128, 8192, "megatron", mop::planner::Lowering::program);
}
BENCHMARK(BM_Llama3_405B_128xH100_8K_megatron_program)->Unit(benchmark::kMillisecond);

} // namespace

namespace {

// Kimi-K2 at 1M tokens on 12 nodes of the given cluster.
mop::strategy::PlanContext kimi_1m_context(const mop::workload::ModelSpec& model,
                                           const mop::hw::ClusterSpec& cluster) {
  mop::strategy::PlanContext ctx;
  ctx.model = &model;
  ctx.seq = std::int64_t{1} << 20;
  ctx.cluster = {cluster.node.gpus_per_node, 12};
  ctx.hw = mop::strategy::memory_hardware(cluster);
  return ctx;
}

// The planner's analytic stage: enumerate every family's plans and run the memory model on each
// (candidates per second), as `mop plan` does before any simulation.
void BM_AnalyticStage_KimiK2_12xH200_1M(benchmark::State& state) {
  const auto model = mop::workload::load_model("kimi-k2");
  const auto cluster = mop::hw::load_cluster("h200");
  const mop::strategy::PlanContext ctx = kimi_1m_context(model, cluster);
  std::int64_t candidates = 0;
  for (auto _ : state) {
    for (const std::string& family : mop::strategy::family_names())
      for (const auto& plan : mop::strategy::enumerate_family(family, ctx)) {
        benchmark::DoNotOptimize(
            mop::strategy::analyze_memory(model, plan, ctx.seq, ctx.hw).peak_hbm_bytes);
        ++candidates;
      }
  }
  state.SetItemsProcessed(candidates);
}
BENCHMARK(BM_AnalyticStage_KimiK2_12xH200_1M)->Unit(benchmark::kMillisecond);

// The analytic lower bound of one candidate (run on those that fit memory).
void BM_LowerBound_KimiK2_1M(benchmark::State& state) {
  const auto model = mop::workload::load_model("kimi-k2");
  const auto cluster = mop::hw::load_cluster("h200");
  const mop::strategy::PlanContext ctx = kimi_1m_context(model, cluster);
  const auto plan = mop::strategy::resolve_plan("mop", ctx).plan;
  const mop::strategy::LoweringContext lc{&model, ctx.seq, 8, ctx.hw, {}};
  for (auto _ : state)
    benchmark::DoNotOptimize(
        mop::planner::step_lower_bound_s(plan, lc, cluster, mop::hw::Calibration{}));
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_LowerBound_KimiK2_1M);

} // namespace

namespace {

// Full-rank simulation under uneven routing (docs/ROUTING.md): the best plan of `mop plan`
// (found once, under balanced routing) with the routing's reserve, then one evaluation as
// `mop simulate` runs it (names, no structural check) with every expert-parallel rank its own
// class. Kimi-K2 at 128K on 12 x 8 H200 (EP 96), and
// on 128 nodes (1,024 GPUs), with a max/mean expert load of 1.5; and on 12 nodes with
// least-loaded rebalancing.
void full_rank(benchmark::State& state, int nodes, bool rebalance = false) {
  const auto model = mop::workload::load_model("kimi-k2");
  const auto cluster = mop::hw::load_cluster("h200");
  const auto loads =
      mop::workload::expert_loads(mop::workload::parse_routing("imbalance:1.5", 0), model);
  mop::strategy::PlanContext ctx;
  ctx.model = &model;
  ctx.seq = std::int64_t{128} << 10;
  ctx.cluster = {cluster.node.gpus_per_node, nodes};
  ctx.hw = mop::strategy::memory_hardware(cluster);
  // The plan `mop plan` finds under balanced routing, reserving for this routing.
  mop::planner::SearchOptions so;
  so.top = 1;
  auto plan = mop::planner::search_plans(ctx, cluster, mop::hw::Calibration{}, so).results.at(0).plan;
  if (rebalance) { // least-loaded rebalancing down to the mean (it triggers in every layer)
    plan.moe.rebalance = mop::strategy::Rebalance::least_loaded;
    plan.moe.rebalance_threshold = plan.moe.rebalance_capacity = 1.0;
  }
  ctx.expert_loads = &loads;
  ctx.routing_id = mop::strategy::next_routing_id();
  mop::strategy::reserve_for_routing(plan, ctx);
  const mop::strategy::LoweringContext lc = mop::strategy::lowering_context(ctx);
  std::int64_t classes = 0, ops = 0;
  for (auto _ : state) {
    const auto e = mop::planner::evaluate_step(plan, lc, cluster, mop::hw::Calibration{}, 16,
                                               mop::planner::Lowering::cost_only,
                                               mop::planner::Check::skip);
    classes += static_cast<std::int64_t>(e.schedule.classes.size());
    for (const auto& c : e.schedule.classes)
      ops += static_cast<std::int64_t>(c.ops.size());
    benchmark::DoNotOptimize(e.step_time_s);
  }
  state.counters["classes"] =
      benchmark::Counter(static_cast<double>(classes), benchmark::Counter::kAvgIterations);
  state.counters["ops_per_eval"] =
      benchmark::Counter(static_cast<double>(ops), benchmark::Counter::kAvgIterations);
}

void BM_FullRank_KimiK2_12xH200_128K_imbalance1_5(benchmark::State& state) {
  full_rank(state, 12);
}
BENCHMARK(BM_FullRank_KimiK2_12xH200_128K_imbalance1_5)->Unit(benchmark::kMillisecond);

void BM_FullRank_KimiK2_128xH200_128K_imbalance1_5(benchmark::State& state) {
  full_rank(state, 128);
}
BENCHMARK(BM_FullRank_KimiK2_128xH200_128K_imbalance1_5)->Unit(benchmark::kMillisecond);

void BM_FullRank_KimiK2_12xH200_128K_imbalance1_5_rebalanced(benchmark::State& state) {
  full_rank(state, 12, true);
}
BENCHMARK(BM_FullRank_KimiK2_12xH200_128K_imbalance1_5_rebalanced)->Unit(benchmark::kMillisecond);

} // namespace
