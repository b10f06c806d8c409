#include "strategies/hardware.hpp"

namespace mop::strategy {

MemoryHardware memory_hardware(const hw::ClusterSpec& c) {
  MemoryHardware m;
  m.hbm_bytes = c.gpu.hbm_bytes;
  m.host_bytes = c.node.host_memory_bytes;
  m.gpus_per_node = c.node.gpus_per_node;
  m.cuda_context_bytes = c.overheads.cuda_context_bytes;
  m.nccl_bytes_per_communicator = c.overheads.nccl_buffer_bytes_per_communicator;
  m.alltoall_buffer_bytes = c.overheads.alltoall_buffer_bytes;
  m.fragmentation = c.overheads.allocator_fragmentation;
  m.fp8_transposes = c.gpu.arch != hw::GpuArch::blackwell;
  // Host memory the job cannot use: OS, page cache, data loaders, the framework. An assumption
  // (10 % of the node's memory) until a calibration measures it; docs/PLANS.md.
  m.host_reserved_bytes = 0.10 * c.node.host_memory_bytes;
  return m;
}

} // namespace mop::strategy
