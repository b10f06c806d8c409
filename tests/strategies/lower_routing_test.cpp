// Uneven routing: every expert-parallel rank its own class, sized by its tokens (hand-made
// histograms), waiting for the slowest at each exchange; balanced routing unchanged.
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "hw_models/compute.hpp"
#include "sim/engine.hpp"
#include "strategies/hardware.hpp"
#include "strategies/lower.hpp"
#include "strategies/memory.hpp"
#include "tests/support/approx.hpp"
#include "workload/catalog.hpp"
#include "workload/routing.hpp"

#include <algorithm>
#include <doctest/doctest.h>
#include <string>

using namespace mop;
using namespace mop::strategy;
using mop::test::rel;

namespace {

// tiny-moe (layer 0 dense, layer 1 MoE with 8 experts, top-2) on 8 GPUs, EP 4, ZeRO-1.
Plan ep4_plan(int micro_batches) {
  Plan p;
  p.world = 8;
  p.moe.ep = 4;
  p.global_batch = 8 * micro_batches;
  complete_plan(p);
  return p;
}

// Counts 6 2 1 1 1 1 2 2 (mean 2): loads 3 1 .5 .5 .5 .5 1 1; the four ranks (two experts
// each) receive 2, .5, .5 and 1 times the mean.
std::vector<std::vector<double>> hand_loads() {
  return {{}, {3, 1, 0.5, 0.5, 0.5, 0.5, 1, 1}};
}

const sim::Op* find_op(const sim::RankClass& rc, const std::string& name) {
  for (const sim::Op& op : rc.ops)
    if (op.name == name)
      return &op;
  return nullptr;
}

double tensor_bytes(const sim::RankClass& rc, const std::string& name) {
  for (const sim::Tensor& t : rc.tensors)
    if (t.name == name)
      return t.bytes;
  return -1;
}

} // namespace

TEST_CASE("uneven routing: balanced loads lower and simulate exactly as without them" *
          doctest::test_suite("independent")) {
  const workload::ModelSpec m = workload::load_model("tiny-moe");
  const hw::ClusterSpec c = hw::load_cluster("h100");
  const Plan p = ep4_plan(4);
  const std::vector<std::vector<double>> balanced = {{}, std::vector<double>(8, 1.0)};
  LoweringContext plain{&m, 1024, 8, memory_hardware(c), {}};
  LoweringContext routed = plain;
  routed.expert_loads = &balanced;
  const sim::Schedule a = lower(p, plain), b = lower(p, routed);
  CHECK(b.classes.size() == a.classes.size());
  const sim::SimResult ra = sim::simulate(a, c, hw::Calibration{});
  const sim::SimResult rb = sim::simulate(b, c, hw::Calibration{});
  CHECK(rb.step_time_s == ra.step_time_s);
  CHECK(rb.classes[0].memory.peak_hbm_bytes == ra.classes[0].memory.peak_hbm_bytes);
}

TEST_CASE("uneven routing: the worst rank's tokens, buffers and grouped GEMM, by hand" *
          doctest::test_suite("independent")) {
  const workload::ModelSpec m = workload::load_model("tiny-moe");
  const hw::ClusterSpec c = hw::load_cluster("h100");
  const std::int64_t seq = 1024;
  const Plan p = ep4_plan(2);
  const auto loads = hand_loads();
  LoweringContext plain{&m, seq, 8, memory_hardware(c), {}};
  LoweringContext routed = plain;
  routed.expert_loads = &loads;
  const sim::Schedule a = lower(p, plain), s = lower(p, routed);
  // One class per expert-parallel rank, each standing for 2 of the stage's 8 ranks.
  REQUIRE(s.classes.size() == 4);
  for (const auto& rc : s.classes)
    CHECK(rc.multiplicity == 2);
  // Tokens on a rank: one sequence of 1024, top-2: 2048 routed pairs sent by each of the 4
  // ranks, 8192 over 8 experts, 1024 per expert when balanced (2048 per rank). Rank 0 holds
  // experts 0 and 1 (loads 3 and 1): 3072 + 1024 = 4096 rows, twice the balanced.
  const sim::RankClass& hot = s.classes[0];
  const sim::Op* up = find_op(hot, "L1.experts_gate_up.mb0");
  REQUIRE(up != nullptr);
  CHECK(up->gemm.rows_per_expert == std::vector<double>{3072, 1024});
  CHECK(up->gemm.m == 4096);
  const sim::Op* cold = find_op(s.classes[1], "L1.experts_gate_up.mb0");
  REQUIRE(cold != nullptr);
  CHECK(cold->gemm.rows_per_expert == std::vector<double>{512, 512});
  // The grouped GEMM's time is the cost model's for those rows (h = 64, gated: n = 2·32).
  const std::vector<double> rows = {3072, 1024};
  CHECK(sim::op_duration_s(*up, s, c, hw::Calibration{}) ==
        rel(hw::grouped_gemm_time_s(c, hw::Calibration{}, rows, 64, 64, hw::Dtype::bf16)));
  // The dispatch moves as much as the most loaded rank receives: twice the balanced bytes
  // (2048 pairs of 64 BF16 values: 262,144 bytes) on every rank.
  const sim::Op* balanced_dispatch = find_op(a.classes[0], "L1.ep_dispatch.mb0");
  REQUIRE(balanced_dispatch != nullptr);
  CHECK(balanced_dispatch->bytes == rel(2048.0 * 64 * 2));
  for (const auto& rc : s.classes) {
    const sim::Op* d = find_op(rc, "L1.ep_dispatch.mb0");
    REQUIRE(d != nullptr);
    CHECK(d->bytes == rel(2 * 2048.0 * 64 * 2));
  }
  // Saved activations of the MoE layer: the routed part (permuted inputs, the experts' gate/up
  // and activation, their outputs) grows with the rank's load, the rest does not.
  Plan one = p, two = p;
  two.moe.imbalance = 2;
  const double s1 = saved_activation_bytes(m, m.layers[1], one, seq, {});
  const double s2 = saved_activation_bytes(m, m.layers[1], two, seq, {});
  CHECK(tensor_bytes(hot, "L1 saved mb0") == rel(s2));                      // load 2
  CHECK(tensor_bytes(s.classes[1], "L1 saved mb0") == rel(s1 - 0.5 * (s2 - s1))); // load 0.5
  CHECK(tensor_bytes(s.classes[3], "L1 saved mb0") == rel(s1));             // load 1
  CHECK(tensor_bytes(hot, "L0 saved mb0") == tensor_bytes(a.classes[0], "L0 saved mb0"));
}

TEST_CASE("uneven routing: every rank leaves each exchange together, the step waits for the "
          "hottest" *
          doctest::test_suite("independent")) {
  const workload::ModelSpec m = workload::load_model("tiny-moe");
  const hw::ClusterSpec c = hw::load_cluster("h100");
  const Plan p = ep4_plan(4);
  const auto loads = hand_loads();
  LoweringContext plain{&m, 4096, 8, memory_hardware(c), {}};
  LoweringContext routed = plain;
  routed.expert_loads = &loads;
  const sim::Schedule a = lower(p, plain), s = lower(p, routed);
  sim::check_schedule(s);
  const sim::SimResult ra = sim::simulate(a, c, hw::Calibration{});
  const sim::SimResult r = sim::simulate(s, c, hw::Calibration{});
  CHECK(r.step_time_s > ra.step_time_s);
  // Each combine ends at one time in every class: the all-to-all starts when the last rank is
  // ready (the hot rank, after its 2x expert GEMMs) and lasts as long everywhere.
  for (const char* name : {"L1.ep_combine.mb0", "L1.ep_dispatch.mb3", "L1.ep_combine.mb2.bwd"}) {
    CAPTURE(name);
    std::vector<double> ends;
    for (std::size_t k = 0; k < s.classes.size(); ++k) {
      const auto& ops = s.classes[k].ops;
      const auto it = std::find_if(ops.begin(), ops.end(),
                                   [&](const sim::Op& op) { return op.name == name; });
      REQUIRE(it != ops.end());
      ends.push_back(r.classes[k].ops[static_cast<std::size_t>(it - ops.begin())].end_s);
    }
    for (double e : ends)
      CHECK(e == rel(ends[0]));
  }
  // The hot rank (class 0) is the one whose expert GEMMs run longest; the cold ones wait.
  const auto busy = [&](std::size_t k) {
    double t = 0;
    for (std::size_t i = 0; i < s.classes[k].ops.size(); ++i)
      if (s.classes[k].ops[i].kind == sim::OpKind::grouped_gemm)
        t += r.classes[k].ops[i].end_s - r.classes[k].ops[i].start_s;
    return t;
  };
  CHECK(busy(0) > busy(3));
  CHECK(busy(3) > busy(1));
  // Memory: the hot rank holds the most saved activations.
  CHECK(r.classes[0].memory.peak_hbm_bytes > r.classes[1].memory.peak_hbm_bytes);
  CHECK(r.classes[0].memory.peak_hbm_bytes > ra.classes[0].memory.peak_hbm_bytes);
}
