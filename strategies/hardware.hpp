#pragma once
// The hardware figures the memory model reads, taken from a cluster spec.
#include "hw_models/cluster.hpp"
#include "strategies/memory.hpp"

namespace mop::strategy {

// HBM and host capacity, GPUs per node and the memory overheads in force (the cluster's,
// already overlaid by a calibration when one was given).
MemoryHardware memory_hardware(const hw::ClusterSpec& cluster);

} // namespace mop::strategy
