#include "common/error.hpp"
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "hw_models/copy.hpp"
#include "tests/support/approx.hpp"

#include <doctest/doctest.h>

namespace hw_models_copy_test {

using namespace mop::hw;

namespace {
const Calibration kNone{};
constexpr double GiB = 1073741824.0;
} // namespace

TEST_CASE("a pinned host-to-device copy runs at the measured PCIe figure" *
          doctest::test_suite("fitted")) {
  const ClusterSpec h200 = load_cluster("h200");
  // nvbandwidth copy engine on 8×H200 (hardware.md §2.3): H2D 55.43 GB/s, D2H 55.06 GB/s.
  CHECK(host_device_bandwidth(h200, kNone) == 55.43e9);
  HostCopy d2h;
  d2h.direction = CopyDirection::device_to_host;
  CHECK(host_device_bandwidth(h200, kNone, d2h) == 55.06e9);
  // 1 GiB: bytes / bandwidth + one 2 µs launch.
  CHECK(host_device_copy_time_s(h200, kNone, GiB) == mop::test::rel(GiB / 55.43e9 + 2e-6));
  CHECK(host_device_copy_time_s(h200, kNone, 0) == 0);
}

TEST_CASE("both directions at once share the link ≈1.4× one direction, 1:2 for D2H" *
          doctest::test_suite("fitted")) {
  // hardware.md §2.3 (A100 Gen4, nvbandwidth #11 and #53): total ≈1.4× one direction, H2D gets
  // about a third. One direction here: the mean of 55.43 and 55.06 GB/s.
  const ClusterSpec h200 = load_cluster("h200");
  HostCopy h2d;
  h2d.both_directions = true;
  HostCopy d2h = h2d;
  d2h.direction = CopyDirection::device_to_host;
  const double one_way = (55.43e9 + 55.06e9) / 2;
  const double up = host_device_bandwidth(h200, kNone, h2d);
  const double down = host_device_bandwidth(h200, kNone, d2h);
  CHECK(up + down == mop::test::rel(1.4 * one_way));
  CHECK(up == mop::test::rel(1.4 * one_way / 3, 0.001));
  CHECK(down == mop::test::rel(2 * 1.4 * one_way / 3, 0.001));
}

TEST_CASE("a busy NIC on the shared PCIe switch takes its share of the GPU's link" *
          doctest::test_suite("independent")) {
  // hardware.md §2.1: the GPU's x16 link runs through its ConnectX-7's switch. Max-min fair share
  // of the 55.43 GB/s link against the NIC's 47 GB/s: the copy keeps max(55.43 − 47, 55.43 / 2).
  const ClusterSpec h200 = load_cluster("h200");
  HostCopy copy;
  copy.nic_busy = true;
  CHECK(host_device_bandwidth(h200, kNone, copy) == mop::test::rel(55.43e9 / 2));
  // A node whose NICs hang off the CPU does not share.
  ClusterSpec own_root = h200;
  own_root.node.nic_shares_pcie_switch = false;
  CHECK(host_device_bandwidth(own_root, kNone, copy) == 55.43e9);
}

TEST_CASE("eight GPUs copying at once are capped by host DRAM bandwidth" *
          doctest::test_suite("independent")) {
  // hardware.md §2.3: 8 × 55 GB/s = 440 GB/s against ≈420 GB/s of DRAM → 420 / 8 each.
  const ClusterSpec h200 = load_cluster("h200");
  HostCopy all;
  all.gpus_copying = 8;
  CHECK(host_device_bandwidth(h200, kNone, all) == mop::test::rel(420e9 / 8));
  all.gpus_copying = 4; // 4 × 55.43 = 222 GB/s: under the ceiling
  CHECK(host_device_bandwidth(h200, kNone, all) == 55.43e9);
}

TEST_CASE("an NVLink copy runs at the measured copy-engine bandwidth" *
          doctest::test_suite("fitted")) {
  // nvbandwidth device_to_device_memcpy_write_ce, 8×H200: 396.4 GB/s (hardware.md §2.2).
  const ClusterSpec h200 = load_cluster("h200");
  CHECK(nvlink_copy_time_s(h200, kNone, GiB) == mop::test::rel(GiB / 396.4e9 + 2e-6));
}

TEST_CASE("bad copies are one-sentence input errors" * doctest::test_suite("plumbing")) {
  const ClusterSpec h200 = load_cluster("h200");
  HostCopy copy;
  copy.gpus_copying = 9;
  CHECK_THROWS_WITH_AS(host_device_bandwidth(h200, kNone, copy),
                       "gpus_copying must be between 1 and the node's 8 GPUs (got 9).",
                       mop::InputError);
  CHECK_THROWS_AS(host_device_copy_time_s(h200, kNone, -1), mop::InputError);
  CHECK_THROWS_AS(nvlink_copy_time_s(h200, kNone, -1), mop::InputError);
}

} // namespace hw_models_copy_test
