// Least-loaded expert rebalancing in the program lowering: the ops it adds to an MoE layer (the
// count all-gather, the plan, the weight copies and their exchange, the sorted dispatch, the
// grouped GEMMs over received copies, the gradients' return), their kinds and streams, the
// reserve the copies' buffers are sized by, and the simulator playing the program.
#include "lowering/program.hpp"

#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "sim/engine.hpp"
#include "sim/schedule.hpp"
#include "strategies/plan.hpp"
#include "tests/support/errors.hpp"
#include "workload/catalog.hpp"

#include <doctest/doctest.h>
#include <string>
#include <vector>

namespace lowering_program_llep_test {

using namespace mop;
using strategy::Plan;

namespace {

Plan llep_plan(int ep, int etp) {
  Plan p;
  p.world = ep * etp;
  p.global_batch = ep * etp;
  p.micro_batch = 1;
  p.moe.ep = ep;
  p.moe.etp = etp;
  p.moe.rebalance = strategy::Rebalance::least_loaded;
  p.moe.rebalance_threshold = 1.2;
  p.moe.rebalance_capacity = 1.05;
  p.moe.rebalance_min_tokens = 16;
  p.moe.spill_copies = 3;
  strategy::complete_plan(p);
  return p;
}

const sim::Op* find(const sim::RankClass& rc, const std::string& name) {
  for (const sim::Op& op : rc.ops)
    if (op.name == name)
      return &op;
  return nullptr;
}

const sim::Tensor* tensor(const sim::RankClass& rc, const std::string& name) {
  for (const sim::Tensor& t : rc.tensors)
    if (t.name == name)
      return &t;
  return nullptr;
}

} // namespace

TEST_CASE("program lowering: a rebalancing MoE layer's ops, kinds, streams and reserves" *
          doctest::test_suite("independent")) {
  // tiny-moe: 8 experts, top-2, hidden 64, width 32; EP 4: 2 experts per rank, 64 tokens.
  const workload::ModelSpec m = workload::load_model("tiny-moe");
  const Plan p = llep_plan(4, 1);
  const sim::Schedule s = lowering::lower_program(p, {&m, 64, 8});
  sim::check_schedule(s);
  const sim::RankClass& rc = s.classes[0];
  auto stream = [&](const sim::Op& op) { return rc.streams[static_cast<std::size_t>(op.stream)]; };
  const sim::Op* counts = find(rc, "L1.llep_counts.mb0");
  REQUIRE(counts != nullptr);
  CHECK(counts->kind == sim::OpKind::all_gather);
  CHECK(counts->category == sim::Category::ep_comm);
  CHECK(s.groups[static_cast<std::size_t>(counts->group)].ranks == 4);
  const sim::Op* plan = find(rc, "L1.llep_plan.mb0");
  REQUIRE(plan != nullptr);
  CHECK(plan->kernel == sim::Kernel::llep_plan);
  CHECK(plan->kind == sim::OpKind::elementwise);
  CHECK(stream(*plan) == "compute");
  CHECK(plan->group == counts->group);
  const sim::Attrs& a = rc.attrs_of(*plan);
  CHECK(a.threshold == 1.2);
  CHECK(a.capacity == 1.05);
  CHECK(a.min_tokens == 16);
  CHECK(a.ranks_per_node == 4);
  REQUIRE(plan->outputs.size() == 5);
  // The slot tables: [ep, experts] (2 own slots and up to 6 foreign per rank); the copy tables
  // [ep, experts / ep].
  CHECK(rc.tensors[static_cast<std::size_t>(plan->outputs[1])].shape ==
        std::vector<std::int64_t>{4, 8});
  CHECK(rc.tensors[static_cast<std::size_t>(plan->outputs[3])].shape ==
        std::vector<std::int64_t>{4, 2});
  // Weight copies: one op gathers gate, up and down, one all-to-all-v each moves them.
  const sim::Op* copies = find(rc, "L1.llep_weight_copies.mb0");
  REQUIRE(copies != nullptr);
  CHECK(copies->kernel == sim::Kernel::group_copies);
  CHECK(copies->outputs.size() == 3);
  for (int i = 0; i < 3; ++i) {
    const sim::Op* x = find(rc, "L1.llep_weights" + std::to_string(i) + ".mb0");
    REQUIRE(x != nullptr);
    CHECK(x->kind == sim::OpKind::all_to_all);
    CHECK(stream(*x) == "comm.ep");
    CHECK(rc.attrs_of(*x).count_inputs == 2);
  }
  // The received copies: the plan's reserve of 3 copies of [hidden, width], sized at run time.
  const sim::Tensor* foreign = tensor(rc, "L1.llep foreign up.mb0");
  REQUIRE(foreign != nullptr);
  CHECK(foreign->shape == std::vector<std::int64_t>{3, 64, 32});
  CHECK(foreign->rows.reserve);
  CHECK(foreign->rows.counts == plan->outputs[4]);
  // The rows: sorted by slot, dispatched, back and unsorted.
  for (const char* name : {"L1.llep_sort.mb0", "L1.llep_unsort.mb0", "L1.llep_sort.mb0.bwd",
                           "L1.llep_unsort.mb0.bwd"}) {
    CAPTURE(name);
    const sim::Op* x = find(rc, name);
    REQUIRE(x != nullptr);
    CHECK(x->kernel == sim::Kernel::index_rows);
  }
  // Grouped GEMMs: the own slots priced as balanced routing, the copies' slots empty.
  const sim::Op* own = find(rc, "L1.experts_gate_up.mb0");
  const sim::Op* other = find(rc, "L1.experts_gate_up.foreign.mb0");
  REQUIRE(own != nullptr);
  REQUIRE(other != nullptr);
  CHECK(own->gemm.rows_per_expert == std::vector<double>{64, 64});
  CHECK(other->kind == sim::OpKind::grouped_gemm);
  CHECK(other->gemm.rows_per_expert.size() == 6);
  CHECK(other->model_flops == 0);
  CHECK(rc.attrs_of(*other).group_first == 2);
  CHECK(rc.attrs_of(*other).accumulate);
  for (const char* name : {"L1.experts_down.foreign.mb0", "L1.experts_down.dgrad.foreign.mb0.bwd",
                           "L1.experts_down.wgrad.foreign.mb0.bwd",
                           "L1.experts_gate_up.dgrad.foreign.mb0.bwd",
                           "L1.experts_gate_up.wgrad.foreign.mb0.bwd"}) {
    CAPTURE(name);
    CHECK(find(rc, name) != nullptr);
  }
  // The copies' gradients return and add into the owners'.
  for (int i = 0; i < 3; ++i)
    CHECK(find(rc, "L1.llep_grads" + std::to_string(i) + ".mb0.bwd") != nullptr);
  const sim::Op* add = find(rc, "L1.llep_grad_add.mb0.bwd");
  REQUIRE(add != nullptr);
  CHECK(add->kernel == sim::Kernel::group_copies_bwd);
  CHECK(rc.attrs_of(*add).accumulate);
  for (int g : add->outputs)
    CHECK(rc.tensors[static_cast<std::size_t>(g)].role == sim::TensorRole::grad);
  // Per MoE layer and micro-batch: the count all-gather, three weight and three gradient
  // exchanges, dispatch and combine both ways.
  int all_to_all = 0, all_gather = 0;
  for (const sim::Op& op : rc.ops)
    if (op.layer == 1 && op.category == sim::Category::ep_comm) {
      all_to_all += op.kind == sim::OpKind::all_to_all ? 1 : 0;
      all_gather += op.kind == sim::OpKind::all_gather ? 1 : 0;
    }
  CHECK(all_to_all == 10);
  CHECK(all_gather == 1);
}

TEST_CASE("program lowering: the simulator plays a rebalancing MoE program" *
          doctest::test_suite("plumbing")) {
  const workload::ModelSpec m = workload::load_model("tiny-moe");
  const sim::Schedule s = lowering::lower_program(llep_plan(4, 1), {&m, 64, 8});
  const sim::SimResult r = sim::simulate(s, hw::load_cluster("h100"), hw::Calibration{});
  CHECK(r.step_time_s > 0);
  CHECK(r.classes[0].memory.peak_hbm_bytes > 0);
}

TEST_CASE("program lowering: refuses rebalancing with expert tensor parallelism" *
          doctest::test_suite("plumbing")) {
  const workload::ModelSpec m = workload::load_model("tiny-moe");
  CHECK(test::input_error_of([&] {
          lowering::lower_program(llep_plan(2, 2), {&m, 64, 8});
        }) == "least-loaded expert rebalancing is not built with expert tensor parallelism "
              "(etp 2): use etp 1 or no rebalancing");
}

} // namespace lowering_program_llep_test
