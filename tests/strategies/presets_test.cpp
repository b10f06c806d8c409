#include "common/error.hpp"
#include "strategies/mesh.hpp"
#include "strategies/presets.hpp"
#include "workload/catalog.hpp"
#include "workload/params.hpp"

#include <algorithm>
#include <doctest/doctest.h>
#include <map>
#include <set>
#include <unordered_map>

namespace strategies_presets_test {

using namespace mop::strategy;
using namespace mop::workload;

namespace {
// H200 figures as CUDA reports them (hardware.md §1.1): 139.8 GiB; 2 TB host per node.
const MemoryHardware kH200{.hbm_bytes = 150.1e9,
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
  c.hw = kH200;
  return c;
}
} // namespace

TEST_CASE("the default batch is at least 4M tokens and a multiple of replicas x micro-batch" *
          doctest::test_suite("independent")) {
  CHECK(default_global_batch(4096, 8) == 1024);   // 2^22 / 4096 = 1024, a multiple of 8
  CHECK(default_global_batch(4096, 96) == 1056);  // 1024 rounded up to 11 x 96
  CHECK(default_global_batch(1 << 20, 1) == 4);   // 4 sequences of 1M tokens
  CHECK(default_global_batch(1 << 20, 12) == 12); // one per replica at least
}

TEST_CASE("a default batch past the ceiling is a sentence, not a wrapped int" *
          doctest::test_suite("plumbing")) {
  // 2^20 replicas x micro-batches of 2^16: one sequence each is 2^36 sequences a step.
  CHECK_THROWS_WITH_AS(default_global_batch(4096, std::int64_t{1} << 36),
                       "the default global batch, 68719476736 sequences (a multiple of "
                       "data-parallel replicas x micro-batch, 68719476736), is above mop's "
                       "ceiling of 16777216.",
                       mop::InputError);
  CHECK(default_global_batch(1, std::int64_t{1} << 24) == 1 << 24); // at the ceiling: accepted
}

TEST_CASE("every family has valid plans for every catalog model on a node it can fit" *
          doctest::test_suite("plumbing")) {
  for (const std::string& id : catalog_ids()) {
    const ModelSpec m = load_model(id);
    for (const std::string& family : family_names()) {
      CAPTURE(id);
      CAPTURE(family);
      const std::vector<Plan> plans = enumerate_family(family, context(m, 4096, 2));
      CHECK_FALSE(plans.empty());
      for (const Plan& p : plans) // each candidate obeys the rules it was enumerated under
        CHECK(p.world == 16);
    }
  }
}

TEST_CASE("a resolved preset re-used as a plan file gives the same memory" *
          doctest::test_suite("plumbing")) {
  const ModelSpec m = load_model("llama3-8b");
  const PlanContext ctx = context(m, 8192, 1);
  const ResolvedPlan r = resolve_plan("fsdp2", ctx);
  REQUIRE(r.memory.fits());
  Plan again = plan_from_json(to_json(r.plan), "plan.json");
  complete_plan(again);
  CHECK(analyze_memory(m, again, 8192, kH200).peak_hbm_bytes == r.memory.peak_hbm_bytes);
}

TEST_CASE("Kimi-K2 states cannot live in 96 HBMs: every fitting plan puts the optimizer on host" *
          doctest::test_suite("independent")) {
  // Worked example: 16 bytes per parameter (BF16 weights + FP32 grads... here 2 + 12) x 1.03T
  // over 96 GPUs is 128 GB of 150 GB for the optimizer and weights alone.
  const ModelSpec m = load_model("kimi-k2");
  const double n = static_cast<double>(count_params(m).total.total());
  CHECK((2 + 12) * n / 96 > 0.9 * kH200.hbm_bytes);
  for (const char* family : {"megatron", "mop"}) {
    const ResolvedPlan r = resolve_plan(family, context(m, 65536, 12));
    CAPTURE(family);
    REQUIRE(r.memory.fits());
    CHECK(r.plan.optimizer == Placement::host);
  }
}

TEST_CASE("an unknown preset is one sentence listing the presets" *
          doctest::test_suite("plumbing")) {
  const ModelSpec m = load_model("tiny-moe");
  try {
    resolve_plan("zero-infinity", context(m, 4096, 1));
    FAIL("accepted");
  } catch (const mop::InputError& e) {
    CHECK(std::string(e.what()) == "'zero-infinity' is neither a preset (fsdp2, megatron, "
                                   "ulysses-zero3, mop) nor a plan JSON path.");
  }
}

TEST_CASE(
    "every preset answers for every catalog model, naming what runs out when it does not fit" *
    doctest::test_suite("plumbing")) {
  for (const std::string& id : catalog_ids()) {
    const ModelSpec m = load_model(id);
    for (const std::string& family : family_names()) {
      CAPTURE(id);
      CAPTURE(family);
      const ResolvedPlan r = resolve_plan(family, context(m, 8192, 2));
      REQUIRE_FALSE(r.memory.classes.empty());
      CHECK(r.memory.peak_hbm_bytes > 0);
      CHECK(r.memory.fits() == r.memory.first_to_run_out.empty());
    }
  }
}

TEST_CASE("plans deduplicate by their fields as by their JSON, whatever the family" *
          doctest::test_suite("independent")) {
  // Second method: a plan's JSON without its family names every field.
  const ModelSpec m = load_model("qwen3-30b-a3b");
  PlanContext ctx;
  ctx.model = &m;
  ctx.seq = 4096;
  ctx.cluster = ClusterShape{8, 2};
  ctx.global_batch = 64;
  std::vector<Plan> plans;
  for (const std::string& f : family_names())
    for (Plan& p : enumerate_family(f, ctx))
      plans.push_back(std::move(p));
  REQUIRE(plans.size() > 1000);
  // Every tenth plan once more under another family's name: the same plan from two families.
  for (std::size_t i = 0, n = plans.size(); i < n; i += 10) {
    Plan again = plans[i];
    again.family = "custom";
    plans.push_back(std::move(again));
  }
  std::map<std::string, std::size_t> by_json;
  std::unordered_map<std::size_t, std::vector<std::size_t>> by_hash;
  std::size_t distinct = 0;
  for (std::size_t i = 0; i < plans.size(); ++i) {
    mop::Json j = to_json(plans[i]);
    j.erase("family");
    const auto [it, fresh] = by_json.emplace(j.dump(), i);
    std::vector<std::size_t>& bucket = by_hash[plan_hash(plans[i])];
    const auto same = std::find_if(bucket.begin(), bucket.end(),
                                   [&](std::size_t k) { return same_plan(plans[k], plans[i]); });
    CHECK((same == bucket.end()) == fresh);
    if (same == bucket.end()) {
      bucket.push_back(i);
      ++distinct;
    } else {
      CHECK(*same == it->second);
    }
  }
  CHECK(distinct == by_json.size());
  CHECK(distinct < plans.size()); // the repeated plans were found
  // Each field counts: change one and the plan differs.
  Plan a = plans.front(), b = a;
  b.activation_offload += 0.25;
  CHECK_FALSE(same_plan(a, b));
  b = a;
  b.stage_layers = {1};
  CHECK_FALSE(same_plan(a, b));
  b = a;
  b.family = "other";
  CHECK(same_plan(a, b));
  CHECK(plan_hash(a) == plan_hash(b));
}

TEST_CASE("a dense model's megatron plans differ in more than their expert settings" *
          doctest::test_suite("plumbing")) {
  // A dense model has no experts: plans that differ only in the MoE mapping would train the same
  // model the same way and be simulated twice.
  const ModelSpec m = load_model("llama3-8b");
  std::vector<Plan> plans = enumerate_family("megatron", context(m, 8192, 2));
  REQUIRE(plans.size() > 100);
  std::vector<Plan> without_moe = plans;
  for (Plan& p : without_moe)
    p.moe = MoeMapping{};
  for (std::size_t i = 0; i < without_moe.size(); ++i)
    for (std::size_t j = i + 1; j < without_moe.size(); ++j)
      if (same_plan(without_moe[i], without_moe[j]))
        FAIL_CHECK(summary(plans[i]) << " and " << summary(plans[j]) << " repeat one plan");
}

TEST_CASE("megatron splits a pipeline evenly or with a layer off the first, the last or both "
          "stages" *
          doctest::test_suite("independent")) {
  // By hand, Llama-3-8B's 32 layers over 4 stages: an even share is 8; a lighter end stage holds
  // 7 and the others share the rest, the earlier ones taking the remainder: 7,9,8,8; 9,8,8,7;
  // 7,9,9,7 (--decoder-first/last-pipeline-num-layers 7).
  const ModelSpec m = load_model("llama3-8b");
  std::set<std::vector<int>> splits;
  for (const Plan& p : enumerate_family("megatron", context(m, 8192, 2)))
    if (p.pp == 4 && p.vp == 1)
      splits.insert(p.stage_layers);
  CHECK(splits == std::set<std::vector<int>>{{}, {7, 9, 8, 8}, {9, 8, 8, 7}, {7, 9, 9, 7}});
}

TEST_CASE("the mop family's hybrid CP has a Ulysses part and a ring part" *
          doctest::test_suite("plumbing")) {
  // Hybrid CP with one of its parts a single rank is plain ring or Ulysses CP, a plan the family
  // already holds. Kimi-K2's CP degrees on 96 GPUs divide its 64 heads and its 65,536-token
  // sequence in 2·cp chunks: 2, 4, 8, 16, 32. On 8-GPU nodes 2, 4 and 8 are all Ulysses (not
  // hybrid); 16 (Ulysses 8 x ring 2) and 32 (8 x 4) are.
  const ModelSpec m = load_model("kimi-k2");
  std::set<int> hybrid;
  for (const Plan& p : enumerate_family("mop", context(m, 65536, 12)))
    if (p.attention.cp_kind == CpKind::hybrid) {
      const CpSplit split = cp_split(p, 8);
      CHECK(split.ulysses > 1);
      CHECK(split.ring > 1);
      hybrid.insert(p.attention.cp);
    }
  CHECK(hybrid == std::set<int>{16, 32});
}

} // namespace strategies_presets_test
