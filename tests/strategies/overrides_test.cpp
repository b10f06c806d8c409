// Plan overrides (`--tp 2 --pp 4 ...`): what they set, what they keep, and how a family's
// enumeration and a preset's resolution take them.
#include "common/error.hpp"
#include "common/json_io.hpp"
#include "strategies/overrides.hpp"
#include "strategies/presets.hpp"
#include "workload/catalog.hpp"

#include <doctest/doctest.h>
#include <filesystem>
#include <fstream>
#include <unistd.h>

namespace strategies_overrides_test {

using namespace mop::strategy;
using namespace mop::workload;

namespace {

const MemoryHardware kH100{.hbm_bytes = 85e9,
                           .host_bytes = 2e12,
                           .gpus_per_node = 8,
                           .cuda_context_bytes = 1e9,
                           .nccl_bytes_per_communicator = 0.4e9,
                           .fragmentation = 0.05,
                           .host_reserved_bytes = 50e9};

PlanContext context(const ModelSpec& m, std::int64_t seq, int nodes) {
  PlanContext c;
  c.model = &m;
  c.seq = seq;
  c.cluster = ClusterShape{8, nodes};
  c.hw = kH100;
  return c;
}

// A Megatron-style plan: one TP for attention, dense MLPs and the vocabulary.
Plan megatron_plan() {
  Plan p;
  p.family = "megatron";
  p.world = 16;
  p.pp = 2;
  p.attention.tp = p.dense.tp = p.embed.tp = 4;
  return p;
}

} // namespace

TEST_CASE("overrides set what they name and keep the family's ties" *
          doctest::test_suite("independent")) {
  SUBCASE("tp moves the dense and vocabulary TP that equalled it, not one that differed") {
    Plan p = megatron_plan();
    p.embed.tp = 1; // an FSDP-style replicated vocabulary
    PlanOverrides o;
    o.tp = 2;
    apply_overrides(o, p);
    CHECK(p.attention.tp == 2);
    CHECK(p.dense.tp == 2);
    CHECK(p.embed.tp == 1);
  }
  SUBCASE("vp above one interleaves; pp 1 drops virtual stages and the split") {
    Plan p = megatron_plan();
    p.stage_layers = {17, 15};
    PlanOverrides o;
    o.vp = 2;
    apply_overrides(o, p);
    CHECK(p.vp == 2);
    CHECK(p.schedule == PipelineSchedule::interleaved_1f1b);
    CHECK(p.stage_layers.empty());
    PlanOverrides flat;
    flat.pp = 1;
    apply_overrides(flat, p);
    CHECK(p.pp == 1);
    CHECK(p.vp == 1);
    CHECK(p.schedule == PipelineSchedule::one_f_one_b);
  }
  SUBCASE("an explicit schedule wins over the one vp implies") {
    Plan p = megatron_plan();
    PlanOverrides o;
    o.vp = 2;
    o.schedule = PipelineSchedule::zero_bubble;
    apply_overrides(o, p);
    CHECK(p.schedule == PipelineSchedule::zero_bubble);
  }
  SUBCASE("zero and recompute apply to every layer kind") {
    Plan p = megatron_plan();
    PlanOverrides o;
    o.zero = 3;
    o.recompute = Recompute::selective;
    apply_overrides(o, p);
    for (int k = 0; k < kNumLayerKinds; ++k) {
      CHECK(p.state[k].zero == 3);
      CHECK(p.recompute[k] == Recompute::selective);
    }
  }
  SUBCASE("offload opt steps on the host with the family's AdamW; none brings all back") {
    Plan p = megatron_plan();
    PlanOverrides o;
    o.offload = parse_offload("grads,opt");
    apply_overrides(o, p);
    CHECK(p.grads == Placement::host);
    CHECK(p.optimizer == Placement::host);
    CHECK(p.optimizer_on_host);
    CHECK(p.torch_host_optimizer); // Megatron's optimizer offload steps with torch's AdamW
    CHECK(p.params == Placement::hbm);
    CHECK(p.activation_offload == 0);
    o.offload = parse_offload("none");
    apply_overrides(o, p);
    CHECK(p.grads == Placement::hbm);
    CHECK(p.optimizer == Placement::hbm);
    CHECK_FALSE(p.optimizer_on_host);
    CHECK(p.overlap == OptimizerOverlap::after_backward);
  }
  SUBCASE("offload act keeps the family's fraction, else offloads every checkpoint") {
    Plan p = megatron_plan();
    PlanOverrides o;
    o.offload = parse_offload("act");
    apply_overrides(o, p);
    CHECK(p.activation_offload == 1);
    p.activation_offload = 0.5;
    apply_overrides(o, p);
    CHECK(p.activation_offload == 0.5);
  }
}

TEST_CASE("offload lists and enum names parse, anything else is one sentence" *
          doctest::test_suite("plumbing")) {
  CHECK(parse_offload("none") == Offload{});
  CHECK(parse_offload("opt,params") == Offload{true, false, true, false});
  CHECK(offload_name(parse_offload("act,grads")) == "grads,act");
  CHECK_THROWS_WITH_AS(parse_offload("gpu"),
                       "--offload takes 'none' or a comma-separated list of params, grads, opt, "
                       "act (got 'gpu').",
                       mop::InputError);
  CHECK(parse_schedule("interleaved-1f1b", "--pp-schedule") == PipelineSchedule::interleaved_1f1b);
  CHECK_THROWS_WITH_AS(parse_cp_kind("star", "--cp-kind"),
                       "--cp-kind must be one of ring, ulysses, hybrid (got 'star').",
                       mop::InputError);
  PlanOverrides o;
  CHECK(describe(o).empty());
  o.tp = 2;
  o.pp = 4;
  o.offload = parse_offload("opt");
  CHECK(describe(o) == "tp 2, pp 4, offload opt");
}

TEST_CASE("a family under overrides: every plan has them, none twice, and the family's own "
          "plans that already had them are all there" *
          doctest::test_suite("independent")) {
  const ModelSpec m = load_model("llama3-8b");
  PlanContext plain = context(m, 8192, 2);
  PlanContext fixed = plain;
  fixed.overrides.tp = 2;
  fixed.overrides.pp = 2;
  fixed.overrides.zero = 1;
  for (const std::string& family : family_names()) {
    CAPTURE(family);
    const std::vector<Plan> plans = enumerate_family(family, fixed);
    REQUIRE_FALSE(plans.empty());
    for (std::size_t i = 0; i < plans.size(); ++i) {
      CHECK(plans[i].attention.tp == 2);
      CHECK(plans[i].pp == 2);
      for (const StatePolicy& s : plans[i].state)
        CHECK(s.zero == 1);
      for (std::size_t j = 0; j < i; ++j)
        CHECK_FALSE(same_plan(plans[i], plans[j]));
    }
    // The second method: filter the family's own plans by the overrides' values.
    for (const Plan& q : enumerate_family(family, plain)) {
      const bool has_them = q.attention.tp == 2 && q.pp == 2 &&
                            std::all_of(std::begin(q.state), std::end(q.state),
                                        [](const StatePolicy& s) { return s.zero == 1; });
      if (has_them)
        CHECK(std::any_of(plans.begin(), plans.end(),
                          [&](const Plan& p) { return same_plan(p, q); }));
    }
  }
}

TEST_CASE("overrides no plan can take: no plan, and the rule the first candidate broke" *
          doctest::test_suite("plumbing")) {
  const ModelSpec m = load_model("llama3-8b");
  PlanContext ctx = context(m, 4096, 1);
  ctx.overrides.tp = 3;
  std::string why;
  CHECK(enumerate_family("megatron", ctx, &why).empty());
  CHECK(why == "plan: attention tp x cp (3) must divide the 8 ranks of a pipeline stage.");
  CHECK_THROWS_WITH_AS(resolve_plan("megatron", ctx),
                       "no megatron plan for llama3-8b at 4096 tokens on 8 GPUs has tp 3: plan: "
                       "attention tp x cp (3) must divide the 8 ranks of a pipeline stage.",
                       mop::InputError);
}

TEST_CASE("a preset under overrides resolves to a plan that has them" *
          doctest::test_suite("plumbing")) {
  const ModelSpec m = load_model("qwen3-30b-a3b");
  PlanContext ctx = context(m, 4096, 1);
  ctx.overrides.ep = 4;
  ctx.overrides.recompute = Recompute::full;
  const ResolvedPlan r = resolve_plan("mop", ctx);
  CHECK(r.plan.moe.ep == 4);
  CHECK(r.plan.recompute[static_cast<int>(LayerKind::moe)] == Recompute::full);
  CHECK(r.plan.family == "mop");
}

namespace {
std::string write_plan(const std::string& name, const std::string& text) {
  const auto path =
      std::filesystem::temp_directory_path() / (std::to_string(::getpid()) + "-" + name);
  std::ofstream(path) << text;
  return path.string();
}
} // namespace

TEST_CASE("a partial plan JSON takes the cluster's world and the flags, and a stated dp must "
          "be the derived one" *
          doctest::test_suite("plumbing")) {
  const ModelSpec m = load_model("llama3-8b");
  PlanContext ctx = context(m, 4096, 2);
  const std::string partial = write_plan("partial.json", R"({"pp": 2, "attention": {"tp": 2}})");
  const ResolvedPlan r = resolve_plan(partial, ctx);
  CHECK(r.plan.world == 16);
  CHECK(r.plan.attention.dp == 4); // 16 / (2 stages x tp 2)
  ctx.overrides.tp = 4;
  CHECK(resolve_plan(partial, ctx).plan.attention.dp == 2);
  ctx.overrides = {};
  const std::string wrong =
      write_plan("wrong-dp.json", R"({"pp": 2, "attention": {"tp": 2, "dp": 8}})");
  CHECK_THROWS_WITH_AS(resolve_plan(wrong, ctx),
                       (wrong + ": attention.dp is 8, but the plan's other degrees make it 4 (it "
                                "is derived: ranks per stage / the other degrees); leave it out "
                                "or correct it.")
                           .c_str(),
                       mop::InputError);
  const std::string other_world = write_plan("world.json", R"({"world": 8})");
  CHECK_THROWS_AS(resolve_plan(other_world, ctx), mop::InputError);
  std::filesystem::remove(partial);
  std::filesystem::remove(wrong);
  std::filesystem::remove(other_world);
}

} // namespace strategies_overrides_test
