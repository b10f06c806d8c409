// Evaluating a step: the steady-state extrapolation agrees with simulating every micro-batch,
// and every preset's evaluated step does exactly the model's arithmetic.
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "planner/evaluate.hpp"
#include "strategies/hardware.hpp"
#include "strategies/presets.hpp"
#include "tests/support/approx.hpp"
#include "workload/catalog.hpp"
#include "workload/flops.hpp"
#include "workload/params.hpp"

#include <cmath>
#include <doctest/doctest.h>

namespace planner_evaluate_test {

using namespace mop;
using namespace mop::strategy;
namespace planner = mop::planner;
using mop::planner::evaluate_step;
using mop::planner::StepEvaluation;

TEST_CASE("the steady-state extrapolation equals simulating every micro-batch" *
          doctest::test_suite("independent")) {
  const workload::ModelSpec m = workload::load_model("qwen3-30b-a3b");
  const hw::ClusterSpec c = hw::load_cluster("h100");
  for (int pp : {1, 2, 4}) {
    Plan p;
    p.world = 16;
    p.pp = pp;
    p.moe.ep = std::min(8, 16 / pp);
    if (pp == 4) {
      p.vp = 2;
      p.schedule = PipelineSchedule::interleaved_1f1b;
    }
    for (auto& s : p.state)
      s.zero = pp > 1 ? 1 : 3;
    p.global_batch = 40 * (16 / pp); // 40 micro-batches per replica
    complete_plan(p);
    const LoweringContext ctx{&m, 2048, 8, memory_hardware(c), {}};
    const StepEvaluation full = evaluate_step(p, ctx, c, hw::Calibration{}, 0);
    const StepEvaluation fast = evaluate_step(p, ctx, c, hw::Calibration{}, 8);
    CAPTURE(pp);
    REQUIRE(fast.micro_batches_simulated < full.micro_batches_simulated);
    CHECK(std::fabs(fast.step_time_s - full.step_time_s) < 1e-6 * full.step_time_s);
    // The breakdown follows the class that ends the step, which may differ between the short
    // runs and the full one with interleaving: its parts agree to 0.1 % of the step.
    CHECK(std::fabs(fast.result.breakdown.exposed_comm - full.result.breakdown.exposed_comm) <
          1e-3 * full.step_time_s);
    CHECK(fast.model_flops_per_step == mop::test::rel(full.model_flops_per_step));
  }
}

TEST_CASE("a folded run prices the steady period once and equals simulating every micro-batch" *
          doctest::test_suite("independent")) {
  // Plans of every family: those whose 2·pp + 4 micro-batch run repeats itself in the middle are
  // priced from that run alone (the period found inside it); the others take the two runs. A
  // second method: every micro-batch simulated.
  const workload::ModelSpec m = workload::load_model("qwen3-30b-a3b");
  const hw::ClusterSpec c = hw::load_cluster("h100");
  PlanContext ctx;
  ctx.model = &m;
  ctx.seq = 1024;
  ctx.cluster = ClusterShape{8, 2};
  ctx.hw = memory_hardware(c);
  ctx.global_batch = 48;
  LoweringContext lc{&m, ctx.seq, 8, ctx.hw, {}};
  lc.names = false;
  int checked = 0, folded = 0;
  for (const std::string& f : family_names()) {
    const std::vector<Plan> plans = enumerate_family(f, ctx);
    // Eight plans of each family, spread over its enumeration.
    for (std::size_t i = 0; i < plans.size(); i += std::max<std::size_t>(1, plans.size() / 8)) {
      const Plan& p = plans[i];
      if (p.micro_batches() <= 2 * p.pp + 4)
        continue;
      const StepEvaluation fast = evaluate_step(p, lc, c, hw::Calibration{}, 16,
                                                planner::Lowering::cost_only, planner::Check::skip);
      const StepEvaluation full = evaluate_step(p, lc, c, hw::Calibration{}, 0,
                                                planner::Lowering::cost_only, planner::Check::skip);
      CAPTURE(summary(p));
      ++checked;
      folded += fast.micro_batches_simulated == 2 * p.pp + 4 ? 1 : 0;
      const double step = full.step_time_s;
      CHECK(fast.step_time_s == mop::test::rel(step, 1e-6));
      const sim::Breakdown& a = fast.result.breakdown;
      const sim::Breakdown& b = full.result.breakdown;
      if (p.schedule != PipelineSchedule::interleaved_1f1b) {
        CHECK(std::fabs(a.compute - b.compute) < 1e-6 * step);
        CHECK(std::fabs(a.exposed_comm - b.exposed_comm) < 1e-6 * step);
        CHECK(std::fabs(a.bubble - b.bubble) < 1e-6 * step);
        CHECK(std::fabs(a.optimizer - b.optimizer) < 1e-6 * step);
      }
      CHECK(fast.model_flops_per_step == mop::test::rel(full.model_flops_per_step));
    }
  }
  CHECK(checked >= 16);
  CHECK(folded * 2 >= checked);
}

TEST_CASE("under uneven stage splits the extrapolation still equals simulating every micro-batch" *
          doctest::test_suite("independent")) {
  // Llama-3-70B's 80 layers over 32 stages (2 or 3 each) under TP 8: the step is linear in the
  // micro-batches only from 2·pp on, where two runs at pp and 2·pp extrapolate 2 % short (6 %
  // at 4K tokens).
  const workload::ModelSpec m = workload::load_model("llama3-70b");
  const hw::ClusterSpec c = hw::load_cluster("h100");
  Plan p;
  p.world = 256;
  p.pp = 32;
  p.attention.tp = 8;
  p.attention.sp = true;
  p.dense.tp = 8;
  p.embed.tp = 8;
  p.global_batch = 160;
  complete_plan(p);
  const LoweringContext ctx{&m, 1024, 8, memory_hardware(c), {}};
  const StepEvaluation full = evaluate_step(p, ctx, c, hw::Calibration{}, 0);
  const StepEvaluation fast = evaluate_step(p, ctx, c, hw::Calibration{}, 16);
  REQUIRE(fast.micro_batches_simulated < full.micro_batches_simulated);
  CHECK(fast.step_time_s == mop::test::rel(full.step_time_s, 1e-6));
}

TEST_CASE("every preset simulates on every catalog model, doing exactly the model's arithmetic" *
          doctest::test_suite("independent")) {
  const hw::ClusterSpec c = hw::load_cluster("h200");
  for (const std::string& id : workload::catalog_ids()) {
    const workload::ModelSpec m = workload::load_model(id);
    const double params = static_cast<double>(workload::count_params(m).total.total());
    const int nodes = params > 300e9 ? 12 : params > 100e9 ? 4 : 1;
    PlanContext ctx;
    ctx.model = &m;
    ctx.seq = 4096;
    ctx.cluster = ClusterShape{8, nodes};
    ctx.hw = memory_hardware(c);
    for (const std::string& family : family_names()) {
      CAPTURE(id);
      CAPTURE(family);
      const ResolvedPlan r = resolve_plan(family, ctx);
      const StepEvaluation e =
          evaluate_step(r.plan, LoweringContext{&m, 4096, 8, ctx.hw, {}}, c, hw::Calibration{}, 4);
      CHECK(std::isfinite(e.step_time_s));
      CHECK(e.step_time_s > 0);
      // Second method: 3 x forward FLOPs x sequences, from the workload model.
      CHECK(e.model_flops_per_step ==
            mop::test::rel(3 * workload::count_flops(m, 4096).model_flops_fwd * r.plan.global_batch,
                           1e-6));
    }
  }
}

} // namespace planner_evaluate_test
