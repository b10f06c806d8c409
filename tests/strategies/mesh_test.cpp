#include "strategies/mesh.hpp"

#include "tests/support/errors.hpp"

#include <doctest/doctest.h>

namespace strategies_mesh_test {

using namespace mop::strategy;

namespace {
const ModelShape kKimi{.num_layers = 61,
                       .num_heads = 64,
                       .num_kv_heads = 64,
                       .num_routed_experts = 384,
                       .vocab_size = 163840};
const ClusterShape kTwelveNodes{.gpus_per_node = 8, .nodes = 12};

Plan kimi_plan() {
  Plan p;
  p.world = 96;
  p.pp = 2;
  p.attention.tp = 2;
  p.attention.cp = 4;
  p.attention.cp_kind = CpKind::hybrid;
  p.moe.ep = 8;
  p.moe.etp = 2;
  p.global_batch = 12;
  complete_plan(p);
  return p;
}
} // namespace

TEST_CASE("plan mesh: hybrid CP puts Ulysses on the node, the ring across nodes" *
          doctest::test_suite("independent")) {
  // 48 ranks per stage: tp 2 x cp 4 x dp 6. Hybrid CP: Ulysses over the CP ranks on a node of
  // 8 GPUs, gcd(4, 8 / 2) = 4, so no ring at all; with cp 8 it is gcd(8, 4) = 4 Ulysses x 2 ring.
  Plan p = kimi_plan();
  CHECK(cp_split(p, 8).ulysses == 4);
  CHECK(cp_split(p, 8).ring == 1);
  p.attention.cp = 8;
  complete_plan(p);
  CHECK(cp_split(p, 8).ulysses == 4);
  CHECK(cp_split(p, 8).ring == 2);
  const mop::sim::Mesh m = plan_mesh(p, 8);
  const mop::sim::MeshView& a = m.view("attention");
  CHECK(a.size() == 96);
  // Rank 50 = stage 1 (48 ranks each), local 2: tp 0, Ulysses 1, ring 0, dp 0.
  CHECK(a.coord(50, "pp") == 1);
  CHECK(a.coord(50, "cp.ulysses") == 1);
  // Its ring partner is 8 ranks away (tp 2 x Ulysses 4): on the next node.
  CHECK(a.members(50, cp_ring_group()) == std::vector<int>{50, 58});
  CHECK(a.ranks_per_node(cp_ring_group(), 8) == 1);
  CHECK(a.ranks_per_node(cp_ulysses_group(), 8) == 4);
}

TEST_CASE("plan mesh: experts fold over the same ranks as etp, ep, edp" *
          doctest::test_suite("independent")) {
  const Plan p = kimi_plan(); // 48 ranks per stage: etp 2 x ep 8 x edp 3
  const mop::sim::Mesh mesh = plan_mesh(p, 8);
  const mop::sim::MeshView& m = mesh.view("moe");
  CHECK(m.members(5, etp_group()) == std::vector<int>{4, 5});
  CHECK(m.members(5, ep_group()) == std::vector<int>{1, 3, 5, 7, 9, 11, 13, 15});
  CHECK(m.members(5, data_parallel_group(LayerKind::moe)) == std::vector<int>{5, 21, 37});
  CHECK(m.ranks_per_node(ep_group(), 8) == 4);
}

TEST_CASE("plan mesh: HSDP shard groups must tile the data-parallel ranks" *
          doctest::test_suite("plumbing")) {
  Plan p = kimi_plan(); // attention: cp 4 x dp 6 = 24 data-parallel ranks per stage
  p.state[static_cast<int>(LayerKind::attention)].shard_group = 8;
  CHECK(shard_group(p, LayerKind::attention).block == 8);
  CHECK(replica_group(p, LayerKind::attention).across_blocks);
  CHECK_NOTHROW(validate_plan(p, kKimi, 4096, kTwelveNodes));
  p.state[static_cast<int>(LayerKind::attention)].shard_group = 16;
  CHECK(mop::test::input_error_of([&] { validate_plan(p, kKimi, 4096, kTwelveNodes); }) ==
        "plan: the attention shard_group (16) must divide its 24 data-parallel ranks.");
  // A group at least as large as the data-parallel ranks shards over all of them.
  p.state[static_cast<int>(LayerKind::attention)].shard_group = 32;
  CHECK_NOTHROW(validate_plan(p, kKimi, 4096, kTwelveNodes));
  CHECK(shard_group(p, LayerKind::attention).block == 0);
  CHECK(replica_group(p, LayerKind::attention).dims.empty());
}

} // namespace strategies_mesh_test
