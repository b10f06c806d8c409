// The lowering: every plan's Schedule does exactly the model's arithmetic (a second method: the
// workload's FLOP accounting), and has the structure each feature promises.
#include "sim/schedule.hpp"
#include "strategies/lower.hpp"
#include "strategies/presets.hpp"
#include "tests/support/approx.hpp"
#include "workload/catalog.hpp"
#include "workload/flops.hpp"

#include <doctest/doctest.h>

namespace strategies_lower_test {

using namespace mop;
using namespace mop::strategy;

namespace {

const MemoryHardware kH200{.hbm_bytes = 150.1e9,
                           .host_bytes = 2e12,
                           .gpus_per_node = 8,
                           .cuda_context_bytes = 0.5e9,
                           .nccl_bytes_per_communicator = 0.75e9,
                           .alltoall_buffer_bytes = 3e9,
                           .fragmentation = 0.1,
                           .host_reserved_bytes = 2e11};

Plan base(int world) {
  Plan p;
  p.world = world;
  for (auto& s : p.state)
    s.zero = 3;
  return p;
}

double schedule_flops(const sim::Schedule& s) {
  double f = 0;
  for (const auto& rc : s.classes)
    for (const auto& op : rc.ops)
      f += op.model_flops * rc.multiplicity;
  return f;
}

int count(const sim::Schedule& s, sim::OpKind kind) {
  int n = 0;
  for (const auto& rc : s.classes)
    for (const auto& op : rc.ops)
      n += op.kind == kind ? 1 : 0;
  return n;
}

} // namespace

TEST_CASE("every plan feature computes exactly the model's FLOPs: 3 x forward x sequences" *
          doctest::test_suite("independent")) {
  const workload::ModelSpec m = workload::load_model("qwen3-30b-a3b");
  const std::int64_t seq = 4096;
  const double per_sequence = 3 * workload::count_flops(m, seq).model_flops_fwd;
  struct Case {
    const char* what;
    Plan plan;
  };
  std::vector<Case> cases;
  {
    Plan p = base(16);
    cases.push_back({"FSDP, 2 micro-batches", p});
  }
  {
    Plan p = base(16);
    p.attention.tp = 4;
    p.dense.tp = 4;
    p.embed.tp = 4;
    cases.push_back({"TP 4 with SP", p});
  }
  {
    Plan p = base(16);
    p.attention.cp = 4;
    cases.push_back({"ring CP 4", p});
  }
  {
    Plan p = base(16);
    p.attention.cp = 4;
    p.attention.cp_kind = CpKind::ulysses;
    cases.push_back({"Ulysses CP 4", p});
  }
  {
    Plan p = base(16);
    p.attention.cp = 16;
    p.attention.cp_kind = CpKind::hybrid;
    cases.push_back({"hybrid CP 16 (Ulysses 8 in node, ring 2)", p});
  }
  {
    Plan p = base(16);
    p.moe.ep = 8;
    p.moe.etp = 2;
    cases.push_back({"EP 8 x ETP 2", p});
  }
  {
    Plan p = base(16);
    p.pp = 4;
    p.attention.tp = 2;
    p.dense.tp = 2;
    p.embed.tp = 2;
    cases.push_back({"PP 4 1F1B with TP 2", p});
  }
  {
    Plan p = base(16);
    p.pp = 4;
    p.vp = 3;
    p.schedule = PipelineSchedule::interleaved_1f1b;
    p.attention.tp = 2;
    p.dense.tp = 2;
    p.embed.tp = 2;
    cases.push_back({"interleaved 1F1B, PP 4 x 3 chunks", p});
  }
  {
    Plan p = base(16);
    p.recompute[0] = p.recompute[1] = p.recompute[2] = Recompute::full;
    p.activation_offload = 0.5;
    p.optimizer = p.grads = Placement::host;
    p.optimizer_on_host = true;
    p.overlap = OptimizerOverlap::stream_forward;
    cases.push_back({"full recompute, offload, host optimizer (recompute is not model FLOPs)", p});
  }
  for (Case& c : cases) {
    CAPTURE(c.what);
    const int replicas = c.plan.world / c.plan.pp / (c.plan.attention.tp * c.plan.attention.cp);
    c.plan.global_batch = replicas * 2 * c.plan.pp;
    complete_plan(c.plan);
    validate_plan(c.plan, model_shape(m), seq, ClusterShape{8, 2});
    const sim::Schedule s = lower(c.plan, LoweringContext{&m, seq, 8, kH200, {}});
    CHECK(s.classes.size() == static_cast<std::size_t>(c.plan.pp));
    // The op sum and the workload count add thousands of terms in different orders: 1e-9.
    CHECK(schedule_flops(s) == mop::test::rel(per_sequence * c.plan.global_batch, 1e-9));
    // The Schedule's own total, against the workload count too (not against the sum above,
    // which is how the lowering computes it).
    CHECK(s.model_flops_per_step == mop::test::rel(per_sequence * c.plan.global_batch, 1e-9));
    CHECK(s.tokens_per_step == mop::test::rel(4096.0 * c.plan.global_batch));
  }
}

TEST_CASE("features appear as the ops they promise" * doctest::test_suite("independent")) {
  const workload::ModelSpec m = workload::load_model("qwen3-30b-a3b");
  Plan p = base(16);
  p.moe.ep = 8;
  p.attention.cp = 2;
  p.global_batch = 8;
  complete_plan(p);
  const sim::Schedule s = lower(p, LoweringContext{&m, 4096, 8, kH200, {}});
  const int layers = 48, micro = 1;
  // EP: dispatch and combine per MoE layer, forward and backward, and the per-expert count
  // exchange before the forward dispatch (backward reuses the counts): 2 + 2 + 1.
  CHECK(count(s, sim::OpKind::all_to_all) == 5 * layers * micro);
  // ZeRO-3: one gather per kind with parameters, forward and backward (attention, dense; the
  // experts' shards over edp = 2 as well); the embedding table before the lookup, and the final
  // norm with the LM head (one bucket without vocabulary parallelism) before the head's forward
  // and again before its backward: 3 more per micro-batch.
  CHECK(count(s, sim::OpKind::all_gather) == 2 * 3 * layers * micro + 3 * micro);
  // Ring CP of degree 2 per layer: forward, one K/V hop (cp - 1); backward, one K/V hop again
  // and two dK/dV hops (cp: the gradients of the block a rank holds after the last step travel
  // one more hop home): 1 + 1 + 2.
  CHECK(count(s, sim::OpKind::send_recv) == 4 * layers * micro);
}

TEST_CASE("FSDP2 in a pipeline gathers a stage's layers once per step and reduces their "
          "gradients once, as torch's pipelining runs it" *
          doctest::test_suite("independent")) {
  // Llama-3-8B's 32 layers over 2 stages of 4 ranks (ZeRO-3 over dp 4), 8 micro-batches per
  // step. Without a pipeline FSDP2 gathers each layer's bucket in forward and again in backward
  // and reduce-scatters it every micro-batch; torchtitan turns reshard_after_forward off under
  // PP and pipelining's stage turns reshard_after_backward and gradient sync off but for the
  // last backward: one gather and one reduce-scatter per layer bucket and step. A stage of 16
  // dense layers has two buckets per layer (attention, dense MLP).
  const workload::ModelSpec m = workload::load_model("llama3-8b");
  auto collectives = [&](int pp, const char* what, sim::OpKind kind) {
    Plan p = base(8);
    p.pp = pp;
    p.global_batch = 8 * 8 / pp; // 8 micro-batches of one sequence per replica
    complete_plan(p);
    REQUIRE(p.micro_batches() == 8);
    const sim::Schedule s = lower(p, LoweringContext{&m, 4096, 8, kH200, {}});
    int n = 0;
    for (const sim::Op& op : s.classes[0].ops)
      n += op.kind == kind && op.layer >= 0 && op.name.find(what) != std::string::npos ? 1 : 0;
    return n;
  };
  const int micro = 8;
  // One stage: 32 layers, per micro-batch a forward and a backward gather, one reduce-scatter.
  CHECK(collectives(1, "fsdp_gather", sim::OpKind::all_gather) == 2 * 2 * 32 * micro);
  CHECK(collectives(1, "grad_reduce", sim::OpKind::reduce_scatter) == 2 * 32 * micro);
  // Stage 0 of two: 16 layers, once per step.
  CHECK(collectives(2, "fsdp_gather", sim::OpKind::all_gather) == 2 * 16);
  CHECK(collectives(2, "grad_reduce", sim::OpKind::reduce_scatter) == 2 * 16);
  // The analytic tier's data-parallel stream counts the same collectives as the Schedule's
  // data-parallel stream, stage by stage, with and without the pipeline.
  for (int pp : {1, 2}) {
    CAPTURE(pp);
    Plan p = base(8);
    p.pp = pp;
    p.global_batch = 8 * 8 / pp;
    complete_plan(p);
    const LoweringContext ctx{&m, 4096, 8, kH200, {}};
    const sim::Schedule s = lower(p, ctx);
    const PassModel pm = pass_model(p, ctx);
    REQUIRE(pm.stages.size() == s.classes.size());
    for (std::size_t k = 0; k < s.classes.size(); ++k)
      for (sim::OpKind kind : {sim::OpKind::all_gather, sim::OpKind::reduce_scatter}) {
        double counted = 0;
        for (const auto& [op, n] : pm.stages[k].dp_ops)
          counted += op.kind == kind ? n : 0;
        int lowered = 0;
        for (const sim::Op& op : s.classes[k].ops)
          lowered += op.kind == kind && op.category == sim::Category::dp_comm ? 1 : 0;
        CHECK(counted == lowered);
      }
  }
}

TEST_CASE("sliding-window layers under ring CP exchange a halo and keep the model's FLOPs" *
          doctest::test_suite("independent")) {
  // gpt-oss: every other layer attends to 128 tokens. With ring CP of 4 over 8192 tokens, each
  // rank's chunk (2048) is longer than the window: one halo exchange per windowed layer instead
  // of a ring, and the FLOPs still add up to the model's.
  const workload::ModelSpec m = workload::load_model("gpt-oss-20b");
  Plan p = base(8);
  p.attention.cp = 4;
  p.global_batch = 2;
  complete_plan(p);
  const sim::Schedule s = lower(p, LoweringContext{&m, 8192, 8, kH200, {}});
  CHECK(schedule_flops(s) ==
        mop::test::rel(3 * workload::count_flops(m, 8192).model_flops_fwd * 2, 1e-9));
  int halos = 0;
  for (const auto& op : s.classes[0].ops)
    halos += op.name.find("window_halo") != std::string::npos ? 1 : 0;
  // 12 windowed layers, forward and backward, one micro-batch.
  CHECK(halos == 12 * 2);
}

} // namespace strategies_lower_test
