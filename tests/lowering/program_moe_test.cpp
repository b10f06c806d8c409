// What the simulator charges for an MoE layer of the executable program, by hand, and against
// the cost-only lowering (strategies/lower.cpp) that prices the same plan.
#include "lowering/program.hpp"

#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "sim/engine.hpp"
#include "sim/schedule.hpp"
#include "strategies/lower.hpp"
#include "strategies/plan.hpp"
#include "tests/support/approx.hpp"
#include "tests/support/errors.hpp"
#include "workload/catalog.hpp"

#include <doctest/doctest.h>
#include <string>
#include <vector>

namespace lowering_program_moe_test {

using namespace mop;
using strategy::Plan;

namespace {

Plan ep2_etp2() {
  Plan p;
  p.world = 4;
  p.global_batch = 4;
  p.micro_batch = 1;
  p.moe.ep = 2;
  p.moe.etp = 2;
  strategy::complete_plan(p);
  return p;
}

const sim::Op& find(const sim::Schedule& s, const std::string& name) {
  for (const sim::Op& op : s.classes[0].ops)
    if (op.name == name)
      return op;
  FAIL("no op " << name);
  return s.classes[0].ops[0];
}

} // namespace

TEST_CASE("program lowering: an MoE layer's router, dispatch and grouped GEMMs by hand, as the "
          "cost-only lowering prices them" *
          doctest::test_suite("independent")) {
  // tiny-moe (configs/models/tiny-moe.json): hidden 64, 8 experts, top-2, expert width 32;
  // layer 1 is MoE. World 4 as EP 2 x ETP 2 (attention: DP 4), one sequence of 64 tokens per
  // micro-batch per rank: 64 rows enter the block on each rank, 64 x 2 = 128 (token, slot) rows
  // are routed. Balanced routing: each rank receives 128 rows for its 8 / 2 = 4 experts, 256
  // after the ETP gather of its pair, 64 per expert; each expert's width is 32 / 2 = 16 here.
  const workload::ModelSpec m = workload::load_model("tiny-moe");
  const Plan p = ep2_etp2();
  const sim::Schedule prog = lowering::lower_program(p, {&m, 64, 8});
  sim::check_schedule(prog);
  strategy::LoweringContext ctx;
  ctx.model = &m;
  ctx.seq = 64;
  ctx.gpus_per_node = 8;
  const sim::Schedule old = strategy::lower(p, ctx);

  struct Want {
    const char* name;
    sim::OpKind kind;
    double m = 0, n = 0, k = 0; // GEMMs
    double bytes = 0;           // collectives
  };
  const double h = 64, e = 8, rows = 64, routed = 128, width = 16;
  const std::vector<Want> wants = {
      {"L1.router.mb0", sim::OpKind::gemm, rows, e, h, 0},
      // One int64 per expert of the model (Megatron-Core's count exchange).
      {"L1.ep_counts.mb0", sim::OpKind::all_to_all, 0, 0, 0, 8 * e},
      // BF16 rows of the hidden size.
      {"L1.ep_dispatch.mb0", sim::OpKind::all_to_all, 0, 0, 0, 2 * routed * h},
      // The pair's [ep x experts / ep] tables, gathered: 2 x 8 int64.
      {"L1.etp_counts.mb0", sim::OpKind::all_gather, 0, 0, 0, 8 * e * 2},
      {"L1.etp_gather.mb0", sim::OpKind::all_gather, 0, 0, 0, 2 * 2 * routed * h},
      {"L1.experts_gate_up.mb0", sim::OpKind::grouped_gemm, 2 * routed, 2 * width, h, 0},
      {"L1.experts_down.mb0", sim::OpKind::grouped_gemm, 2 * routed, h, width, 0},
      {"L1.etp_scatter.mb0", sim::OpKind::reduce_scatter, 0, 0, 0, 2 * 2 * routed * h},
      {"L1.ep_combine.mb0", sim::OpKind::all_to_all, 0, 0, 0, 2 * routed * h},
  };
  for (const Want& w : wants) {
    CAPTURE(w.name);
    for (const sim::Schedule* s : {&prog, &old}) {
      CAPTURE(s == &prog);
      const sim::Op& op = find(*s, w.name);
      CHECK(op.kind == w.kind);
      if (w.kind == sim::OpKind::gemm) {
        CHECK(op.gemm.m == w.m);
        CHECK(op.gemm.n == w.n);
        CHECK(op.gemm.k == w.k);
      } else if (w.kind == sim::OpKind::grouped_gemm) {
        CHECK(op.gemm.rows_per_expert == std::vector<double>(4, w.m / 4));
        CHECK(op.gemm.n == w.n);
        CHECK(op.gemm.k == w.k);
        CHECK(op.model_flops == test::rel(2 * w.m * w.n * w.k));
      } else {
        CHECK(op.bytes == w.bytes);
        CHECK(prog.groups[static_cast<std::size_t>(op.group)].ranks == 2);
      }
    }
  }
  // The backward: the down projection's data gradient multiplies [256 x 64] by the experts'
  // [64 x 16] transposed; its weight gradient sums 64 rows per expert into [16 x 64].
  const sim::Op& dgrad = find(prog, "L1.experts_down.dgrad.mb0.bwd");
  CHECK(dgrad.kind == sim::OpKind::grouped_gemm);
  CHECK(dgrad.gemm.n == width);
  CHECK(dgrad.gemm.k == h);
  const sim::Op& wgrad = find(prog, "L1.experts_down.wgrad.mb0.bwd");
  CHECK(wgrad.gemm.rows_per_expert == std::vector<double>(4, 64));
  CHECK(wgrad.model_flops == test::rel(2 * 2 * routed * width * h));
}

TEST_CASE("program lowering: routed rows are runtime rows, reserved with the plan's imbalance" *
          doctest::test_suite("independent")) {
  const workload::ModelSpec m = workload::load_model("tiny-moe");
  Plan p = ep2_etp2();
  p.moe.imbalance = 1.5;
  const sim::Schedule s = lowering::lower_program(p, {&m, 64, 8});
  sim::check_schedule(s);
  const sim::RankClass& rc = s.classes[0];
  auto tensor = [&](const std::string& name) -> const sim::Tensor& {
    for (const sim::Tensor& t : rc.tensors)
      if (t.name == name)
        return t;
    FAIL("no tensor " << name);
    return rc.tensors[0];
  };
  // Dispatched rows: 128 expected (as above), sized by the exchanged counts [ep 2 x 4 experts];
  // the buffer reserved is 1.5 x 128 rows x 64 x 2 bytes.
  const sim::Tensor& recv = tensor("L1.dispatched.mb0");
  CHECK(recv.shape == std::vector<std::int64_t>{128, 64});
  CHECK(recv.bytes == test::rel(1.5 * 128 * 64 * 2));
  CHECK_FALSE(recv.rows.padded);
  const sim::Tensor& counts = rc.tensors[static_cast<std::size_t>(recv.rows.counts)];
  CHECK(counts.shape == std::vector<std::int64_t>{2, 4});
  CHECK(counts.element == sim::Element::i64);
  // After the ETP gather: the pair's rows, each member's padded to the larger count.
  const sim::Tensor& gathered = tensor("L1.etp gathered.mb0");
  CHECK(gathered.shape == std::vector<std::int64_t>{256, 64});
  CHECK(gathered.rows.padded);
  CHECK(rc.tensors[static_cast<std::size_t>(gathered.rows.counts)].shape ==
        std::vector<std::int64_t>{2, 2, 4});
  // The send side is static: every token's two copies.
  CHECK(tensor("L1.permuted.mb0").rows.counts == -1);
}

TEST_CASE("program lowering: refuses MoE plans it cannot split" * doctest::test_suite("plumbing")) {
  const workload::ModelSpec m = workload::load_model("tiny-moe");
  Plan p;
  p.world = 3;
  p.global_batch = 3;
  p.moe.ep = 3;
  strategy::complete_plan(p);
  CHECK(test::input_error_of([&] {
          lowering::lower_program(p, {&m, 64, 8});
        }) == "ep 3 must divide the 8 experts and etp 1 their width 32");
}

TEST_CASE("program lowering: the simulator plays an MoE program with expert parallelism" *
          doctest::test_suite("plumbing")) {
  const workload::ModelSpec m = workload::load_model("tiny-moe");
  const sim::Schedule s = lowering::lower_program(ep2_etp2(), {&m, 64, 8});
  const sim::SimResult r = sim::simulate(s, hw::load_cluster("h100"), hw::Calibration{});
  CHECK(r.step_time_s > 0);
  CHECK(r.classes[0].memory.peak_hbm_bytes > 0);
}

} // namespace lowering_program_moe_test
