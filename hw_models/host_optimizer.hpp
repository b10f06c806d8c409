#pragma once
// The optimizer step on the host CPU (DeepSpeed CPU-Adam style): fp32 master weights and both
// Adam moments live in host memory. docs/HARDWARE.md has the model and its sources.
namespace mop::hw {

struct ClusterSpec;
struct Calibration;

// AdamW parameters updated per second by one node using `cores_used` of its host cores (all the
// ranks of the node together): linear in cores (hardware.md §4: "scale it down linearly when
// fewer cores are available") up to the host DRAM ceiling, host memory bandwidth / bytes moved
// per parameter. A calibration table of measured rates by core count overrides it in its range.
double host_adam_params_per_s(const ClusterSpec& cluster, const Calibration& calibration,
                              int cores_used);
// Time of one optimizer step over `params` parameters on one node.
double host_adam_time_s(const ClusterSpec& cluster, const Calibration& calibration, double params,
                        int cores_used);

} // namespace mop::hw
