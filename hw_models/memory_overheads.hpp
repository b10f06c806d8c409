#pragma once
// Device memory that is not model state: CUDA context, NCCL buffers, allocator fragmentation.
// Named defaults from hardware.md §5 (suggested defaults, DERIVED from the measurements listed
// there); a cluster file's "overheads" object or a calibration file's overrides them.
#include "common/json_io.hpp"

#include <optional>
#include <string>

namespace mop::hw {

struct ClusterSpec;
struct Calibration;

inline constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

struct MemoryOverheads {
  // Per process per GPU with lazy module loading: 287 MB (pytorch/pytorch PR #86509) to ~430 MB
  // (issues #107667, #109888); hardware.md §5 suggests 0.5 GiB.
  double cuda_context_bytes = 0.5 * kGiB;
  // Per NCCL communicator: 544–688 MB per group on A100 (NVIDIA/nccl #964), linear in channels
  // (#864, #986); hardware.md §5 suggests 0.75 GiB.
  double nccl_buffer_bytes_per_communicator = 0.75 * kGiB;
  // Extra per communicator when NVLS is active: nvlsPerRankSize 288 MiB on 8×H200
  // (vllm-project/vllm #9699); hardware.md §5 suggests 0.3 GiB.
  double nvls_buffer_bytes_per_communicator = 0.3 * kGiB;
  // Once per process, the first intra-node all-to-all: 1.06 → 4.34 GB per GPU on 8×H100
  // (NVIDIA/nccl #1685); hardware.md §5 suggests 3 GiB.
  double alltoall_buffer_bytes = 3.0 * kGiB;
  // Fraction added to dynamic (activation) memory by the caching allocator: ×1.10 with
  // expandable_segments, ×1.25 without (GMLake arXiv 2401.08156, torchtune #1185).
  double allocator_fragmentation = 0.10;
};

// Fields a cluster or calibration file may set; unset ones keep the value below them.
struct MemoryOverheadOverrides {
  std::optional<double> cuda_context_bytes;
  std::optional<double> nccl_buffer_bytes_per_communicator;
  std::optional<double> nvls_buffer_bytes_per_communicator;
  std::optional<double> alltoall_buffer_bytes;
  std::optional<double> allocator_fragmentation;
};

// Reads an "overheads" object (bytes are non-negative numbers, the fragmentation a fraction in
// [0, 1]); `origin` names the file and section in error sentences.
MemoryOverheadOverrides read_memory_overheads(const Json& object, const std::string& origin);
MemoryOverheads apply_overrides(MemoryOverheads base, const MemoryOverheadOverrides& overrides);
// The overheads in force: the cluster's, then the calibration's overrides.
MemoryOverheads memory_overheads(const ClusterSpec& cluster, const Calibration& calibration);

} // namespace mop::hw
