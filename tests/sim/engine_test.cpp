#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "hw_models/collective.hpp"
#include "sim/engine.hpp"
#include "tests/support/approx.hpp"

#include <doctest/doctest.h>

#include <string>
#include <utility>
#include <vector>

namespace sim_engine_test {

using namespace mop;
using namespace mop::sim;

namespace {

const hw::Calibration kNone{};

const hw::ClusterSpec& h200() {
  static const hw::ClusterSpec c = hw::load_cluster("h200");
  return c;
}

// configs/clusters/h200.json: STREAM copy 4.01 TB/s, 2 µs per kernel launch, pinned PCIe copies
// 55.43 GB/s H2D and 55.06 GB/s D2H, 8 × 47 GB/s NICs for 8 GPUs, 112 host cores, CPU-Adam
// 1.5e9 params/s per node.
constexpr double kHbm = 4.01e12;
constexpr double kLaunch = 2e-6;
constexpr double kH2d = 55.43e9;
constexpr double kD2h = 55.06e9;
constexpr double GiB = 1073741824.0;

// "L" + std::to_string(i) + ".fwd", built by appending: GCC 12 at -O3 raises a false -Wrestrict
// on operator+(const char*, std::string&&) (GCC bug 105651).
std::string op_name(const char* prefix, int i, const char* suffix = "") {
  std::string name = prefix;
  name += std::to_string(i);
  name += suffix;
  return name;
}

Op elementwise(std::string name, int stream, double bytes, std::vector<int> deps = {}) {
  Op op;
  op.name = std::move(name);
  op.kind = OpKind::elementwise;
  op.stream = stream;
  op.bytes = bytes;
  op.deps = std::move(deps);
  return op;
}

Op collective(std::string name, OpKind kind, int stream, int group, double bytes,
              std::vector<int> deps = {}) {
  Op op = elementwise(std::move(name), stream, bytes, std::move(deps));
  op.kind = kind;
  op.group = group;
  op.category = Category::dp_comm;
  return op;
}

Op copy(std::string name, OpKind kind, int stream, double bytes) {
  Op op = elementwise(std::move(name), stream, bytes);
  op.kind = kind;
  op.category = Category::offload;
  return op;
}

// One class with the given streams; groups: 0 = 8 ranks in one node (NVLink), 1 = 16 ranks on
// two nodes (NIC).
Schedule one_class(std::vector<std::string> streams, int multiplicity = 1) {
  Schedule s;
  RankClass rc;
  rc.name = "only";
  rc.multiplicity = multiplicity;
  rc.streams = std::move(streams);
  s.classes.push_back(rc);
  s.groups.push_back({"tp", 8, 8, {}});
  s.groups.push_back({"fsdp", 16, 8, {}});
  return s;
}

std::vector<Op>& ops(Schedule& s, int c = 0) {
  return s.classes[static_cast<std::size_t>(c)].ops;
}

OpTiming timing(const SimResult& r, int c, int op) {
  return r.classes[static_cast<std::size_t>(c)].ops[static_cast<std::size_t>(op)];
}

double parts_sum(const Breakdown& b) {
  return b.compute + b.exposed_comm + b.bubble + b.offload_stall + b.optimizer;
}

} // namespace

TEST_CASE("op durations come from the hardware cost functions" *
          doctest::test_suite("independent")) {
  Schedule s = one_class({"compute"});
  // 4.01 GB at 4.01 TB/s is 1 ms, plus one launch.
  CHECK(op_duration_s(elementwise("e", 0, 4.01e9), s, h200(), kNone) ==
        mop::test::rel(1e-3 + kLaunch));
  // 55.43 MB over PCIe at 55.43 GB/s: 1 ms plus one launch; D2H at 55.06 GB/s.
  CHECK(op_duration_s(copy("h", OpKind::copy_h2d, 0, 55.43e6), s, h200(), kNone) ==
        mop::test::rel(1e-3 + kLaunch));
  CHECK(op_duration_s(copy("d", OpKind::copy_d2h, 0, 55.06e6), s, h200(), kNone) ==
        mop::test::rel(1e-3 + kLaunch));
  // A rank's host optimizer gets 112 / 8 = 14 cores: 1.5e9 × 14 / 112 = 1.875e8 params/s.
  Op adam;
  adam.kind = OpKind::host_adam;
  adam.params = 1.875e8;
  CHECK(op_duration_s(adam, s, h200(), kNone) == mop::test::rel(1.0));
  // A recv takes no time: it ends with its send.
  Op recv;
  recv.kind = OpKind::recv;
  CHECK(op_duration_s(recv, s, h200(), kNone) == 0);
  // A send is NCCL send/recv over its group; a gemm with 3 instances costs three gemms.
  Op send = collective("s", OpKind::send, 0, 1, 64e6);
  CHECK(op_duration_s(send, s, h200(), kNone) ==
        hw::collective_cost(h200(), kNone, hw::CollectiveOp::send_recv, 64e6, {8, 2}).time_s);
  Op one, three;
  one.kind = three.kind = OpKind::gemm;
  one.gemm = {4096, 4096, 4096, 1, {}};
  three.gemm = {4096, 4096, 4096, 3, {}};
  CHECK(op_duration_s(three, s, h200(), kNone) ==
        mop::test::rel(3 * op_duration_s(one, s, h200(), kNone)));
}

TEST_CASE("an op of several kernels pays the per-kernel fixed cost for each" *
          doctest::test_suite("independent")) {
  Schedule s = one_class({"compute"});
  // An eager chain of 8 kernels moving 4.01 GB: 1 ms of traffic and 8 launches.
  Op chain = elementwise("e", 0, 4.01e9);
  chain.kernels = 8;
  CHECK(op_duration_s(chain, s, h200(), kNone) == mop::test::rel(1e-3 + 8 * kLaunch));
  // A grouped GEMM of 4 experts with FP8 casts, 4 GEMMs and 4 casts: the model prices one GEMM
  // launch and the casts' pass, 6 more launches here.
  Op grouped;
  grouped.kind = OpKind::grouped_gemm;
  grouped.dtype = Dtype::fp8;
  grouped.gemm.rows_per_expert = {2048, 2048, 2048, 2048};
  grouped.gemm.n = 4096;
  grouped.gemm.k = 4096;
  grouped.bytes = 1e8;
  const double single = op_duration_s(grouped, s, h200(), kNone);
  grouped.kernels = 8;
  CHECK(op_duration_s(grouped, s, h200(), kNone) == mop::test::rel(single + 6 * kLaunch));
  // A collective's kernels are the host's business: its time is the collective's.
  Op a2a = collective("a", OpKind::all_to_all, 0, 1, 64e6);
  const double one_kernel = op_duration_s(a2a, s, h200(), kNone);
  a2a.kernels = 4;
  CHECK(op_duration_s(a2a, s, h200(), kNone) == one_kernel);
}

TEST_CASE("two ops on one stream run back to back" * doctest::test_suite("independent")) {
  Schedule s = one_class({"compute"});
  ops(s).push_back(elementwise("a", 0, 4.01e9));
  ops(s).push_back(elementwise("b", 0, 8.02e9));
  const SimResult r = simulate(s, h200(), kNone);
  // d1 = 4.01e9 / 4.01e12 + 2 µs = 1.002 ms, d2 = 2.002 ms.
  const double d1 = 4.01e9 / kHbm + kLaunch, d2 = 8.02e9 / kHbm + kLaunch;
  CHECK(timing(r, 0, 1).start_s == mop::test::rel(d1));
  CHECK(r.step_time_s == mop::test::rel(d1 + d2));
  CHECK(r.step_time_s == mop::test::rel(3.004e-3));
  CHECK(r.events == 4); // two starts, two ends
}

TEST_CASE("two ops on two streams with no dependency overlap: the step is the longer one" *
          doctest::test_suite("independent")) {
  // A kernel and a host-to-device copy use different resources (SMs, PCIe).
  Schedule s = one_class({"compute", "copy.h2d"});
  ops(s).push_back(elementwise("a", 0, 8.02e9));
  ops(s).push_back(copy("up", OpKind::copy_h2d, 1, 55.43e6));
  const SimResult r = simulate(s, h200(), kNone);
  const double d_kernel = 8.02e9 / kHbm + kLaunch; // 2.002 ms
  const double d_copy = 55.43e6 / kH2d + kLaunch;  // 1.002 ms
  CHECK(timing(r, 0, 1).end_s == mop::test::rel(d_copy));
  CHECK(r.step_time_s == mop::test::rel(std::max(d_kernel, d_copy)));
  CHECK(r.step_time_s == mop::test::rel(2.002e-3));
}

TEST_CASE("kernels on two compute streams share the SMs" * doctest::test_suite("independent")) {
  // Each runs at 1/2 while both run: the 1.002 ms one ends at 2 × 1.002 ms, the 2.002 ms one
  // has done 1.002 ms of work by then and runs the last 1 ms alone: d1 + d2.
  Schedule s = one_class({"compute", "compute.side"});
  ops(s).push_back(elementwise("short", 0, 4.01e9));
  ops(s).push_back(elementwise("long", 1, 8.02e9));
  const SimResult r = simulate(s, h200(), kNone);
  const double d1 = 4.01e9 / kHbm + kLaunch, d2 = 8.02e9 / kHbm + kLaunch;
  CHECK(timing(r, 0, 0).end_s == mop::test::rel(2 * d1));
  CHECK(r.step_time_s == mop::test::rel(d1 + d2));
}

TEST_CASE("a compute kernel overlapped by a collective slows by the documented factor" *
          doctest::test_suite("independent")) {
  // Default: 24 of 132 SMs are NCCL's while a collective runs (docs/ENGINE.md).
  const double slowdown = 24.0 / 132.0;
  CHECK(EngineOptions{}.compute_slowdown_with_comm == mop::test::rel(slowdown));
  Schedule s = one_class({"compute", "comm"});
  ops(s).push_back(elementwise("kernel", 0, 4.01e10)); // 10.002 ms
  ops(s).push_back(collective("ar", OpKind::all_reduce, 1, 0, GiB));
  const double dc = 4.01e10 / kHbm + kLaunch;
  const double dg = op_duration_s(ops(s)[1], s, h200(), kNone);
  CHECK(dg == hw::collective_cost(h200(), kNone, hw::CollectiveOp::all_reduce, GiB, {8, 1}).time_s);
  REQUIRE(dg < dc);
  const SimResult r = simulate(s, h200(), kNone);
  // During [0, dg] the kernel does (1 − s)·dg of its work; the rest, dc − (1 − s)·dg, at full
  // speed: it ends at dg + dc − (1 − s)·dg = dc + s·dg. The collective is not slowed.
  CHECK(timing(r, 0, 1).end_s == mop::test::rel(dg));
  CHECK(timing(r, 0, 0).end_s == mop::test::rel(dc + slowdown * dg));
  // With the slowdown set to 1/4 the same hand formula gives dc + dg/4.
  EngineOptions quarter;
  quarter.compute_slowdown_with_comm = 0.25;
  CHECK(simulate(s, h200(), kNone, quarter).step_time_s == mop::test::rel(dc + 0.25 * dg));
}

TEST_CASE("two collectives on the same link take twice as long, another link is not shared" *
          doctest::test_suite("independent")) {
  Schedule s = one_class({"comm.a", "comm.b", "comm.c"});
  ops(s).push_back(collective("ar.a", OpKind::all_reduce, 0, 0, GiB)); // NVLink
  ops(s).push_back(collective("ar.b", OpKind::all_reduce, 1, 0, GiB)); // NVLink
  ops(s).push_back(collective("ag", OpKind::all_gather, 2, 1, GiB));   // NIC (2 nodes)
  const double d_nvlink = op_duration_s(ops(s)[0], s, h200(), kNone);
  const double d_nic = op_duration_s(ops(s)[2], s, h200(), kNone);
  const SimResult r = simulate(s, h200(), kNone);
  // Fair share: each of the two NVLink collectives at 1/2, both end at 2·d.
  CHECK(timing(r, 0, 0).end_s == mop::test::rel(2 * d_nvlink));
  CHECK(timing(r, 0, 1).end_s == mop::test::rel(2 * d_nvlink));
  CHECK(timing(r, 0, 2).end_s == mop::test::rel(d_nic));
}

TEST_CASE("H2D and D2H at once share PCIe as the duplex figures say" *
          doctest::test_suite("independent")) {
  // hardware.md §2.3: both directions carry 1.4 × one direction, H2D a third of it. One
  // direction = (55.43 + 55.06) / 2 = 55.245 GB/s, so H2D gets 1.4 · 55.245 · 0.3333 = 25.78 GB/s
  // (rate 25.78 / 55.43) and D2H 1.4 · 55.245 · 0.6667 = 51.56 GB/s (rate 51.56 / 55.06).
  Schedule s = one_class({"copy.h2d", "copy.d2h"});
  const double bytes = 1e9;
  ops(s).push_back(copy("up", OpKind::copy_h2d, 0, bytes));
  ops(s).push_back(copy("down", OpKind::copy_d2h, 1, bytes));
  const double one_way = (kH2d + kD2h) / 2;
  const double r_up = 1.4 * one_way * 0.3333 / kH2d;
  const double r_down = 1.4 * one_way * (1 - 0.3333) / kD2h;
  const double d_up = bytes / kH2d + kLaunch, d_down = bytes / kD2h + kLaunch;
  const SimResult r = simulate(s, h200(), kNone);
  // D2H is the faster one: it ends at d_down / r_down; H2D has done r_up of that and then runs
  // alone.
  const double t1 = d_down / r_down;
  CHECK(timing(r, 0, 1).end_s == mop::test::rel(t1));
  CHECK(timing(r, 0, 0).end_s == mop::test::rel(t1 + d_up - r_up * t1));
}

TEST_CASE("a copy and an inter-node collective share the GPU's PCIe switch" *
          doctest::test_suite("independent")) {
  // docs/HARDWARE.md "Copies": the copy keeps max(55.43 − 47, 55.43 / 2) = half of its link; the
  // NIC gets min(47, 55.245 / 2) of its 47 GB/s (max-min fair share of the x16 link).
  Schedule s = one_class({"comm", "copy.h2d"});
  ops(s).push_back(collective("ag", OpKind::all_gather, 0, 1, 4 * GiB));
  ops(s).push_back(copy("up", OpKind::copy_h2d, 1, 2e8));
  const double d_ag = op_duration_s(ops(s)[0], s, h200(), kNone);
  const double d_up = 2e8 / kH2d + kLaunch;
  const double r_ag = (kH2d + kD2h) / 2 / 2 / 47e9, r_up = 0.5;
  REQUIRE(d_up / r_up < d_ag / r_ag);
  const SimResult r = simulate(s, h200(), kNone);
  const double t1 = d_up / r_up;
  CHECK(timing(r, 0, 1).end_s == mop::test::rel(t1));
  CHECK(timing(r, 0, 0).end_s == mop::test::rel(t1 + d_ag - r_ag * t1));
}

TEST_CASE("the ranks of a class on one node share host DRAM for their copies" *
          doctest::test_suite("independent")) {
  // hardware.md §2.3: 8 GPUs × 55.43 GB/s = 443 GB/s against 420 GB/s of DRAM → 52.5 GB/s each.
  Schedule s = one_class({"copy.h2d"}, 64);
  ops(s).push_back(copy("up", OpKind::copy_h2d, 0, 1e9));
  const SimResult r = simulate(s, h200(), kNone);
  CHECK(r.step_time_s == mop::test::rel((1e9 / kH2d + kLaunch) / (420e9 / (8 * kH2d))));
}

TEST_CASE("FSDP prefetch: a gather shorter than a layer is hidden, a longer one exposed" *
          doctest::test_suite("independent")) {
  // Gathers of layers 0..n−1 run back to back on the comm stream; layer i's compute waits for its
  // gather. No SM slowdown here, to see the overlap alone.
  EngineOptions no_slowdown;
  no_slowdown.compute_slowdown_with_comm = 0;
  const int n = 4;
  auto fsdp = [&](double gather_bytes, double layer_bytes) {
    Schedule s = one_class({"compute", "comm.fsdp"});
    for (int i = 0; i < n; ++i)
      ops(s).push_back(
          collective(op_name("L", i, ".gather"), OpKind::all_gather, 1, 0, gather_bytes));
    for (int i = 0; i < n; ++i)
      ops(s).push_back(elementwise(op_name("L", i, ".fwd"), 0, layer_bytes, {i}));
    return s;
  };
  const double c = 4.01e9 / kHbm + kLaunch; // 1.002 ms per layer

  SUBCASE("hidden") {
    Schedule s = fsdp(64e6, 4.01e9);
    const double g = op_duration_s(ops(s)[0], s, h200(), kNone);
    REQUIRE(g < c);
    const SimResult r = simulate(s, h200(), kNone, no_slowdown);
    // Only the first gather is exposed: step = g + n·c.
    CHECK(r.step_time_s == mop::test::rel(g + n * c));
    CHECK(r.breakdown.exposed_comm == mop::test::rel(g));
    CHECK(r.breakdown.exposed_comm_by_category[static_cast<int>(Category::dp_comm)] ==
          mop::test::rel(g));
    CHECK(r.breakdown.compute == mop::test::rel(n * c));
    CHECK(r.breakdown.bubble == 0);
    CHECK(parts_sum(r.breakdown) == mop::test::rel(r.step_time_s));
    // The critical path: the first gather, then the layers one after the other.
    REQUIRE(r.critical_path.size() == static_cast<std::size_t>(n + 1));
    CHECK(r.critical_path[0].op == 0);
    for (int i = 0; i < n; ++i)
      CHECK(r.critical_path[static_cast<std::size_t>(i + 1)].op == n + i);
  }
  SUBCASE("exposed") {
    Schedule s = fsdp(2 * GiB, 4.01e9);
    const double g = op_duration_s(ops(s)[0], s, h200(), kNone);
    REQUIRE(g > c);
    const SimResult r = simulate(s, h200(), kNone, no_slowdown);
    // The gathers set the pace: layer n−1 starts after n gathers, step = n·g + c = n·c + g +
    // (n − 1)(g − c): the first gather and every later one's excess over a layer are exposed.
    CHECK(r.step_time_s == mop::test::rel(n * g + c));
    CHECK(r.breakdown.exposed_comm == mop::test::rel(g + (n - 1) * (g - c)));
    CHECK(r.breakdown.compute == mop::test::rel(n * c));
    CHECK(parts_sum(r.breakdown) == mop::test::rel(r.step_time_s));
  }
}

namespace {

// 1F1B over p = 2 stages (rank classes) and m micro-batches, every forward and backward op the
// same elementwise kernel. Stage 0 runs 1 warm-up forward, then (F, B) pairs, then the last B;
// stage 1 alternates F, B. Activations go 0 → 1 and gradients 1 → 0 by send/recv of 0 bytes
// (NCCL takes no time for an empty message), so the hand formula holds exactly.
Schedule pipeline(int m, double bytes) {
  Schedule s;
  s.groups.push_back({"pp.0-1", 2, 1, {}});
  for (int stage = 0; stage < 2; ++stage) {
    RankClass rc;
    rc.name = op_name("stage ", stage, " of 2");
    rc.stage = stage;
    rc.streams = {"compute", "pp.send", "pp.recv"};
    s.classes.push_back(rc);
  }
  auto add = [&](int stage, Op op) {
    auto& list = s.classes[static_cast<std::size_t>(stage)].ops;
    list.push_back(std::move(op));
    return static_cast<int>(list.size()) - 1;
  };
  auto p2p = [&](OpKind kind, int stage, int j, std::vector<int> deps) {
    Op op = collective(op_name(kind == OpKind::send ? "send." : "recv.", j), kind,
                       kind == OpKind::send ? 1 : 2, 0, 0, std::move(deps));
    op.category = Category::pp_comm;
    op.peer_class = 1 - stage;
    return op;
  };
  std::vector<int> send_act(static_cast<std::size_t>(m)), send_grad(static_cast<std::size_t>(m));
  // Stage 1 first: its sends are what stage 0's recvs name.
  for (int j = 0; j < m; ++j) {
    Op recv = p2p(OpKind::recv, 1, j, {});
    recv.remote_deps.push_back({0, 0}); // patched below, once stage 0's sends exist
    const int r = add(1, recv);
    Op f = elementwise(op_name("F", j), 0, bytes, {r});
    f.micro_batch = j;
    const int fi = add(1, f);
    Op b = elementwise(op_name("B", j), 0, bytes, {fi});
    b.category = Category::backward;
    const int bi = add(1, b);
    send_grad[static_cast<std::size_t>(j)] = add(1, p2p(OpKind::send, 1, j, {bi}));
  }
  auto forward = [&](int j) {
    const int f = add(0, elementwise(op_name("F", j), 0, bytes));
    send_act[static_cast<std::size_t>(j)] = add(0, p2p(OpKind::send, 0, j, {f}));
  };
  auto backward = [&](int j) {
    Op recv = p2p(OpKind::recv, 0, j, {});
    recv.remote_deps.push_back({1, send_grad[static_cast<std::size_t>(j)]});
    const int r = add(0, recv);
    Op b = elementwise(op_name("B", j), 0, bytes, {r});
    b.category = Category::backward;
    add(0, b);
  };
  forward(0);
  for (int j = 1; j < m; ++j) {
    forward(j);
    backward(j - 1);
  }
  backward(m - 1);
  // Stage 1's recv of micro-batch j is its op 4j.
  for (int j = 0; j < m; ++j)
    s.classes[1].ops[static_cast<std::size_t>(4 * j)].remote_deps[0] = {
        0, send_act[static_cast<std::size_t>(j)]};
  return s;
}

} // namespace

TEST_CASE("1F1B bubble is (p-1)/(m+p-1) of the step" * doctest::test_suite("independent")) {
  const int p = 2;
  const double t = 4.01e9 / kHbm + kLaunch; // tf = tb = 1.002 ms
  for (int m : {2, 4, 8}) {
    CAPTURE(m);
    const Schedule s = pipeline(m, 4.01e9);
    CHECK_NOTHROW(check_schedule(s));
    const SimResult r = simulate(s, h200(), kNone);
    CHECK(r.step_time_s == mop::test::rel((m + p - 1) * (t + t)));
    // The last stage to finish is stage 0 (its last backward); its GPU computes m·(tf + tb) and
    // waits the rest.
    CHECK(r.critical_path.back().rank_class == 0);
    CHECK(r.breakdown.compute == mop::test::rel(m * (t + t)));
    CHECK(r.breakdown.bubble / r.step_time_s == mop::test::rel(double(p - 1) / (m + p - 1)));
    CHECK(parts_sum(r.breakdown) == mop::test::rel(r.step_time_s));
    CHECK(r.classes[1].end_s == mop::test::rel((m + p - 1) * (t + t) - t));
  }
}

TEST_CASE("the memory tracker finds the HBM peak, its breakdown and its largest tensors" *
          doctest::test_suite("independent")) {
  Schedule s = one_class({"compute"});
  auto& tensors = s.classes[0].tensors;
  const double GB = 1e9;
  tensors.push_back(cost_tensor("weights", 10 * GB, Device::hbm, MemoryKind::weights, true));
  tensors.push_back(cost_tensor("adam.state", 20 * GB, Device::host, MemoryKind::optimizer, true));
  tensors.push_back(cost_tensor("act1", 4 * GB, Device::hbm, MemoryKind::activations, false));
  tensors.push_back(cost_tensor("act2", 6 * GB, Device::hbm, MemoryKind::activations, false));
  tensors.push_back(cost_tensor("grads", 3 * GB, Device::hbm, MemoryKind::grads, false));
  tensors.push_back(cost_tensor("pinned", 1 * GB, Device::host, MemoryKind::activations, false));
  for (int i = 0; i < 4; ++i)
    ops(s).push_back(elementwise(op_name("op", i), 0, 4.01e9));
  ops(s)[0].allocs = {2};    // act1
  ops(s)[1].allocs = {3, 5}; // act2, pinned
  ops(s)[2].allocs = {4};    // grads
  ops(s)[2].frees = {2, 5};  // act1, pinned
  ops(s)[3].frees = {3, 4};  // act2, grads
  const double d = 4.01e9 / kHbm + kLaunch;
  const SimResult r = simulate(s, h200(), kNone);
  const ClassMemory& mem = r.classes[0].memory;
  // HBM: 10 at t = 0, 14 at 0 (op0), 20 at d (op1), 23 at 2d (op2 starts), 19 at 3d, 10 at 4d.
  CHECK(mem.peak_hbm_bytes == 23 * GB);
  CHECK(mem.peak_time_s == mop::test::rel(2 * d));
  CHECK(mem.at_peak[static_cast<int>(MemoryKind::weights)] == 10 * GB);
  CHECK(mem.at_peak[static_cast<int>(MemoryKind::activations)] == 10 * GB);
  CHECK(mem.at_peak[static_cast<int>(MemoryKind::grads)] == 3 * GB);
  CHECK(mem.at_peak[static_cast<int>(MemoryKind::optimizer)] == 0); // on the host
  CHECK(mem.largest_at_peak == std::vector<std::string>{"weights", "act2", "act1", "grads"});
  // Host: 20 resident, 21 while the pinned buffer lives.
  CHECK(mem.peak_host_bytes == 21 * GB);
  // Samples: both devices at 0; HBM at op0's start; HBM and host at op1's start; HBM at op2's
  // start; HBM and host at op2's end; HBM at op3's end.
  REQUIRE(mem.timeline.size() == 9);
  CHECK(mem.timeline.back().time_s == mop::test::rel(4 * d));
  CHECK(mem.timeline.back().device == Device::hbm);
  CHECK(mem.timeline.back().bytes == 10 * GB);
  EngineOptions quiet;
  quiet.record_memory_timeline = false;
  CHECK(simulate(s, h200(), kNone, quiet).classes[0].memory.timeline.empty());
}

TEST_CASE("the memory tracker keeps the peak of each piece of the program" *
          doctest::test_suite("independent")) {
  // A two-layer program: an embedding (no layer), layer 0's and layer 1's forwards, a loss (no
  // layer: it joins layer 1's piece), layer 1's and layer 0's backwards.
  Schedule s = one_class({"compute"});
  auto& tensors = s.classes[0].tensors;
  const double GB = 1e9;
  tensors.push_back(cost_tensor("weights", 10 * GB, Device::hbm, MemoryKind::weights, true));
  tensors.push_back(cost_tensor("emb", 1 * GB, Device::hbm, MemoryKind::activations, false));
  tensors.push_back(cost_tensor("L0 saved", 2 * GB, Device::hbm, MemoryKind::activations, false));
  tensors.push_back(cost_tensor("L1 saved", 2 * GB, Device::hbm, MemoryKind::activations, false));
  tensors.push_back(cost_tensor("logits", 5 * GB, Device::hbm, MemoryKind::activations, false));
  tensors.push_back(cost_tensor("L1 grads", 3 * GB, Device::hbm, MemoryKind::grads, false));
  tensors.push_back(cost_tensor("L0 staging", 4 * GB, Device::host, MemoryKind::comm_buffers, false));
  const int layer[] = {-1, 0, 1, -1, 1, 0};
  for (int i = 0; i < 6; ++i) {
    ops(s).push_back(elementwise(op_name("op", i), 0, 4.01e9));
    ops(s).back().layer = layer[i];
  }
  ops(s)[0].allocs = {1};    // emb: 11
  ops(s)[1].allocs = {2};    // L0 saved: 13
  ops(s)[1].frees = {1};     // 12
  ops(s)[2].allocs = {3};    // L1 saved: 14
  ops(s)[3].allocs = {4};    // logits: 19
  ops(s)[3].frees = {4};     // 14
  ops(s)[4].allocs = {5};    // L1 grads: 17
  ops(s)[4].frees = {3, 5};  // 12
  ops(s)[5].allocs = {6};    // host staging (HBM stays 12)
  ops(s)[5].frees = {2, 6};  // 10
  const ProgramPieces pieces = program_pieces(s.classes[0]);
  CHECK(pieces.of_op == std::vector<int>{0, 1, 2, 2, 2, 3});
  CHECK(pieces.layer == std::vector<int>{-1, 0, 1, 0});
  CHECK(pieces.pass == std::vector<int>{0, 0, 0, 1});
  EngineOptions by_layer;
  by_layer.memory_by_layer = true;
  const ClassMemory mem = simulate(s, h200(), kNone, by_layer).classes[0].memory;
  REQUIRE(mem.by_layer.size() == 4);
  // The embedding's piece holds the resident weights and the embedding: 11; layer 0's forward
  // 13; layer 1's forward, the loss and layer 1's backward 19 (the logits); layer 0's backward
  // 12 in HBM and the 4 GB of host staging.
  CHECK(mem.by_layer[0].hbm_bytes == 11 * GB);
  CHECK(mem.by_layer[1].hbm_bytes == 13 * GB);
  CHECK(mem.by_layer[2].hbm_bytes == 19 * GB);
  CHECK(mem.by_layer[2].at_peak[static_cast<int>(MemoryKind::activations)] == 9 * GB);
  CHECK(mem.by_layer[3].hbm_bytes == 12 * GB);
  CHECK(mem.by_layer[3].host_bytes == 4 * GB);
  CHECK(mem.by_layer[2].host_bytes == 0);
  CHECK(mem.peak_hbm_bytes == 19 * GB); // the largest piece's
  CHECK(simulate(s, h200(), kNone).classes[0].memory.by_layer.empty());
}

TEST_CASE("the breakdown charges each instant to compute, optimizer, comm, copy or waiting" *
          doctest::test_suite("independent")) {
  // One stream, in order: a forward kernel, a recompute kernel, an exposed TP all-reduce, an
  // offload copy, the host optimizer. Nothing overlaps, so each part is its op's duration.
  Schedule s = one_class({"compute"});
  ops(s).push_back(elementwise("fwd", 0, 4.01e9));
  ops(s).push_back(elementwise("recompute", 0, 8.02e9));
  ops(s)[1].category = Category::recompute;
  ops(s).push_back(collective("tp.ar", OpKind::all_reduce, 0, 0, GiB));
  ops(s)[2].category = Category::tp_comm;
  ops(s).push_back(copy("offload", OpKind::copy_d2h, 0, 55.06e6));
  Op adam;
  adam.name = "adam";
  adam.kind = OpKind::host_adam;
  adam.category = Category::optimizer;
  adam.params = 1.875e6; // 10 ms at 1.875e8 params/s
  ops(s).push_back(adam);
  const double d_ar = op_duration_s(ops(s)[2], s, h200(), kNone);
  const SimResult r = simulate(s, h200(), kNone);
  const Breakdown& b = r.breakdown;
  CHECK(b.compute == mop::test::rel(4.01e9 / kHbm + kLaunch + 8.02e9 / kHbm + kLaunch));
  CHECK(b.recompute == mop::test::rel(8.02e9 / kHbm + kLaunch));
  CHECK(b.exposed_comm == mop::test::rel(d_ar));
  CHECK(b.exposed_comm_by_category[static_cast<int>(Category::tp_comm)] == mop::test::rel(d_ar));
  CHECK(b.offload_stall == mop::test::rel(55.06e6 / kD2h + kLaunch));
  CHECK(b.optimizer == mop::test::rel(0.01));
  CHECK(b.bubble == 0);
  CHECK(parts_sum(b) == mop::test::rel(r.step_time_s));
  CHECK(r.critical_path.size() == 5);
}

TEST_CASE("same schedule, same timings, to the bit" * doctest::test_suite("plumbing")) {
  // A busy mix: the pipeline plus an FSDP-like class with copies and overlapping collectives.
  Schedule s = pipeline(6, 3e9);
  RankClass extra;
  extra.name = "side";
  extra.streams = {"compute", "comm", "copy.h2d", "copy.d2h"};
  for (int i = 0; i < 20; ++i) {
    extra.ops.push_back(collective(op_name("g", i), OpKind::all_gather, 1, 0, 1e8 * (i + 1)));
    extra.ops.push_back(elementwise(op_name("c", i), 0, 1e9 * (i % 3 + 1),
                                    {static_cast<int>(extra.ops.size()) - 1}));
    extra.ops.push_back(copy(op_name("u", i), OpKind::copy_h2d, 2, 1e8));
    extra.ops.push_back(copy(op_name("d", i), OpKind::copy_d2h, 3, 2e8));
  }
  s.classes.push_back(extra);
  const SimResult a = simulate(s, h200(), kNone);
  const SimResult b = simulate(s, h200(), kNone);
  CHECK(a.step_time_s == b.step_time_s);
  CHECK(a.events == b.events);
  REQUIRE(a.classes.size() == b.classes.size());
  bool same = true;
  for (std::size_t c = 0; c < a.classes.size(); ++c) {
    for (std::size_t i = 0; i < a.classes[c].ops.size(); ++i)
      same = same && a.classes[c].ops[i].start_s == b.classes[c].ops[i].start_s &&
             a.classes[c].ops[i].end_s == b.classes[c].ops[i].end_s;
    same = same && a.classes[c].memory.timeline.size() == b.classes[c].memory.timeline.size();
  }
  CHECK(same);
  CHECK(a.critical_path.size() == b.critical_path.size());
  CHECK(parts_sum(a.breakdown) == mop::test::rel(a.step_time_s));
}

TEST_CASE("a dependency cycle that the check was told to skip is refused, not hung" *
          doctest::test_suite("plumbing")) {
  Schedule s = one_class({"compute", "comm"});
  ops(s).push_back(elementwise("a", 0, 1e6, {1}));
  ops(s).push_back(elementwise("b", 1, 1e6, {0}));
  EngineOptions unchecked;
  unchecked.check_schedule_first = false;
  CHECK_THROWS_WITH_AS(simulate(s, h200(), kNone, unchecked), doctest::Contains("never started"),
                       std::invalid_argument);
}

TEST_CASE("torch's CPU AdamW takes the measured 5.8x of a vectorised CPU-Adam" *
          doctest::test_suite("fitted")) {
  // hardware.md §4: DeepSpeed CPU-Adam is 5.1–6.5x faster than torch's Adam on the CPU.
  const mop::hw::ClusterSpec c = mop::hw::load_cluster("h200");
  mop::sim::Schedule s;
  mop::sim::Op op;
  op.kind = mop::sim::OpKind::host_adam;
  op.params = 1e9;
  const double vectorised = mop::sim::op_duration_s(op, s, c, mop::hw::Calibration{});
  op.torch_kernel = true;
  const double torch = mop::sim::op_duration_s(op, s, c, mop::hw::Calibration{});
  CHECK(torch / vectorised == mop::test::rel(5.8));
}

TEST_CASE("host issue: short kernels wait for the host, long ones hide it" *
          doctest::test_suite("independent")) {
  // Ten 1 MB kernels (0.25 µs of HBM + 2 µs launch = 2.249 µs each) issued at 10 µs a kernel:
  // the host sets the pace, the last one starts at 100 µs and the step is 100 µs + one kernel.
  Schedule s = one_class({"compute"});
  for (int i = 0; i < 10; ++i)
    ops(s).push_back(elementwise(op_name("k", i), 0, 1e6));
  const double d = 1e6 / kHbm + kLaunch;
  CHECK(simulate(s, h200(), kNone).step_time_s == mop::test::rel(10 * d));
  s.host_issue_s = 10e-6;
  const SimResult r = simulate(s, h200(), kNone);
  CHECK(timing(r, 0, 0).start_s == mop::test::rel(10e-6));
  CHECK(timing(r, 0, 9).start_s == mop::test::rel(100e-6));
  CHECK(r.step_time_s == mop::test::rel(100e-6 + d));
  // Long kernels (1.002 ms each): the host runs ahead and costs only the first issue.
  Schedule long_ops = one_class({"compute"});
  for (int i = 0; i < 10; ++i)
    ops(long_ops).push_back(elementwise(op_name("k", i), 0, 4.01e9));
  long_ops.host_issue_s = 10e-6;
  const double dl = 4.01e9 / kHbm + kLaunch;
  CHECK(simulate(long_ops, h200(), kNone).step_time_s == mop::test::rel(10e-6 + 10 * dl));
}

TEST_CASE("host issue: an op's kernels multiply its issue time, barriers launch none" *
          doctest::test_suite("independent")) {
  Schedule s = one_class({"compute"});
  ops(s).push_back(elementwise("five", 0, 1e6));
  ops(s).back().kernels = 5;
  Op marker;
  marker.name = "marker";
  marker.kind = OpKind::barrier;
  ops(s).push_back(marker);
  ops(s).push_back(elementwise("one", 0, 1e6));
  s.host_issue_s = 10e-6;
  const SimResult r = simulate(s, h200(), kNone);
  CHECK(timing(r, 0, 0).start_s == mop::test::rel(50e-6));
  // The last op is issued at 60 µs and starts then or when the five kernels end (each paying
  // the per-kernel fixed cost), whichever is later.
  const double five_end = 50e-6 + 1e6 / kHbm + 5 * kLaunch;
  CHECK(timing(r, 0, 2).start_s == mop::test::rel(std::max(60e-6, five_end)));
}

TEST_CASE("host issue: a host sync drains the device before anything after it is issued" *
          doctest::test_suite("independent")) {
  // A 1.002 ms kernel, a sync marker after it (the host reads a count), then a short kernel:
  // without the sync the host issues the short kernel at 20 µs and it queues behind the long
  // one; with it the host issues it only once the long kernel (and the marker) ended.
  Schedule s = one_class({"compute"});
  ops(s).push_back(elementwise("long", 0, 4.01e9));
  ops(s).push_back(elementwise("counts", 0, 0));
  ops(s).push_back(elementwise("short", 0, 1e6));
  s.host_issue_s = 10e-6;
  const double dl = 4.01e9 / kHbm + kLaunch, ds = 1e6 / kHbm + kLaunch;
  const double marker = 0; // a zero-byte pass takes no time on the device
  const double free_running = simulate(s, h200(), kNone).step_time_s;
  CHECK(free_running == mop::test::rel(10e-6 + dl + marker + ds));
  ops(s)[1].host_sync = true;
  const SimResult r = simulate(s, h200(), kNone);
  CHECK(timing(r, 0, 2).start_s == mop::test::rel(10e-6 + dl + marker + 10e-6));
  CHECK(r.step_time_s == mop::test::rel(free_running + 10e-6));
  // Unmodelled host (host_issue_s 0): the sync flag changes nothing.
  s.host_issue_s = 0;
  CHECK(simulate(s, h200(), kNone).step_time_s == mop::test::rel(dl + marker + ds));
}

} // namespace sim_engine_test
