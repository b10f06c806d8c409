#include "common/error.hpp"
#include "strategies/plan.hpp"

#include "tests/support/errors.hpp"

#include <doctest/doctest.h>

namespace strategies_plan_test {

using namespace mop::strategy;
using mop::Json;

namespace {
const ModelShape kKimi{.num_layers = 61,
                       .num_heads = 64,
                       .num_kv_heads = 64,
                       .num_routed_experts = 384,
                       .vocab_size = 163840};
const ClusterShape kTwelveNodes{.gpus_per_node = 8, .nodes = 12};
} // namespace

TEST_CASE("data-parallel degrees are what is left of each layer kind's mapping" *
          doctest::test_suite("independent")) {
  Plan p;
  p.world = 96;
  p.attention.cp = 8;
  p.attention.cp_kind = CpKind::hybrid;
  p.moe.ep = 96;
  p.global_batch = 12;
  complete_plan(p);
  CHECK(p.attention.dp == 12);
  CHECK(p.moe.edp == 1);
  CHECK(p.dense.dp == 96);
  CHECK(p.micro_batches() == 1);
  validate_plan(p, kKimi, 1 << 20, kTwelveNodes);
  CHECK(summary(p).starts_with("attn[cp8h dp12] moe[ep96] zero1 pp1 mb1"));
  // Kinds whose ZeRO stage or HSDP group differ from the attention's are named.
  p.state[static_cast<int>(LayerKind::attention)] = StatePolicy{3, 0};
  p.state[static_cast<int>(LayerKind::dense)] = StatePolicy{3, 8};
  p.state[static_cast<int>(LayerKind::embedding)] = StatePolicy{3, 0};
  CHECK(summary(p).find(" zero3,moe=1,dense=3/8 pp1") != std::string::npos);
}

TEST_CASE("each broken rule is one sentence" * doctest::test_suite("plumbing")) {
  Plan p;
  p.world = 96;
  p.attention.tp = 5;
  p.global_batch = 96;
  CHECK(mop::test::input_error_of([&] { complete_plan(p); }) ==
        "plan: attention tp x cp (5) must divide the 96 ranks of a pipeline stage.");
  p.attention.tp = 1;
  p.moe.ep = 96;
  p.global_batch = 96;
  complete_plan(p);
  Plan r = p;
  r.moe.ep = 32;
  complete_plan(r);
  ModelShape odd = kKimi;
  odd.num_routed_experts = 100;
  CHECK(mop::test::input_error_of([&] { validate_plan(r, odd, 4096, kTwelveNodes); }) ==
        "plan: ep (32) must divide the 100 routed experts.");
  Plan ring = p;
  ring.attention.cp = 8;
  complete_plan(ring);
  CHECK(mop::test::input_error_of([&] { validate_plan(ring, kKimi, 4104, kTwelveNodes); }) ==
        "plan: the sequence (4104 tokens) must split into 16 equal chunks for ring context "
        "parallelism of degree 8.");
  Plan pp = p;
  pp.pp = 96;
  pp.moe.ep = 1;
  pp.global_batch = 96;
  complete_plan(pp);
  CHECK(mop::test::input_error_of([&] { validate_plan(pp, kKimi, 4096, kTwelveNodes); }) ==
        "plan: pp x vp (96 x 1) exceeds the 61 layers (plus embedding and loss).");
}

TEST_CASE("a plan survives a JSON round trip" * doctest::test_suite("plumbing")) {
  Plan p;
  p.family = "mop";
  p.world = 96;
  p.attention.cp = 8;
  p.attention.cp_kind = CpKind::ulysses;
  p.moe.ep = 96;
  p.global_batch = 24;
  p.recompute[0] = Recompute::full;
  p.activation_offload = 0.5;
  p.optimizer = Placement::host;
  p.optimizer_on_host = true;
  p.overlap = OptimizerOverlap::stream_forward;
  p.state[2].shard_group = 8;
  complete_plan(p);
  Plan q = plan_from_json(to_json(p), "plan.json");
  complete_plan(q);
  CHECK(to_json(q) == to_json(p));
}

TEST_CASE("plan JSON: numbers past an int or past the GPU ceiling are refused, not truncated" *
          doctest::test_suite("plumbing")) {
  // 4294967304 = 2^32 + 8 ran as 8 ranks.
  Json j = Json::parse(R"({"world": 4294967304})");
  CHECK(mop::test::input_error_of([&] { plan_from_json(j, "p.json"); }) ==
        "p.json: field 'world' must be an integer from 1 to 1048576 (got 4294967304).");
  j = Json::parse(R"({"world": 8, "attention": {"tp": 4294967298}})");
  CHECK(mop::test::input_error_of([&] { plan_from_json(j, "p.json"); }) ==
        "p.json attention: field 'tp' must be an integer from 1 to 1048576 (got 4294967298).");
  j = Json::parse(R"({"world": 8, "stage_layers": [4294967297]})");
  CHECK(mop::test::input_error_of([&] { plan_from_json(j, "p.json"); }) ==
        "p.json: field 'stage_layers' must be a list of layer counts from 1 to 1024, one per "
        "pipeline stage (got [4294967297]).");
  j = Json::parse(R"({"world": 8, "state": {"moe": {"zero": 4}}})");
  CHECK(mop::test::input_error_of([&] { plan_from_json(j, "p.json"); }) ==
        "p.json state.moe: field 'zero' must be an integer from 0 to 3 (got 4).");
  j = Json::parse(R"({"world": 8, "global_batch": 16777217})");
  CHECK(mop::test::input_error_of([&] { plan_from_json(j, "p.json"); }) ==
        "p.json: field 'global_batch' must be an integer from 0 to 16777216 (got 16777217).");
}

TEST_CASE("plan JSON: an unknown key is named, at every level" * doctest::test_suite("plumbing")) {
  Json j = Json::parse(R"({"world": 8, "micro_batches": 2})");
  CHECK(mop::test::input_error_of([&] {
          plan_from_json(j, "p.json");
        }).starts_with("p.json: field 'micro_batches' is not known; allowed: family, summary, "));
  j = Json::parse(R"({"world": 8, "attention": {"tp": 2, "ccp": 2}})");
  CHECK(mop::test::input_error_of([&] { plan_from_json(j, "p.json"); }) ==
        "p.json attention: field 'ccp' is not known; allowed: tp, sp, cp, cp_kind, dp.");
  j = Json::parse(R"({"world": 8, "state": {"experts": {"zero": 3}}})");
  CHECK(mop::test::input_error_of([&] { plan_from_json(j, "p.json"); }) ==
        "p.json state: field 'experts' is not known; allowed: attention, moe, dense, embedding.");
  j = Json::parse(R"({"world": 8, "state": {"moe": {"zero": 3, "shard": 8}}})");
  CHECK(mop::test::input_error_of([&] { plan_from_json(j, "p.json"); }) ==
        "p.json state.moe: field 'shard' is not known; allowed: zero, shard_group.");
}

TEST_CASE("degrees whose product passes an int are a sentence, not a wrapped product" *
          doctest::test_suite("plumbing")) {
  // tp = cp = 2^16 on 2^20 ranks: tp·cp = 2^32 wrapped to 0 in int arithmetic.
  Plan p;
  p.world = 1 << 20;
  p.attention.tp = 1 << 16;
  p.attention.cp = 1 << 16;
  p.global_batch = 1;
  CHECK(mop::test::input_error_of([&] { complete_plan(p); }) ==
        "plan: attention tp x cp (4294967296) must divide "
        "the 1048576 ranks of a pipeline stage.");
  p = Plan{};
  p.world = 1 << 20;
  p.micro_batch = 1 << 16;
  p.global_batch = 1 << 16;
  p.moe.ep = 1;
  // 2^20 replicas x micro-batches of 2^16 sequences: 2^36 per step, more than the batch.
  CHECK(mop::test::input_error_of([&] { complete_plan(p); }) ==
        "plan: the global batch (65536 sequences) must be a multiple of micro_batch (65536) x "
        "data-parallel replicas (1048576).");
}

} // namespace strategies_plan_test
