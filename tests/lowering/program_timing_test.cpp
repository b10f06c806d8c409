#include "lowering/program.hpp"

#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "sim/engine.hpp"
#include "strategies/plan.hpp"
#include "tests/support/approx.hpp"
#include "tests/support/errors.hpp"
#include "workload/catalog.hpp"

#include <algorithm>
#include <doctest/doctest.h>
#include <string>

namespace lowering_program_timing_test {

using namespace mop;
using strategy::Plan;

namespace {

Plan plan(int world, int global_batch, int tp, int cp = 1) {
  Plan p;
  p.attention.cp = cp;
  p.micro_batch = 1;
  p.world = world;
  p.global_batch = global_batch;
  p.attention.tp = tp;
  p.dense.tp = tp;
  p.embed.tp = tp;
  strategy::complete_plan(p);
  return p;
}

// tiny-dense with `layers` decoder layers.
workload::ModelSpec model(int layers) {
  workload::ModelSpec m = workload::load_model("tiny-dense");
  m.layers.resize(static_cast<std::size_t>(layers), m.layers[0]);
  return m;
}

int index_of(const sim::RankClass& rc, const std::string& name) {
  for (std::size_t i = 0; i < rc.ops.size(); ++i)
    if (rc.ops[i].name == name)
      return static_cast<int>(i);
  FAIL("no op " << name);
  return -1;
}

bool waits_for(const sim::RankClass& rc, int op, int other) {
  const std::vector<int>& d = rc.ops[static_cast<std::size_t>(op)].deps;
  return std::find(d.begin(), d.end(), other) != d.end();
}

} // namespace

TEST_CASE("program timing: ZeRO-3 gathers prefetch one layer ahead, as FSDP2" *
          doctest::test_suite("plumbing")) {
  // Six layers, data parallel over 2 ranks with every kind under ZeRO-3, one micro-batch.
  const workload::ModelSpec m = model(6);
  Plan p = plan(2, 2, 1);
  for (auto& s : p.state)
    s.zero = 3;
  strategy::complete_plan(p);
  const sim::Schedule s = lowering::lower_program(p, {&m, 64, 8});
  const sim::RankClass& rc = s.classes[0];
  // Forward: layer 3's gather waits for layer 1's forward to end, is issued as layer 2 starts
  // (before its first op) and may run while layer 2 computes (no wait for layer 2's end).
  const int g3 = index_of(rc, "L3.attention.fsdp_gather.fwd.mb0");
  CHECK(waits_for(rc, g3, index_of(rc, "L1.mlp_residual.mb0")));
  CHECK_FALSE(waits_for(rc, g3, index_of(rc, "L2.mlp_residual.mb0")));
  CHECK(g3 < index_of(rc, "L2.attn_norm.mb0"));
  CHECK(index_of(rc, "L2.attention.fsdp_gather.fwd.mb0") < index_of(rc, "L1.attn_norm.mb0"));
  // Backward mirrored: layer 2's gather waits for layer 4's backward end and is issued as
  // layer 3's backward starts, ahead of its compute.
  const int b2 = index_of(rc, "L2.attention.fsdp_gather.bwd.mb0");
  CHECK(waits_for(rc, b2, index_of(rc, "L4.attn_residual.mb0.bwd")));
  CHECK_FALSE(waits_for(rc, b2, index_of(rc, "L3.attn_residual.mb0.bwd")));
  CHECK(b2 < index_of(rc, "L3.mlp_residual.mb0.bwd"));

  // Played: the gather starts when both its gate and the previous op on the DP stream ended
  // (the DP link is otherwise idle), so never before layer 1's forward ended.
  const sim::SimResult r = sim::simulate(s, hw::load_cluster("h100"), hw::Calibration{});
  const auto& t = r.classes[0].ops;
  const int gate = index_of(rc, "L1.mlp_residual.mb0");
  int previous = -1; // the op before g3 on its stream
  for (int i = g3 - 1; i >= 0 && previous < 0; --i)
    if (rc.ops[static_cast<std::size_t>(i)].stream == rc.ops[static_cast<std::size_t>(g3)].stream)
      previous = i;
  REQUIRE(previous >= 0);
  double ready = std::max(t[static_cast<std::size_t>(gate)].end_s,
                          t[static_cast<std::size_t>(previous)].end_s);
  for (int d : rc.ops[static_cast<std::size_t>(g3)].deps)
    ready = std::max(ready, t[static_cast<std::size_t>(d)].end_s);
  CHECK(t[static_cast<std::size_t>(g3)].start_s == test::rel(ready));
  CHECK(t[static_cast<std::size_t>(g3)].start_s >= t[static_cast<std::size_t>(gate)].end_s);
}

TEST_CASE("program timing: activation reloads wait two layers ahead in backward" *
          doctest::test_suite("plumbing")) {
  const workload::ModelSpec m = model(4);
  Plan p = plan(1, 1, 1);
  p.activation_offload = 1.0;
  strategy::complete_plan(p);
  const sim::Schedule s = lowering::lower_program(p, {&m, 64, 8});
  const sim::RankClass& rc = s.classes[0];
  // Layer 1's saved tensors come back once layer 3's backward ended (not right after their
  // offload, which would hold them in HBM through the rest of the forward).
  CHECK(waits_for(rc, index_of(rc, "L1.act_reload.mb0"), index_of(rc, "L3.attn_residual.mb0.bwd")));
}

TEST_CASE("program timing: TP collectives block the compute stream in issue order" *
          doctest::test_suite("independent")) {
  // Autograd issues a linear layer's input-gradient and weight-gradient GEMMs, then the
  // sequence-parallel reduce-scatter of the input gradient: the reduce-scatter starts once the
  // weight-gradient GEMM ended, and the norm backward after it waits for it. Played on an idle
  // TP link the reduce-scatter therefore starts exactly at the GEMM's end, and the step is at
  // least the sum of the compute ops and these blocking collectives on one chain.
  const workload::ModelSpec m = model(2);
  const sim::Schedule s = lowering::lower_program(plan(2, 1, 2), {&m, 64, 8});
  const sim::RankClass& rc = s.classes[0];
  const int wgrad = index_of(rc, "L1.qkv_proj.wgrad.mb0.bwd");
  const int rs = index_of(rc, "L1.attn_sp_scatter.mb0.bwd");
  CHECK(waits_for(rc, rs, wgrad));
  CHECK(waits_for(rc, index_of(rc, "L1.attn_norm.mb0.bwd"), rs));
  const sim::SimResult r = sim::simulate(s, hw::load_cluster("h100"), hw::Calibration{});
  const auto& t = r.classes[0].ops;
  CHECK(t[static_cast<std::size_t>(rs)].start_s ==
        test::rel(t[static_cast<std::size_t>(wgrad)].end_s));
}

TEST_CASE("program timing: a ring step's attention backward overlaps the previous gradient hop" *
          doctest::test_suite("plumbing")) {
  // Ring CP over 4 ranks: step 1's attention backward writes its own share of the block's
  // gradient, so it does not wait for step 0's gradient hop; the add that merges the arrived
  // gradient with that share does, and the next hop sends the sum.
  const workload::ModelSpec m = model(1);
  const sim::Schedule s = lowering::lower_program(plan(4, 1, 1, 4), {&m, 64, 8});
  const sim::RankClass& rc = s.classes[0];
  const std::string core = "L0.attn_core.mb0.bwd";
  const int hop0 = index_of(rc, core + ".ring_dkv.0");
  const int step1 = index_of(rc, core + ".1");
  const int add1 = index_of(rc, core + ".dk_add.1");
  CHECK_FALSE(waits_for(rc, step1, hop0));
  CHECK(waits_for(rc, add1, hop0));
  CHECK(waits_for(rc, add1, step1));
  CHECK(waits_for(rc, index_of(rc, core + ".ring_dkv.1"), add1));
}

TEST_CASE("program lowering prices a GELU MLP's up projection at its own width, its activation "
          "priced only" *
          doctest::test_suite("independent")) {
  // A non-gated MLP's up projection is hidden x intermediate (a gated one's gate|up is twice as
  // wide); the interpreter has no GELU kernel, so the activation is a priced-only op.
  workload::ModelSpec m = model(2);
  m.dense_mlp.gated = false;
  const sim::Schedule s = lowering::lower_program(plan(1, 1, 1), {&m, 64, 8});
  const double inter = static_cast<double>(m.dense_mlp.intermediate_size);
  int up = 0, wide = 0, priced_only = 0;
  for (const sim::Op& op : s.classes[0].ops) {
    if (op.layer != 0 || op.category != sim::Category::forward)
      continue;
    if (op.kind == sim::OpKind::gemm && op.name.starts_with("L0.mlp_gate_up")) {
      ++up;
      CHECK(op.gemm.n == inter);
      CHECK(op.gemm.k == static_cast<double>(m.hidden_size));
    }
    if (op.kind == sim::OpKind::gemm && op.gemm.n == 2 * inter)
      ++wide;
    if (op.kernel == sim::Kernel::none)
      ++priced_only;
  }
  CHECK(up == 1);
  CHECK(wide == 0);
  CHECK(priced_only >= 1);
}

} // namespace lowering_program_timing_test
