#include "hw_models/memory_overheads.hpp"

#include "common/error.hpp"
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"

#include <array>
#include <cmath>
#include <fmt/format.h>

namespace mop::hw {
namespace {

constexpr std::array<const char*, 5> kFields = {
    "cuda_context_bytes", "nccl_buffer_bytes_per_communicator",
    "nvls_buffer_bytes_per_communicator", "alltoall_buffer_bytes", "allocator_fragmentation"};

} // namespace

MemoryOverheadOverrides read_memory_overheads(const Json& object, const std::string& origin) {
  const JsonFields f(object, origin);
  for (const auto& [key, value] : object.items()) {
    bool known = false;
    for (const char* k : kFields)
      known = known || key == k;
    if (!known)
      throw InputError(fmt::format("{}: field '{}' is not known; allowed: {}.", origin, key,
                                   "cuda_context_bytes, nccl_buffer_bytes_per_communicator, "
                                   "nvls_buffer_bytes_per_communicator, alltoall_buffer_bytes, "
                                   "allocator_fragmentation"));
  }
  auto bytes = [&](const char* key) -> std::optional<double> {
    if (!f.has(key))
      return std::nullopt;
    const double v = f.number_or(key, 0);
    if (v < 0)
      f.fail(key, "a non-negative number of bytes");
    return v;
  };
  MemoryOverheadOverrides o;
  o.cuda_context_bytes = bytes("cuda_context_bytes");
  o.nccl_buffer_bytes_per_communicator = bytes("nccl_buffer_bytes_per_communicator");
  o.nvls_buffer_bytes_per_communicator = bytes("nvls_buffer_bytes_per_communicator");
  o.alltoall_buffer_bytes = bytes("alltoall_buffer_bytes");
  if (f.has("allocator_fragmentation")) {
    const double v = f.number_or("allocator_fragmentation", 0);
    if (v < 0 || v > 1)
      f.fail("allocator_fragmentation", "a fraction between 0 and 1 (0.10 means +10 %)");
    o.allocator_fragmentation = v;
  }
  return o;
}

MemoryOverheads apply_overrides(MemoryOverheads base, const MemoryOverheadOverrides& o) {
  base.cuda_context_bytes = o.cuda_context_bytes.value_or(base.cuda_context_bytes);
  base.nccl_buffer_bytes_per_communicator =
      o.nccl_buffer_bytes_per_communicator.value_or(base.nccl_buffer_bytes_per_communicator);
  base.nvls_buffer_bytes_per_communicator =
      o.nvls_buffer_bytes_per_communicator.value_or(base.nvls_buffer_bytes_per_communicator);
  base.alltoall_buffer_bytes = o.alltoall_buffer_bytes.value_or(base.alltoall_buffer_bytes);
  base.allocator_fragmentation = o.allocator_fragmentation.value_or(base.allocator_fragmentation);
  return base;
}

MemoryOverheads memory_overheads(const ClusterSpec& cluster, const Calibration& calibration) {
  return apply_overrides(cluster.overheads, calibration.overheads);
}

} // namespace mop::hw
