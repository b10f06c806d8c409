#include "common/error.hpp"
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "hw_models/host_optimizer.hpp"
#include "tests/support/approx.hpp"

#include <doctest/doctest.h>

namespace hw_models_host_optimizer_test {

using namespace mop::hw;

namespace {
const Calibration kNone{};
}

TEST_CASE("a whole node updates hardware.md's suggested 1.5e9 AdamW params/s" *
          doctest::test_suite("fitted")) {
  const ClusterSpec h200 = load_cluster("h200");
  CHECK(host_adam_params_per_s(h200, kNone, 112) == mop::test::rel(1.5e9));
  // One step over 1.5e9 parameters takes a second.
  CHECK(host_adam_time_s(h200, kNone, 1.5e9, 112) == mop::test::rel(1.0));
}

TEST_CASE("AdamW throughput scales with cores until host memory bandwidth caps it" *
          doctest::test_suite("independent")) {
  ClusterSpec node = load_cluster("h200");
  // hardware.md §4: "scale it down linearly when fewer cores are available".
  CHECK(host_adam_params_per_s(node, kNone, 56) == mop::test::rel(0.75e9));
  CHECK(host_adam_params_per_s(node, kNone, 14) == mop::test::rel(1.5e9 / 8));
  // The ceiling, by hand: 30 bytes per parameter (read p, g, m, v; write p, m, v; write the bf16
  // copy) must fit in the DRAM bandwidth. At 30 GB/s that is 1e9 params/s.
  node.node.host_memory_bandwidth_achievable = 30e9;
  CHECK(host_adam_params_per_s(node, kNone, 56) == mop::test::rel(0.75e9)); // under the cap
  CHECK(host_adam_params_per_s(node, kNone, 112) == mop::test::rel(1e9));   // capped
  double previous = 0;
  for (int cores = 1; cores <= 112; ++cores) {
    const double rate = host_adam_params_per_s(node, kNone, cores);
    CHECK(rate >= previous);
    CHECK(rate * 30 <= 30e9 * (1 + 1e-12));
    previous = rate;
  }
}

TEST_CASE("cores outside the node are an input error" * doctest::test_suite("plumbing")) {
  const ClusterSpec h200 = load_cluster("h200");
  CHECK_THROWS_WITH_AS(host_adam_params_per_s(h200, kNone, 0),
                       "cores used by the host optimizer must be between 1 and the node's 112 host "
                       "cores (got 0).",
                       mop::InputError);
  CHECK_THROWS_AS(host_adam_params_per_s(h200, kNone, 113), mop::InputError);
}

} // namespace hw_models_host_optimizer_test
