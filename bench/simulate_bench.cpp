// Wall time of one `mop simulate` evaluation (lower + play, steady-state extrapolation) for the
// issue's two reference cases; the plan is resolved once, outside the timed loop.
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "strategies/evaluate.hpp"
#include "strategies/hardware.hpp"
#include "strategies/presets.hpp"
#include "workload/catalog.hpp"

#include <benchmark/benchmark.h>

namespace {

void run(benchmark::State& state, const char* model_id, const char* cluster_id, int nodes,
         std::int64_t seq, const char* family) {
  const auto model = mop::workload::load_model(model_id);
  const auto cluster = mop::hw::load_cluster(cluster_id);
  mop::strategy::PlanContext ctx;
  ctx.model = &model;
  ctx.seq = seq;
  ctx.cluster = {cluster.node.gpus_per_node, nodes};
  ctx.hw = mop::strategy::memory_hardware(cluster);
  const auto plan = mop::strategy::resolve_plan(family, ctx).plan;
  const mop::strategy::LoweringContext lc{&model, seq, cluster.node.gpus_per_node, ctx.hw, {}};
  std::int64_t ops = 0, events = 0;
  for (auto _ : state) {
    const auto e = mop::strategy::evaluate_step(plan, lc, cluster, mop::hw::Calibration{});
    for (const auto& c : e.schedule.classes)
      ops += static_cast<std::int64_t>(c.ops.size()) * 1;
    events += e.result.events;
    benchmark::DoNotOptimize(e.step_time_s);
  }
  state.counters["ops_per_eval"] =
      benchmark::Counter(static_cast<double>(ops), benchmark::Counter::kAvgIterations);
  state.counters["events_per_s"] =
      benchmark::Counter(static_cast<double>(events), benchmark::Counter::kIsRate);
}

void BM_KimiK2_12xH200_1M_mop(benchmark::State& state) {
  run(state, "kimi-k2", "h200", 12, std::int64_t{1} << 20, "mop");
}
BENCHMARK(BM_KimiK2_12xH200_1M_mop)->Unit(benchmark::kMillisecond);

void BM_Llama3_405B_128xH100_8K_megatron(benchmark::State& state) {
  run(state, "llama3-405b", "h100", 128, 8192, "megatron");
}
BENCHMARK(BM_Llama3_405B_128xH100_8K_megatron)->Unit(benchmark::kMillisecond);

} // namespace
