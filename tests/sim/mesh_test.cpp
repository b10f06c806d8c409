#include "sim/mesh.hpp"

#include <doctest/doctest.h>

#include <stdexcept>

namespace sim_mesh_test {

using mop::sim::GroupSpec;
using mop::sim::Mesh;
using mop::sim::MeshDim;
using mop::sim::MeshView;

namespace {
// 16 ranks as tp 2 (innermost), cp 2, dp 2, pp 2: rank = tp + 2·cp + 4·dp + 8·pp.
MeshView attention16() {
  return MeshView("attention", {{"tp", 2}, {"cp", 2}, {"dp", 2}, {"pp", 2}});
}
} // namespace

TEST_CASE("mesh: coordinates follow the innermost-first layout" *
          doctest::test_suite("independent")) {
  const MeshView v = attention16();
  CHECK(v.size() == 16);
  // Rank 13 = 1 + 2·0 + 4·1 + 8·1.
  CHECK(v.coord(13, "tp") == 1);
  CHECK(v.coord(13, "cp") == 0);
  CHECK(v.coord(13, "dp") == 1);
  CHECK(v.coord(13, "pp") == 1);
  CHECK(v.stride("dp") == 4);
  CHECK(v.extent("ep") == 1);
  CHECK(v.coord(13, "ep") == 0);
}

TEST_CASE("mesh: a group is every rank that differs only in its dimensions" *
          doctest::test_suite("independent")) {
  const MeshView v = attention16();
  // Rank 13's TP pair: tp flipped. Its CP x DP group: tp 1, pp 1, cp and dp free:
  // 1 + 8 + {0, 2, 4, 6}.
  CHECK(v.members(13, GroupSpec{"attention", {"tp"}}) == std::vector<int>{12, 13});
  CHECK(v.members(13, GroupSpec{"attention", {"dp", "cp"}}) == std::vector<int>{9, 11, 13, 15});
  CHECK(v.group_size(GroupSpec{"attention", {"dp", "cp"}}) == 4);
  // The stage: everything but pp.
  CHECK(v.members(3, GroupSpec{"attention", {"tp", "cp", "dp"}}) ==
        std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7});
  CHECK(v.members(3, GroupSpec{"attention", {"pp"}}) == std::vector<int>{3, 11});
}

TEST_CASE("mesh: HSDP blocks and their replica groups tile a data-parallel group" *
          doctest::test_suite("independent")) {
  // 8 data-parallel ranks sharded in blocks of 2: shard groups {0,1} {2,3} ..., replica groups
  // {0,2,4,6} and {1,3,5,7} (torchtitan's dp_shard 2 x dp_replicate 4).
  const MeshView v("dense", {{"tp", 1}, {"dp", 8}});
  const GroupSpec shard{"dense", {"dp"}, 2, false};
  const GroupSpec replicas{"dense", {"dp"}, 2, true};
  CHECK(v.members(5, shard) == std::vector<int>{4, 5});
  CHECK(v.members(5, replicas) == std::vector<int>{1, 3, 5, 7});
  CHECK(v.group_size(shard) == 2);
  CHECK(v.group_size(replicas) == 4);
  CHECK_THROWS_AS(v.group_size(GroupSpec{"dense", {"dp"}, 3, false}), std::invalid_argument);
}

TEST_CASE("mesh: ranks per node count the group's members on one node" *
          doctest::test_suite("independent")) {
  // 64 ranks, 8 per node: tp 4 (stride 1), cp 4 (stride 4), dp 4 (stride 16).
  const MeshView v("attention", {{"tp", 4}, {"cp", 4}, {"dp", 4}});
  CHECK(v.ranks_per_node(GroupSpec{"attention", {"tp"}}, 8) == 4); // ranks 0-3
  CHECK(v.ranks_per_node(GroupSpec{"attention", {"cp"}}, 8) == 2); // 0 and 4 of 0,4,8,12
  CHECK(v.ranks_per_node(GroupSpec{"attention", {"dp"}}, 8) == 1); // 0,16,32,48
  CHECK(v.ranks_per_node(GroupSpec{"attention", {"tp", "cp"}}, 8) == 8);
  CHECK(v.ranks_per_node(GroupSpec{"attention", {"cp", "dp"}}, 8) == 2);
  // A block of 2 of the 16 CP x DP ranks (0, 4) is on one node; its replicas (0, 8, 16, ...)
  // have one member per node.
  CHECK(v.ranks_per_node(GroupSpec{"attention", {"cp", "dp"}, 2, false}, 8) == 2);
  CHECK(v.ranks_per_node(GroupSpec{"attention", {"cp", "dp"}, 2, true}, 8) == 1);
  // The whole world on 64-GPU nodes.
  CHECK(v.ranks_per_node(GroupSpec{"attention", {"tp", "cp", "dp"}}, 64) == 64);
}

TEST_CASE("mesh: the ends of a pipeline group are its first and last stage" *
          doctest::test_suite("independent")) {
  // 4 stages of 2 ranks (tp 2 innermost): rank 3's pipeline group is 1, 3, 5, 7; its ends
  // (tied embeddings' copies) are 1 and 7. Stages 0 and 3 of rank 0 (0 and 6) share an
  // 8-GPU node, not a 4-GPU one.
  const MeshView v("embed", {{"tp", 2}, {"pp", 4}});
  GroupSpec ends{"embed", {"pp"}};
  ends.ends_only = true;
  CHECK(v.members(3, ends) == std::vector<int>{1, 7});
  CHECK(v.group_size(ends) == 2);
  CHECK(v.ranks_per_node(ends, 8) == 2);
  CHECK(v.ranks_per_node(ends, 4) == 1);
  // One stage: one member.
  const MeshView one("embed", {{"tp", 2}, {"pp", 1}});
  CHECK(one.members(1, ends) == std::vector<int>{1});
  CHECK(one.group_size(ends) == 1);
}

TEST_CASE("mesh: refuses what is not a layout" * doctest::test_suite("plumbing")) {
  CHECK_THROWS_AS(MeshView("v", {{"tp", 0}}), std::invalid_argument);
  CHECK_THROWS_AS(MeshView("v", {{"tp", 2}, {"tp", 2}}), std::invalid_argument);
  CHECK_THROWS_AS(MeshView("v", {{"a", 65536}, {"b", 65536}}), std::invalid_argument);
  const MeshView v = attention16();
  CHECK_THROWS_AS(v.members(16, GroupSpec{"attention", {"tp"}}), std::invalid_argument);
  CHECK_THROWS_AS(v.members(0, GroupSpec{"attention", {"ep"}}), std::invalid_argument);
  Mesh m;
  m.views.push_back(v);
  CHECK(m.view("attention").size() == 16);
  CHECK_THROWS_AS(m.view("moe"), std::invalid_argument);
}

} // namespace sim_mesh_test
