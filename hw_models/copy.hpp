#pragma once
// Copies: host↔device over one GPU's PCIe link (pinned memory, copy engine) and GPU→GPU over
// NVLink. Pure functions; the sharing rules are in docs/HARDWARE.md.
namespace mop::hw {

struct ClusterSpec;
struct Calibration;

enum class CopyDirection { host_to_device, device_to_host };

struct HostCopy {
  CopyDirection direction = CopyDirection::host_to_device;
  bool both_directions = false; // the opposite direction copies at the same time on this GPU
  bool nic_busy = false;        // this GPU's NIC moves RDMA traffic the same way through the
                                // PCIe switch they share
  int gpus_copying = 1;         // GPUs of the node copying at once (host DRAM is shared)
};

// Bandwidth one copy gets, bytes/s.
double host_device_bandwidth(const ClusterSpec& cluster, const Calibration& calibration,
                             const HostCopy& copy = {});
double host_device_copy_time_s(const ClusterSpec& cluster, const Calibration& calibration,
                               double bytes, const HostCopy& copy = {});
// cudaMemcpyPeer-style copy engine GPU→GPU inside a node, one direction.
double nvlink_copy_time_s(const ClusterSpec& cluster, const Calibration& calibration, double bytes);

} // namespace mop::hw
