// The planner: its pruning never drops a plan that would have won, its answer does not depend
// on threads, and its bound is a true lower bound.
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "planner/bound.hpp"
#include "planner/search.hpp"
#include "strategies/hardware.hpp"
#include "tests/support/approx.hpp"
#include "workload/catalog.hpp"

#include <doctest/doctest.h>

using namespace mop;
using namespace mop::planner;
using namespace mop::strategy;

namespace {
PlanContext context(const workload::ModelSpec& m, std::int64_t seq, int nodes,
                    const hw::ClusterSpec& c) {
  PlanContext ctx;
  ctx.model = &m;
  ctx.seq = seq;
  ctx.cluster = ClusterShape{c.node.gpus_per_node, nodes};
  ctx.hw = memory_hardware(c);
  ctx.global_batch = 16;
  return ctx;
}
} // namespace

TEST_CASE("the compute lower bound never exceeds the simulated step" *
          doctest::test_suite("independent")) {
  const workload::ModelSpec m = workload::load_model("qwen3-30b-a3b");
  const hw::ClusterSpec c = hw::load_cluster("h100");
  const PlanContext ctx = context(m, 4096, 2, c);
  int checked = 0;
  for (const std::string& family : family_names()) {
    const std::vector<Plan> plans = enumerate_family(family, ctx);
    for (std::size_t i = 0; i < plans.size(); i += std::max<std::size_t>(1, plans.size() / 6)) {
      const LoweringContext lc{&m, 4096, 8, ctx.hw, {}};
      const double bound = compute_lower_bound_s(plans[i], lc, c, hw::Calibration{});
      const StepEvaluation e = evaluate_step(plans[i], lc, c, hw::Calibration{}, 4);
      CAPTURE(summary(plans[i]));
      CHECK(bound > 0);
      CHECK(bound <= e.step_time_s * (1 + 1e-9));
      ++checked;
    }
  }
  CHECK(checked >= 20);
}

TEST_CASE("a pruned candidate never beats the reported best: the whole space simulated" *
          doctest::test_suite("independent")) {
  const workload::ModelSpec m = workload::load_model("tiny-moe");
  const hw::ClusterSpec c = hw::load_cluster("h100");
  const PlanContext ctx = context(m, 2048, 1, c);
  SearchOptions o;
  o.families = {"fsdp2", "ulysses-zero3"};
  o.top = 1;
  o.max_simulations = 1 << 30;
  const SearchResult s = search_plans(ctx, c, hw::Calibration{}, o);
  REQUIRE(s.exhaustive);
  REQUIRE(s.results.size() == 1);
  CHECK(s.simulated < s.fit_memory); // the bound pruned something
  // Exhaustive second method: simulate every memory-fitting plan of the two families.
  double best = 1e300;
  for (const std::string& family : o.families)
    for (const Plan& p : enumerate_family(family, ctx)) {
      if (!analyze_memory(m, p, 2048, ctx.hw).fits())
        continue;
      const StepEvaluation e =
          evaluate_step(p, LoweringContext{&m, 2048, 8, ctx.hw, {}}, c, hw::Calibration{}, 8);
      best = std::min(best, e.step_time_s / e.tokens_per_step);
    }
  const auto& r = s.results[0];
  CHECK(r.eval.step_time_s / r.eval.tokens_per_step == mop::test::rel(best));
}

TEST_CASE("the search gives the same answer on one thread and on two" *
          doctest::test_suite("plumbing")) {
  const workload::ModelSpec m = workload::load_model("mixtral-8x7b");
  const hw::ClusterSpec c = hw::load_cluster("h100");
  const PlanContext ctx = context(m, 4096, 2, c);
  SearchOptions o;
  o.top = 3;
  o.max_simulations = 48;
  o.threads = 1;
  const SearchResult one = search_plans(ctx, c, hw::Calibration{}, o);
  o.threads = 2;
  const SearchResult two = search_plans(ctx, c, hw::Calibration{}, o);
  REQUIRE(one.results.size() == two.results.size());
  for (std::size_t i = 0; i < one.results.size(); ++i) {
    CHECK(summary(one.results[i].plan) == summary(two.results[i].plan));
    CHECK(one.results[i].eval.step_time_s == two.results[i].eval.step_time_s);
  }
  CHECK(one.simulated == two.simulated);
}
