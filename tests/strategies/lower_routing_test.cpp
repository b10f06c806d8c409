// Uneven routing: every expert-parallel rank its own class, sized by its tokens (hand-made
// histograms), waiting for the slowest at each exchange; balanced routing unchanged.
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "hw_models/compute.hpp"
#include "sim/engine.hpp"
#include "strategies/hardware.hpp"
#include "strategies/lower.hpp"
#include "strategies/memory.hpp"
#include "strategies/presets.hpp"
#include "tests/support/approx.hpp"
#include "workload/catalog.hpp"
#include "workload/routing.hpp"

#include <algorithm>
#include <doctest/doctest.h>
#include <fmt/format.h>
#include <string>

namespace strategies_lower_routing_test {

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

TEST_CASE("least-loaded rebalancing: each rank's segments, copies and exchange, by hand" *
          doctest::test_suite("independent")) {
  // The hand histogram (rank loads 2, .5, .5, 1 times the mean) with LLEP at λ 1.3, α 1.1: in
  // units of an expert's mean (1024 rows), ranks hold 4, 1, 1 and 2 of a mean 2, so each may
  // take 2.2. Expert 0 (3) first: rank 0 keeps 2.2 − 1 (its expert 1 still to come) = 1.2, the
  // least-loaded rank 1 takes 1.2 (room 2.2 − 1), then rank 2 the last 0.6 (below the minimum
  // share of 1024 tokens = 1, but it finishes the expert). The rest stays home. Loads per local
  // expert after: 1.1, 1.1, 0.8, 1.0; rank 0 sends two copies of expert 0, ranks 1 and 2
  // receive one each, all on one node.
  const workload::ModelSpec m = workload::load_model("tiny-moe");
  const hw::ClusterSpec c = hw::load_cluster("h100");
  Plan p = ep4_plan(2);
  p.moe.rebalance = Rebalance::least_loaded;
  const auto loads = hand_loads();
  LoweringContext plain{&m, 1024, 8, memory_hardware(c), {}};
  LoweringContext routed = plain;
  routed.expert_loads = &loads;
  const sim::Schedule s = lower(p, routed);
  sim::check_schedule(s);
  REQUIRE(s.classes.size() == 4);
  const std::vector<std::vector<double>> rows = {
      {1.2 * 1024, 1024}, {512, 512, 1.2 * 1024}, {512, 512, 0.6 * 1024}, {1024, 1024}};
  const double copy = 3.0 * 64 * 32 * 2; // gate, up and down of one expert, BF16
  CHECK(expert_copy_bytes(m, p) == copy);
  const std::vector<int> moved = {2, 1, 1, 0};
  const std::vector<int> received = {0, 1, 1, 0};
  for (std::size_t r = 0; r < 4; ++r) {
    CAPTURE(r);
    const sim::RankClass& rc = s.classes[r];
    const sim::Op* up = find_op(rc, "L1.experts_gate_up.mb0");
    REQUIRE(up != nullptr);
    REQUIRE(up->gemm.rows_per_expert.size() == rows[r].size());
    for (std::size_t i = 0; i < rows[r].size(); ++i)
      CHECK(up->gemm.rows_per_expert[i] == rel(rows[r][i]));
    const sim::Op* d = find_op(rc, "L1.ep_dispatch.mb0");
    REQUIRE(d != nullptr);
    CHECK(d->bytes == rel(1.1 * 2048.0 * 64 * 2)); // the most loaded rank's, now 1.1x
    // The copies: sent and received on the node; nothing crosses nodes.
    for (const char* name : {"L1.llep_weights.node.mb0", "L1.llep_refetch.node.mb0",
                             "L1.llep_weights.node.mb0.bwd"}) {
      CAPTURE(name);
      const sim::Op* w = find_op(rc, name);
      REQUIRE(w != nullptr);
      CHECK(w->kind == (moved[r] > 0 ? sim::OpKind::send_recv : sim::OpKind::barrier));
      CHECK(w->bytes == doctest::Approx(moved[r] * copy));
    }
    const sim::Op* net = find_op(rc, "L1.llep_weights.net.mb0");
    REQUIRE(net != nullptr);
    CHECK(net->kind == sim::OpKind::barrier);
    CHECK(tensor_bytes(rc, "L1 expert copies mb0") == received[r] * copy);
    CHECK(tensor_bytes(rc, "L1 expert copies and gradients mb0") == 2 * received[r] * copy);
  }
  // The plan's reserve: rebalanced, the worst rank holds 1.1x the mean (2x without), and a
  // rank receives at most one copy.
  PlanContext ctx;
  ctx.model = &m;
  ctx.seq = 1024;
  ctx.expert_loads = &loads;
  Plan q = p;
  reserve_for_routing(q, ctx);
  CHECK(q.moe.imbalance == rel(1.1));
  CHECK(q.moe.spill_copies == 1);
  Plan unbalanced = ep4_plan(2);
  reserve_for_routing(unbalanced, ctx);
  CHECK(unbalanced.moe.imbalance == 2);
}

TEST_CASE("least-loaded rebalancing: the skewed step gets faster, and balanced routing moves "
          "nothing" *
          doctest::test_suite("independent")) {
  // Mixtral-8x7B (8 experts, top-2, every layer MoE) on 8 H100s, EP 4, 4K tokens: the hand
  // histogram in every layer. Rebalanced, the hot rank computes 1.1x the mean rows instead of
  // 2x, for two 336 MB expert copies over NVLink per layer (and their gradients).
  const workload::ModelSpec m = workload::load_model("mixtral-8x7b");
  const hw::ClusterSpec c = hw::load_cluster("h100");
  Plan p;
  p.world = 8;
  p.moe.ep = 4;
  p.global_batch = 8;
  complete_plan(p);
  Plan llep = p;
  llep.moe.rebalance = Rebalance::least_loaded;
  const std::vector<std::vector<double>> loads(m.layers.size(), hand_loads()[1]);
  const std::vector<std::vector<double>> balanced(m.layers.size(), std::vector<double>(8, 1.0));
  LoweringContext routed{&m, 4096, 8, memory_hardware(c), {}};
  routed.expert_loads = &loads;
  const double skewed = sim::simulate(lower(p, routed), c, hw::Calibration{}).step_time_s;
  const double fixed = sim::simulate(lower(llep, routed), c, hw::Calibration{}).step_time_s;
  LoweringContext even = routed;
  even.expert_loads = &balanced;
  const sim::Schedule b = lower(llep, even);
  const double plain = sim::simulate(lower(p, even), c, hw::Calibration{}).step_time_s;
  MESSAGE(fmt::format("balanced {:.4f} s, skewed {:.4f} s, rebalanced {:.4f} s", plain, skewed,
                      fixed));
  CHECK(fixed < skewed);
  CHECK(fixed > plain);
  // Balanced loads: one class, the copies zero-time barriers, the step as without rebalancing
  // but for the gathered count tables (a few microseconds per layer).
  CHECK(b.classes.size() == 1);
  for (const sim::Op& op : b.classes[0].ops)
    if (op.routed == sim::Routed::spill)
      CHECK(op.kind == sim::OpKind::barrier);
  const double with = sim::simulate(b, c, hw::Calibration{}).step_time_s;
  CHECK(with >= plain);
  CHECK(with < plain * 1.01);
}

} // namespace strategies_lower_routing_test
