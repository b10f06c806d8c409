// The host side of the Schedule (docs/ENGINE.md "Host issue"): the framework's issue time per
// kernel, the kernels each op launches, and the dropless dispatcher's host sync.
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "sim/engine.hpp"
#include "strategies/hardware.hpp"
#include "strategies/lower.hpp"
#include "tests/support/approx.hpp"
#include "workload/catalog.hpp"

#include <doctest/doctest.h>
#include <string>

namespace strategies_lower_host_test {

using namespace mop;
using namespace mop::strategy;

namespace {

// tiny-moe (layer 0 dense, layer 1 MoE with 8 experts, top-2) on 8 GPUs, EP 4: two experts a
// rank.
Plan ep4_plan(const std::string& family, double capacity_factor = 0) {
  Plan p;
  p.family = family;
  p.world = 8;
  p.moe.ep = 4;
  p.moe.capacity_factor = capacity_factor;
  p.global_batch = 16;
  complete_plan(p);
  return p;
}

const sim::Op& first_op(const sim::Schedule& s, const std::string& name) {
  for (const sim::Op& op : s.classes.front().ops)
    if (op.name.find(name) != std::string::npos)
      return op;
  FAIL("no op named " << name);
  return s.classes.front().ops.front();
}

} // namespace

TEST_CASE("each family's framework: host time per kernel, kernels per op, the dispatcher's sync" *
          doctest::test_suite("plumbing")) {
  const workload::ModelSpec m = workload::load_model("tiny-moe");
  const hw::ClusterSpec c = hw::load_cluster("h100");
  const LoweringContext ctx{&m, 1024, 8, memory_hardware(c), {}};
  const sim::Schedule megatron = lower(ep4_plan("megatron"), ctx);
  // Megatron-Core's Transformer Engine modules on an x86 host: the CPU time per kernel of TE's
  // Linear and LayerNormLinear, forward and backward, BF16 and MXFP8, on Grace (TE PR #3523;
  // kernels: GEMMs 3, the MXFP8 casts of input, weight and gradient 3, the norm 1 + 2), scaled by
  // a Grace core's slowdown against a DGX H100's Xeon (TE issue #2053).
  const double grace_us = (311.30 / 3 + 440.93 / 6 + 397.73 / 6 + 518.67 / 8) / 4;
  CHECK(megatron.host_issue_s == mop::test::rel(grace_us / (37.08 / 13.48) * 1e-6, 0.02));
  // Transformer Engine before 2.10, before its CPU work: the same Linear forward on GB200 took
  // 99.66 us in August 2025 (TE issue #2053) and 59.19 us in 2026 (TE PR #3523).
  LoweringContext te29 = ctx;
  te29.transformer_engine = 209;
  CHECK(lower(ep4_plan("megatron"), te29).host_issue_s ==
        mop::test::rel(megatron.host_issue_s * 99.66 / 59.19, 1e-9));
  te29.transformer_engine = 210;
  CHECK(lower(ep4_plan("megatron"), te29).host_issue_s == megatron.host_issue_s);
  te29.transformer_engine = 109; // 1.9: older still
  CHECK(lower(ep4_plan("megatron"), te29).host_issue_s > megatron.host_issue_s);
  // Eager PyTorch: torch's Linear forward on a DGX H100 (TE issue #2053).
  CHECK(lower(ep4_plan("fsdp2"), ctx).host_issue_s == mop::test::rel(13.48e-6, 0.01));
  CHECK(lower(ep4_plan("mop"), ctx).host_issue_s == 2.7e-6);
  CHECK(lower(ep4_plan("custom"), ctx).host_issue_s == 0);
  // Transformer Engine's GroupedLinear: one GEMM per local expert; the router with its loss 31.
  CHECK(first_op(megatron, "experts_gate_up").kernels == 2);
  CHECK(first_op(megatron, "experts_down").kernels == 2);
  CHECK(first_op(megatron, "router_topk").kernels == 30);
  // Dropless: the host reads the counts before the all-to-all; a capacity factor fixes the sizes.
  CHECK(first_op(megatron, "ep_counts").host_sync);
  CHECK_FALSE(first_op(lower(ep4_plan("megatron", 1.25), ctx), "ep_counts").host_sync);
  // torchtitan's eager layer: its Python RMSNorm launches 8 kernels.
  CHECK(first_op(lower(ep4_plan("fsdp2"), ctx), "attn_norm").kernels == 8);
  CHECK(first_op(lower(ep4_plan("mop"), ctx), "attn_norm").kernels == 1);
}

TEST_CASE("the host only ever delays: a step with the host modelled is never shorter" *
          doctest::test_suite("independent")) {
  // Small micro-batches of a small model are launch-bound: the host shows; the same schedule
  // with the host unmodelled is the engine's device-only time.
  const workload::ModelSpec m = workload::load_model("tiny-moe");
  const hw::ClusterSpec c = hw::load_cluster("h100");
  const LoweringContext ctx{&m, 1024, 8, memory_hardware(c), {}};
  sim::Schedule s = lower(ep4_plan("megatron"), ctx);
  const double with_host = sim::simulate(s, c, hw::Calibration{}).step_time_s;
  const double per_kernel = s.host_issue_s;
  s.host_issue_s = 0;
  const double device_only = sim::simulate(s, c, hw::Calibration{}).step_time_s;
  CHECK(with_host > device_only);
  // Every op waits at most for the host to issue everything before it: the step is at most the
  // device-only step plus all issue time.
  double issue = 0;
  for (const sim::RankClass& rc : s.classes)
    for (const sim::Op& op : rc.ops)
      if (op.kind != sim::OpKind::barrier && op.kind != sim::OpKind::host_adam)
        issue += per_kernel * op.kernels;
  CHECK(with_host <= device_only + issue);
}

} // namespace strategies_lower_host_test
