#include "lowering/passes.hpp"

#include <doctest/doctest.h>

#include <stdexcept>

namespace lowering_passes_test {

using namespace mop;

namespace {
sim::RankClass chain() {
  // t0 -> op0 -> t1 -> op1 -> t2 ; op2 writes t1 again (after op1 read it); op3 reads t2.
  sim::RankClass rc;
  rc.name = "stage 0";
  for (int i = 0; i < 3; ++i) {
    sim::Tensor t;
    t.name = "t" + std::to_string(i);
    t.shape = {4, 8};
    rc.tensors.push_back(t);
  }
  auto op = [](std::vector<int> in, std::vector<int> out) {
    sim::Op o;
    o.inputs = std::move(in);
    o.outputs = std::move(out);
    return o;
  };
  rc.ops = {op({}, {0}), op({0}, {1}), op({1}, {2}), op({}, {1}), op({2}, {})};
  return rc;
}
} // namespace

TEST_CASE("lowering passes: dependencies follow reads and writes" *
          doctest::test_suite("independent")) {
  sim::RankClass rc = chain();
  lowering::derive_dependencies(rc);
  CHECK(rc.ops[0].deps.empty());
  CHECK(rc.ops[1].deps == std::vector<int>{0});    // reads t0 written by op0
  CHECK(rc.ops[2].deps == std::vector<int>{1});    // reads t1
  CHECK(rc.ops[3].deps == std::vector<int>{1, 2}); // rewrites t1: after its writer and reader
  CHECK(rc.ops[4].deps == std::vector<int>{2});
}

TEST_CASE("lowering passes: each tensor lives from its first to its last use" *
          doctest::test_suite("independent")) {
  sim::RankClass rc = chain();
  lowering::derive_liveness(rc);
  CHECK(rc.ops[0].allocs == std::vector<int>{0});
  CHECK(rc.ops[1].allocs == std::vector<int>{1});
  CHECK(rc.ops[1].frees == std::vector<int>{0});
  CHECK(rc.ops[3].frees == std::vector<int>{1});
  CHECK(rc.ops[4].frees == std::vector<int>{2});
  // 4 x 8 bf16 elements.
  CHECK(lowering::tensor_bytes(rc.tensors[0]) == 64);
  rc.tensors.push_back(sim::Tensor{});
  rc.tensors.back().name = "unused";
  CHECK_THROWS_AS(lowering::derive_liveness(rc), std::logic_error);
}

} // namespace lowering_passes_test
