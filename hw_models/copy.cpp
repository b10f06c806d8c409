#include "hw_models/copy.hpp"

#include "common/error.hpp"
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"

#include <algorithm>
#include <cmath>
#include <fmt/format.h>

namespace mop::hw {
namespace {

void check_bytes(double bytes, const char* what) {
  if (!(bytes >= 0) || !std::isfinite(bytes))
    throw InputError(
        fmt::format("{} must be a non-negative number of bytes (got {}).", what, bytes));
}

} // namespace

double host_device_bandwidth(const ClusterSpec& c, const Calibration& calibration,
                             const HostCopy& copy) {
  const NodeSpec& n = c.node;
  if (copy.gpus_copying < 1 || copy.gpus_copying > n.gpus_per_node)
    throw InputError(fmt::format("gpus_copying must be between 1 and the node's {} GPUs (got {}).",
                                 n.gpus_per_node, copy.gpus_copying));
  const bool h2d = copy.direction == CopyDirection::host_to_device;
  const double h2d_bw = calibration.h2d_bytes_per_s.value_or(n.pcie_h2d_bandwidth);
  const double d2h_bw = calibration.d2h_bytes_per_s.value_or(n.pcie_d2h_bandwidth);
  double bandwidth = h2d ? h2d_bw : d2h_bw;
  double other = 0; // the opposite direction's copy, for the host DRAM budget below
  if (copy.both_directions) {
    // hardware.md §2.3: with H2D and D2H at once the link carries ≈1.4× one direction in total,
    // split ≈1:2 in favour of D2H (A100 Gen4, NVIDIA/nvbandwidth #11, #53).
    const double duplex = calibration.pcie_duplex_factor.value_or(n.pcie_duplex_factor);
    const double one_way = (h2d_bw + d2h_bw) / 2;
    const double h2d_share = n.pcie_duplex_h2d_share;
    const double h2d_dup = duplex * one_way * h2d_share,
                 d2h_dup = duplex * one_way * (1 - h2d_share);
    bandwidth = h2d ? h2d_dup : d2h_dup;
    other = h2d ? d2h_dup : h2d_dup;
  }
  if (copy.nic_busy && n.nic_shares_pcie_switch) {
    // hardware.md §2.1: the GPU's x16 link runs through its NIC's PCIe switch, so GPUDirect RDMA
    // in the same direction shares it. Max-min fair sharing (one rule for every link, as SimGrid
    // does): the NIC asks for its bandwidth, the copy gets the rest but never below half.
    const double nic_per_gpu = n.nic_bandwidth * n.nics / n.gpus_per_node;
    const double link = bandwidth;
    bandwidth = std::max(link - nic_per_gpu, link / 2);
    other = other > 0 ? std::max(other - nic_per_gpu, other / 2) : 0;
  }
  // hardware.md §2.3: every GPU has its own x16 link, so the node's host DRAM is the shared
  // ceiling (8 × 55 GB/s against ≈420 GB/s effective).
  const double dram_demand = copy.gpus_copying * (bandwidth + other);
  if (dram_demand > n.host_memory_bandwidth_achievable)
    bandwidth *= n.host_memory_bandwidth_achievable / dram_demand;
  return bandwidth;
}

double host_device_copy_time_s(const ClusterSpec& c, const Calibration& calibration, double bytes,
                               const HostCopy& copy) {
  check_bytes(bytes, "host-device copy size");
  const double bandwidth = host_device_bandwidth(c, calibration, copy);
  if (bytes == 0)
    return 0;
  // A copy is one launch on a copy engine, charged like a kernel launch (docs/HARDWARE.md).
  return bytes / bandwidth + c.gpu.kernel_launch_s;
}

double nvlink_copy_time_s(const ClusterSpec& c, const Calibration& calibration, double bytes) {
  check_bytes(bytes, "NVLink copy size");
  if (bytes == 0)
    return 0;
  const double bandwidth =
      calibration.nvlink_copy_bytes_per_s.value_or(c.node.nvlink_copy_bandwidth);
  return bytes / bandwidth + c.gpu.kernel_launch_s;
}

} // namespace mop::hw
