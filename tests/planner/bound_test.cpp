// The analytic tier: the step-time bound equals the engine where the engine adds no contention,
// never exceeds what the engine plays, and stays close to it where the engine adds little.
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "planner/bound.hpp"
#include "planner/evaluate.hpp"
#include "strategies/hardware.hpp"
#include "strategies/presets.hpp"
#include "tests/support/approx.hpp"
#include "workload/catalog.hpp"

#include <doctest/doctest.h>

namespace planner_bound_test {

using namespace mop;
using namespace mop::planner;
using namespace mop::strategy;

namespace {
Plan one_gpu_plan(Recompute rc, int micro_batches) {
  Plan p;
  p.world = 1;
  p.global_batch = micro_batches;
  for (auto& r : p.recompute)
    r = rc;
  complete_plan(p);
  return p;
}
} // namespace

TEST_CASE("on one GPU the analytic tier is the engine's step: every op is on the data path" *
          doctest::test_suite("independent")) {
  // One rank, no collectives, the optimizer on the GPU: the engine plays a single chain, so its
  // step is the sum of the ops' standalone times, which is what the tier adds up without
  // building the Schedule. A second method: the engine itself.
  const hw::ClusterSpec c = hw::load_cluster("h100");
  for (const char* id : {"llama3-8b", "qwen3-30b-a3b"}) {
    const workload::ModelSpec m = workload::load_model(id);
    for (Recompute rc : {Recompute::none, Recompute::selective, Recompute::full}) {
      const Plan p = one_gpu_plan(rc, 3);
      const LoweringContext lc{&m, 4096, 8, memory_hardware(c), {}};
      const StepBound b = step_lower_bound(p, lc, c, hw::Calibration{});
      const StepEvaluation e = evaluate_step(p, lc, c, hw::Calibration{}, 0);
      CAPTURE(id);
      CAPTURE(summary(p));
      CHECK(b.path == mop::test::rel(e.step_time_s, 1e-9));
      CHECK(b.compute == mop::test::rel(e.step_time_s, 1e-9)); // nothing else runs
      CHECK(b.host == 0);
    }
  }
}

TEST_CASE("a pipeline: the tier's fill and drain are the engine's bubble but for the transfers" *
          doctest::test_suite("independent")) {
  // Llama-3-8B over four stages of one GPU each, 1F1B, eight micro-batches: the engine's step is
  // the busiest stage's chain plus the fill and drain through the stages before it, plus the
  // activations' and gradients' transfers between stages, which the tier leaves out (they are
  // 64 MB at 4K tokens: about 0.2 ms each over NVLink, against 30 ms a stage and micro-batch).
  const hw::ClusterSpec c = hw::load_cluster("h100");
  const workload::ModelSpec m = workload::load_model("llama3-8b");
  Plan p;
  p.world = 4;
  p.pp = 4;
  p.global_batch = 8;
  complete_plan(p);
  const LoweringContext lc{&m, 4096, 8, memory_hardware(c), {}};
  const StepBound b = step_lower_bound(p, lc, c, hw::Calibration{});
  const StepEvaluation e = evaluate_step(p, lc, c, hw::Calibration{}, 0);
  CHECK(b.seconds() <= e.step_time_s);
  CHECK(b.seconds() == mop::test::rel(e.step_time_s, 0.005));
  MESSAGE("pipeline: tier ", b.seconds(), " s, engine ", e.step_time_s, " s");
}

TEST_CASE("the analytic tier never exceeds the simulated step, over every family" *
          doctest::test_suite("independent")) {
  // Sampled plans of every family (pipelines with uneven splits, CP, EP/ETP, ZeRO, offload,
  // host optimizers in each overlap mode), each simulated in full.
  const hw::ClusterSpec c = hw::load_cluster("h100");
  struct Case {
    const char* model;
    std::int64_t seq;
    int nodes;
    std::size_t samples;
  };
  int checked = 0;
  double sum = 0;
  for (const Case& k : {Case{"tiny-moe", 2048, 1, 40}, Case{"qwen3-30b-a3b", 4096, 2, 24},
                        Case{"llama3-70b", 4096, 4, 16}}) {
    const workload::ModelSpec m = workload::load_model(k.model);
    PlanContext ctx;
    ctx.model = &m;
    ctx.seq = k.seq;
    ctx.cluster = ClusterShape{c.node.gpus_per_node, k.nodes};
    ctx.hw = memory_hardware(c);
    ctx.global_batch = 32;
    for (const std::string& family : family_names()) {
      const std::vector<Plan> plans = enumerate_family(family, ctx);
      const std::size_t stride = std::max<std::size_t>(1, plans.size() / k.samples * 3);
      for (std::size_t i = 0; i < plans.size(); i += stride) {
        const LoweringContext lc{&m, k.seq, 8, ctx.hw, {}};
        const double bound = step_lower_bound_s(plans[i], lc, c, hw::Calibration{});
        const StepEvaluation e =
            evaluate_step(plans[i], lc, c, hw::Calibration{}, 0, Lowering::cost_only, Check::skip);
        CAPTURE(k.model);
        CAPTURE(summary(plans[i]));
        CHECK(bound > 0);
        CHECK(bound <= e.step_time_s * (1 + 1e-9));
        sum += bound / e.step_time_s;
        ++checked;
      }
    }
  }
  CHECK(checked >= 100);
  MESSAGE(checked, " plans, bound / step ", sum / checked, " on average");
}

TEST_CASE("plans that share their passes' key share their pass times: the cache leaves every "
          "bound as it was" *
          doctest::test_suite("independent")) {
  // Second method: each plan's bound built from its own passes, against the bound that reuses
  // the pass times of an earlier plan with the same strategy::pass_key (the search's order).
  const hw::ClusterSpec c = hw::load_cluster("h200");
  for (const char* id : {"qwen3-30b-a3b", "llama3-8b"}) {
    CAPTURE(id);
    const workload::ModelSpec m = workload::load_model(id);
    PlanContext ctx;
    ctx.model = &m;
    ctx.seq = 4096;
    ctx.cluster = ClusterShape{8, 2};
    ctx.hw = memory_hardware(c);
    LoweringContext lc{&m, ctx.seq, 8, ctx.hw, {}};
    lc.names = false;
    PassTimesCache cache;
    std::size_t plans = 0, reused = 0;
    for (const std::string& f : family_names())
      for (const Plan& p : enumerate_family(f, ctx)) {
        if (plans++ % 3 != 0)
          continue; // a third of them keeps the test short; reuse stays frequent
        reused += cache.find(pass_key(p)) != nullptr ? 1 : 0;
        const StepBound alone = step_lower_bound(p, lc, c, hw::Calibration{});
        const StepBound shared = step_lower_bound(p, lc, c, hw::Calibration{}, &cache);
        CAPTURE(summary(p));
        CHECK(shared.compute == alone.compute);
        CHECK(shared.path == alone.path);
        CHECK(shared.host == alone.host);
        CHECK(shared.dp == alone.dp);
      }
    CHECK(reused > plans / 10);
  }
}

} // namespace planner_bound_test
