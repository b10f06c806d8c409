// The planner: its pruning never drops a plan that would have won, its answer does not depend
// on threads, and its bound is a true lower bound.
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "planner/bound.hpp"
#include "planner/search.hpp"
#include "strategies/hardware.hpp"
#include "tests/support/approx.hpp"
#include "workload/catalog.hpp"

#include <algorithm>
#include <doctest/doctest.h>
#include <set>

namespace planner_search_test {

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

TEST_CASE("a pruned candidate never beats the reported best: the whole space simulated" *
          doctest::test_suite("independent")) {
  // Every family of a small MoE on one node (pipelines with uneven splits, CP, EP/ETP, every ZeRO
  // stage, offload and host optimizers included): the search's top three are the three best of
  // every memory-fitting plan simulated.
  const workload::ModelSpec m = workload::load_model("tiny-moe");
  const hw::ClusterSpec c = hw::load_cluster("h100");
  const PlanContext ctx = context(m, 2048, 1, c);
  SearchOptions o;
  o.top = 3;
  o.max_simulations = 1 << 30;
  const SearchResult s = search_plans(ctx, c, hw::Calibration{}, o);
  REQUIRE(s.exhaustive);
  REQUIRE(s.results.size() == 3);
  CHECK(s.simulated < s.fit_memory / 4); // the bound pruned most of the space
  MESSAGE(s.fit_memory, " plans fit, ", s.simulated, " simulated");
  // Second method: simulate every memory-fitting plan of every family.
  std::vector<double> all;
  std::set<std::string> seen;
  for (const std::string& family : family_names())
    for (const Plan& p : enumerate_family(family, ctx)) {
      if (!analyze_memory(m, p, 2048, ctx.hw).fits())
        continue;
      Json j = to_json(p);
      j.erase("family");
      if (!seen.insert(j.dump()).second)
        continue;
      const StepEvaluation e =
          evaluate_step(p, LoweringContext{&m, 2048, 8, ctx.hw, {}}, c, hw::Calibration{}, 8,
                        Lowering::cost_only, Check::skip);
      all.push_back(e.step_time_s / e.tokens_per_step);
    }
  std::sort(all.begin(), all.end());
  for (std::size_t i = 0; i < 3; ++i) {
    const auto& r = s.results[i];
    CHECK(r.eval.step_time_s / r.eval.tokens_per_step == mop::test::rel(all[i]));
  }
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

} // namespace planner_search_test
