#include "sim/schedule.hpp"

#include <doctest/doctest.h>

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace sim_schedule_test {

using namespace mop::sim;

namespace {

Op op_on(std::string name, int stream, std::vector<int> deps = {}) {
  Op op;
  op.name = std::move(name);
  op.kind = OpKind::elementwise;
  op.stream = stream;
  op.bytes = 1e6;
  op.deps = std::move(deps);
  return op;
}

// Two stages: stage 0 computes, allocates an activation and sends it; stage 1 receives it and
// computes. Valid as built; each test breaks one thing.
Schedule two_stages() {
  Schedule s;
  s.groups.push_back({"pp.0-1", 2, 1, {}});
  RankClass a;
  a.name = "stage 0";
  a.streams = {"compute", "pp"};
  a.tensors.push_back(cost_tensor("weights", 1e9, Device::hbm, MemoryKind::weights, true));
  a.tensors.push_back(cost_tensor("act", 1e6, Device::hbm, MemoryKind::activations, false));
  a.ops.push_back(op_on("fwd", 0));
  a.ops[0].allocs = {1};
  Op send = op_on("send.act", 1, {0});
  send.kind = OpKind::send;
  send.group = 0;
  send.peer_class = 1;
  send.frees = {1};
  a.ops.push_back(send);
  RankClass b;
  b.name = "stage 1";
  b.streams = {"compute", "pp"};
  Op recv = op_on("recv.act", 1);
  recv.kind = OpKind::recv;
  recv.peer_class = 0;
  recv.remote_deps = {{0, 1}};
  b.ops.push_back(recv);
  b.ops.push_back(op_on("fwd", 0, {0}));
  s.classes = {a, b};
  return s;
}

// The sentence names the class and the op (by index and name).
void check_refused(const Schedule& s, const std::string& rank_class, const std::string& op) {
  try {
    check_schedule(s);
    FAIL("check_schedule accepted a broken schedule");
  } catch (const std::invalid_argument& e) {
    const std::string what = e.what();
    CAPTURE(what);
    CHECK(what.find("ank class '" + rank_class + "'") != std::string::npos); // [Rr]ank
    CHECK(what.find(op) != std::string::npos);
    CHECK(what.back() == '.');
  }
}

} // namespace

TEST_CASE("a well-formed two-stage schedule passes the checks" * doctest::test_suite("plumbing")) {
  CHECK_NOTHROW(check_schedule(two_stages()));
}

TEST_CASE("check_schedule names the ops where a dependency cycle closes" *
          doctest::test_suite("plumbing")) {
  SUBCASE("within a class: a dep on a later op of the same stream") {
    Schedule s = two_stages();
    s.classes[1].ops[1].stream = 1; // fwd after recv on stream 1 ...
    s.classes[1].ops[0].deps = {1}; // ... and recv waits for fwd
    check_refused(s, "stage 1", "dependency cycle");
    check_refused(s, "stage 1", "op 0 'recv.act'");
    check_refused(s, "stage 1", "op 1 'fwd'");
  }
  SUBCASE("across classes") {
    // stage 0 fwd → send → stage 1 recv → fwd → stage 0 fwd.
    Schedule s = two_stages();
    s.classes[0].ops[0].remote_deps = {{1, 1}};
    check_refused(s, "stage 0", "dependency cycle");
    check_refused(s, "stage 0", "op 0 'fwd'");
    check_refused(s, "stage 1", "op 1 'fwd'");
  }
}

TEST_CASE("check_schedule refuses a tensor that is never freed" * doctest::test_suite("plumbing")) {
  Schedule s = two_stages();
  s.classes[0].ops[1].frees.clear();
  check_refused(s, "stage 0", "op 0 'fwd'");
}

TEST_CASE("check_schedule refuses a tensor freed twice" * doctest::test_suite("plumbing")) {
  Schedule s = two_stages();
  s.classes[0].ops[0].frees = {1};
  // op 0 frees it first (after allocating it), op 1 frees it again.
  check_refused(s, "stage 0", "op 1 'send.act'");
}

TEST_CASE("check_schedule refuses a tensor freed before it is allocated" *
          doctest::test_suite("plumbing")) {
  Schedule s = two_stages();
  s.classes[0].ops[0].allocs.clear();
  s.classes[0].ops[0].frees = {1};
  s.classes[0].ops[1].allocs = {1};
  s.classes[0].ops[1].frees.clear();
  check_refused(s, "stage 0", "op 0 'fwd'");
}

TEST_CASE("check_schedule refuses an index out of range" * doctest::test_suite("plumbing")) {
  SUBCASE("stream") {
    Schedule s = two_stages();
    s.classes[1].ops[1].stream = 2;
    check_refused(s, "stage 1", "op 1 'fwd'");
  }
  SUBCASE("dep") {
    Schedule s = two_stages();
    s.classes[1].ops[1].deps = {7};
    check_refused(s, "stage 1", "op 1 'fwd'");
  }
  SUBCASE("remote dep") {
    Schedule s = two_stages();
    s.classes[1].ops[0].remote_deps = {{0, 9}};
    check_refused(s, "stage 1", "op 0 'recv.act'");
  }
  SUBCASE("tensor") {
    Schedule s = two_stages();
    s.classes[0].ops[0].allocs = {1, 5};
    check_refused(s, "stage 0", "op 0 'fwd'");
  }
  SUBCASE("group") {
    Schedule s = two_stages();
    s.classes[0].ops[1].group = 3;
    check_refused(s, "stage 0", "op 1 'send.act'");
  }
  SUBCASE("peer class") {
    Schedule s = two_stages();
    s.classes[0].ops[1].peer_class = 0; // itself
    check_refused(s, "stage 0", "op 1 'send.act'");
  }
}

TEST_CASE("check_schedule refuses a recv that waits on no send of its peer" *
          doctest::test_suite("plumbing")) {
  Schedule s = two_stages();
  s.classes[1].ops[0].remote_deps.clear();
  check_refused(s, "stage 1", "op 0 'recv.act'");
  // Waiting on a compute op of the peer is not a send either.
  s.classes[1].ops[0].remote_deps = {{0, 0}};
  check_refused(s, "stage 1", "op 0 'recv.act'");
}

TEST_CASE("a group's ranks per node must divide its ranks" * doctest::test_suite("plumbing")) {
  Schedule s = two_stages();
  s.groups[0] = {"odd", 6, 4, {}};
  CHECK_THROWS_WITH_AS(check_schedule(s), doctest::Contains("Group 'odd'"), std::invalid_argument);
}

TEST_CASE("a group must match its mesh spec" * doctest::test_suite("plumbing")) {
  Schedule s = two_stages();
  s.world = 16;
  s.mesh.gpus_per_node = 8;
  s.mesh.views.emplace_back("attention", std::vector<MeshDim>{{"tp", 8}, {"pp", 2}});
  s.groups.push_back({"tp", 8, 8, GroupSpec{"attention", {"tp"}}});
  CHECK_NOTHROW(check_schedule(s));
  s.groups.back().ranks = 4;
  s.groups.back().ranks_per_node = 4;
  CHECK_THROWS_WITH_AS(check_schedule(s), doctest::Contains("its mesh spec gives 8 ranks"),
                       std::invalid_argument);
  s.groups.back() = {"tp", 8, 8, GroupSpec{"attention", {"ep"}}};
  CHECK_THROWS_WITH_AS(check_schedule(s), doctest::Contains("no dimension 'ep'"),
                       std::invalid_argument);
  s.groups.back() = {"tp", 8, 8, GroupSpec{"attention", {"tp"}}};
  s.world = 32;
  CHECK_THROWS_WITH_AS(check_schedule(s), doctest::Contains("not the world's 32"),
                       std::invalid_argument);
}

TEST_CASE("the executable layer's indices must be in range" * doctest::test_suite("plumbing")) {
  Schedule s = two_stages();
  s.classes[0].ops[0].inputs = {7};
  CHECK_THROWS_WITH_AS(check_schedule(s), doctest::Contains("has operand tensor 7"),
                       std::invalid_argument);
  s = two_stages();
  s.classes[0].ops[0].kernel = Kernel::matmul;
  s.classes[0].ops[0].inputs = {0};
  s.classes[0].ops[0].outputs = {1};
  CHECK_THROWS_WITH_AS(check_schedule(s), doctest::Contains("is a matmul of 1 inputs"),
                       std::invalid_argument);
  s = two_stages();
  s.classes[0].tensors[0].shape = {4, -1};
  CHECK_THROWS_WITH_AS(check_schedule(s), doctest::Contains("has a negative dimension"),
                       std::invalid_argument);
  s = two_stages();
  s.params.push_back(ParamSpec{"w", {4}, {}, 3, {}});
  CHECK_THROWS_WITH_AS(check_schedule(s), doctest::Contains("is in bucket 3"),
                       std::invalid_argument);
}

TEST_CASE("attention kernels read back from their names, and nothing else is one" *
          doctest::test_suite("plumbing")) {
  for (AttentionKernel k : {AttentionKernel::flash, AttentionKernel::flash2, AttentionKernel::cudnn})
    CHECK(parse_attention_kernel(attention_kernel_name(k)) == k);
  CHECK_FALSE(parse_attention_kernel("fa3").has_value());
  CHECK_FALSE(parse_attention_kernel("").has_value());
}

} // namespace sim_schedule_test
