#include "common/error.hpp"
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "hw_models/memory_overheads.hpp"

#include <doctest/doctest.h>

namespace hw_models_memory_overheads_test {

using namespace mop::hw;
using mop::Json;

TEST_CASE("memory overhead defaults are hardware.md §5's suggested values" *
          doctest::test_suite("plumbing")) {
  const MemoryOverheads d;
  // §5 "Suggested defaults": 0.5 GiB context, 0.75 GiB per communicator (+0.3 GiB with NVLS,
  // +3 GiB after the first intra-node AlltoAll), ×1.10 fragmentation with expandable_segments.
  CHECK(d.cuda_context_bytes == 0.5 * 1073741824.0);
  CHECK(d.nccl_buffer_bytes_per_communicator == 0.75 * 1073741824.0);
  CHECK(d.nvls_buffer_bytes_per_communicator == 0.3 * 1073741824.0);
  CHECK(d.alltoall_buffer_bytes == 3.0 * 1073741824.0);
  CHECK(d.allocator_fragmentation == 0.10);
}

TEST_CASE("a cluster file overrides the named defaults, and a calibration overrides the cluster" *
          doctest::test_suite("plumbing")) {
  ClusterSpec c = load_cluster("h200");
  c.overheads = apply_overrides(
      MemoryOverheads{},
      read_memory_overheads(Json{{"nccl_buffer_bytes_per_communicator", 1e9}}, "test"));
  CHECK(c.overheads.nccl_buffer_bytes_per_communicator == 1e9);
  CHECK(c.overheads.cuda_context_bytes == 0.5 * 1073741824.0); // untouched
  Calibration cal;
  cal.overheads = read_memory_overheads(Json{{"allocator_fragmentation", 0.25}}, "test");
  const MemoryOverheads m = memory_overheads(c, cal);
  CHECK(m.allocator_fragmentation == 0.25);
  CHECK(m.nccl_buffer_bytes_per_communicator == 1e9);
  CHECK(memory_overheads(c, Calibration{}).allocator_fragmentation == 0.10);
}

TEST_CASE("bad overheads: negative bytes, a fragmentation outside [0, 1], an unknown field" *
          doctest::test_suite("plumbing")) {
  CHECK_THROWS_WITH_AS(read_memory_overheads(Json{{"cuda_context_bytes", -1}}, "c.json"),
                       "c.json: field 'cuda_context_bytes' must be a non-negative number of "
                       "bytes (got -1).",
                       mop::InputError);
  CHECK_THROWS_AS(read_memory_overheads(Json{{"allocator_fragmentation", 1.5}}, "c.json"),
                  mop::InputError);
  CHECK_THROWS_AS(read_memory_overheads(Json{{"context_bytes", 1}}, "c.json"), mop::InputError);
}

} // namespace hw_models_memory_overheads_test
