// Folding a model's repeated layers against a second method: every layer simulated.
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "planner/evaluate.hpp"
#include "planner/fold.hpp"
#include "planner/replay.hpp"
#include "strategies/hardware.hpp"
#include "strategies/memory.hpp"
#include "strategies/presets.hpp"
#include "tests/support/approx.hpp"
#include "workload/catalog.hpp"

#include <cmath>
#include <doctest/doctest.h>
#include <map>
#include <string>

namespace planner_fold_test {

using namespace mop;
using namespace mop::strategy;
namespace planner = mop::planner;

struct Case {
  const char* model;
  const char* cluster;
  int nodes;
  std::int64_t seq;
  int stride; // every stride-th single-stage plan that fits (the analytic model's verdict)
};

double relative(double a, double b) {
  return std::fabs(a - b) / std::max(std::fabs(b), 1.0);
}

TEST_CASE("a step folded over its repeated layers equals simulating every layer" *
          doctest::test_suite("independent")) {
  // Single-stage plans of every family: Kimi-K2 (one dense layer, 60 MoE) at 1M and 128K on
  // 12 x 8 H200 (ZeRO-3 prefetch, host AdamW streamed into the forward, offloaded gradients and
  // activations, CP ring / Ulysses / hybrid), Qwen3-30B-A3B (48 MoE layers, all alike) at 4K on
  // 2 x 8 H100 with a thousand micro-batches (folded inside as well), Llama-3.1-8B at 8K on
  // one 8 x H100 node (32 layers, all alike). Measured: steps within 3e-4 of the full simulation, memory peaks to rounding;
  // the tolerance here is 0.1 %, the search's (kReplayTolerance) 1 %.
  const Case cases[] = {{"kimi-k2", "h200", 12, std::int64_t{1} << 20, 3},
                        {"kimi-k2", "h200", 12, 131072, 25},
                        {"qwen3-30b-a3b", "h100", 2, 4096, 401},
                        {"llama3-8b", "h100", 1, 8192, 41}};
  int folded = 0;
  std::map<planner::Unfolded, int> refused;
  double worst_step = 0, worst_memory = 0, worst_part = 0;
  for (const Case& k : cases) {
    const workload::ModelSpec m = workload::load_model(k.model);
    const hw::ClusterSpec c = hw::load_cluster(k.cluster);
    PlanContext ctx;
    ctx.model = &m;
    ctx.seq = k.seq;
    ctx.cluster = ClusterShape{8, k.nodes};
    ctx.hw = memory_hardware(c);
    LoweringContext lc = lowering_context(ctx);
    lc.names = false;
    int index = 0;
    for (const std::string& family : family_names())
      for (const Plan& p : enumerate_family(family, ctx)) {
        if (p.pp != 1 || !analyze_memory(m, p, k.seq, ctx.hw).fits() || index++ % k.stride != 0)
          continue;
        CAPTURE(summary(p));
        REQUIRE(planner::foldable_layers(p, lc).has_value());
        planner::Unfolded why = planner::Unfolded::no_run;
        auto f = planner::fold_layers(p, lc, c, hw::Calibration{}, 16, &why);
        if (!f) {
          ++refused[why];
          continue;
        }
        ++folded;
        const planner::StepEvaluation e = planner::evaluate_step(
            p, lc, c, hw::Calibration{}, 16, planner::Lowering::cost_only, planner::Check::skip);
        CHECK(f->folded_layers > 0);
        CHECK(f->step_time_s == mop::test::rel(e.step_time_s, 1e-3));
        CHECK(f->model_flops_per_step == mop::test::rel(e.model_flops_per_step, 1e-9));
        CHECK(f->tokens_per_step == e.tokens_per_step);
        // What the critical path's time is spent on, within 2 % of the step (as the chunk
        // replay's): where compute and communication overlap, which of them an instant is
        // charged to shifts with depth (measured: 1.1 % at most).
        sim::each_part(f->result.breakdown, e.result.breakdown,
                       [&](double& folded_part, double full_part) {
                         const double off = std::fabs(folded_part - full_part) / e.step_time_s;
                         CHECK(off <= 0.02);
                         worst_part = std::max(worst_part, off);
                       });
        worst_step = std::max(worst_step, relative(f->step_time_s, e.step_time_s));
        REQUIRE(f->result.classes.size() == e.result.classes.size());
        for (std::size_t i = 0; i < e.result.classes.size(); ++i) {
          const sim::ClassMemory& a = f->result.classes[i].memory;
          const sim::ClassMemory& b = e.result.classes[i].memory;
          CHECK(relative(a.peak_hbm_bytes, b.peak_hbm_bytes) <= 1e-3);
          CHECK(relative(a.peak_host_bytes, b.peak_host_bytes) <= 1e-3);
          for (int kind = 0; kind < 6; ++kind)
            CHECK(std::fabs(a.at_peak[kind] - b.at_peak[kind]) <= 1e-3 * b.peak_hbm_bytes);
          worst_memory = std::max(worst_memory, relative(a.peak_hbm_bytes, b.peak_hbm_bytes));
        }
      }
  }
  MESSAGE("folded ", folded, ", refused: not linear ", refused[planner::Unfolded::not_linear],
          ", drifting ", refused[planner::Unfolded::drifts], ", host behind ",
          refused[planner::Unfolded::host_behind], "; worst step ", worst_step, ", worst peak ",
          worst_memory, ", worst part of the breakdown ", worst_part);
  CHECK(folded >= 40);
}

TEST_CASE("folding refuses a step whose copies or host fall behind, and says why" *
          doctest::test_suite("independent")) {
  // Two plans of Qwen3-30B-A3B at 4K on 2 x 8 H100 that settle into no period within four
  // layers. (a) Every activation offloaded: the D2H copies of a layer take longer than its
  // compute, so the copy stream falls further behind with every layer (the full simulation's
  // step and peak grow faster than four layers show: a naive line from them is 6 % short in
  // time and 44 % in memory). (b) Data parallelism alone, four sequences a micro-batch: all
  // 128 experts on every GPU, Transformer Engine's grouped GEMMs launch a GEMM per expert, and
  // the host issues a layer's kernels a little slower than the GPU runs them.
  const workload::ModelSpec m = workload::load_model("qwen3-30b-a3b");
  const hw::ClusterSpec c = hw::load_cluster("h100");
  PlanContext ctx;
  ctx.model = &m;
  ctx.seq = 4096;
  ctx.cluster = ClusterShape{8, 2};
  ctx.hw = memory_hardware(c);
  LoweringContext lc = lowering_context(ctx);
  lc.names = false;
  const std::map<std::string, planner::Unfolded> expected = {
      {"attn[dp16] moe[ep4 edp4] zero3,moe=1 pp1 mb2 rc=none/moe=full/dense=full off=act "
       "opt=gpu/after-backward",
       planner::Unfolded::drifts},
      {"attn[dp16] zero1 pp1 mb4 rc=none opt=gpu/after-backward", planner::Unfolded::host_behind}};
  int seen = 0;
  for (const std::string& family : family_names())
    for (const Plan& p : enumerate_family(family, ctx)) {
      const auto want = expected.find(summary(p));
      if (want == expected.end())
        continue;
      ++seen;
      CAPTURE(want->first);
      planner::Unfolded why = planner::Unfolded::no_run;
      CHECK_FALSE(planner::fold_layers(p, lc, c, hw::Calibration{}, 16, &why).has_value());
      CHECK(why == want->second);
      // The search still evaluates them exactly: it plays every layer.
      const planner::StepEvaluation e = planner::evaluate_for_search(p, lc, c, {}, 16);
      CHECK(e.folded_layers == 0);
    }
  CHECK(seen == 2);
}

TEST_CASE("only a single stage with a long run of alike layers folds" *
          doctest::test_suite("plumbing")) {
  const workload::ModelSpec kimi = workload::load_model("kimi-k2");
  Plan p;
  p.pp = 1;
  LoweringContext lc;
  lc.model = &kimi;
  const auto run = planner::foldable_layers(p, lc);
  REQUIRE(run.has_value());
  CHECK(run->begin == 1); // after the dense first layer
  CHECK(run->length == 60);
  p.pp = 2;
  CHECK_FALSE(planner::foldable_layers(p, lc).has_value());
  // gpt-oss alternates sliding-window and full attention: no two neighbours alike.
  const workload::ModelSpec oss = workload::load_model("gpt-oss-120b");
  p.pp = 1;
  lc.model = &oss;
  CHECK_FALSE(planner::foldable_layers(p, lc).has_value());
}

} // namespace planner_fold_test
