// Calibration JSON text -> Calibration, then the overlay on the h200 node type: the memory
// overheads and the calibrated lookups the cost functions make. An InputError is the accepted
// answer to a bad file; anything else is a finding.
#include "common/error.hpp"
#include "common/json_io.hpp"
#include "fuzz/fuzz_support.hpp"
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "hw_models/collective.hpp"
#include "hw_models/compute.hpp"
#include "hw_models/host_optimizer.hpp"
#include "hw_models/memory_overheads.hpp"

#include <cmath>
#include <optional>
#include <vector>

namespace {

void check_lookup(std::optional<double> v) {
  if (v)
    MOP_FUZZ_CHECK(mop::fuzz::sane(*v));
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace mop;
  static const hw::ClusterSpec h200 = hw::load_cluster("h200");
  try {
    const Json json = parse_json(fuzz::as_text(data, size), "calibration.json");
    const hw::Calibration cal = hw::calibration_from_json(json, "calibration.json");
    const hw::MemoryOverheads o = hw::memory_overheads(h200, cal);
    MOP_FUZZ_CHECK(fuzz::sane(o.cuda_context_bytes) && fuzz::sane(o.alltoall_buffer_bytes));
    MOP_FUZZ_CHECK(fuzz::sane(o.nccl_buffer_bytes_per_communicator) &&
                   fuzz::sane(o.nvls_buffer_bytes_per_communicator));
    MOP_FUZZ_CHECK(fuzz::sane(o.allocator_fragmentation));

    // Each measured key, at its own size and 1.5 times it, and through the cost function.
    // (1.5x a measured size only where that is still a finite number)
    auto sizes = [](double x) {
      return std::isfinite(x * 1.5) ? std::vector<double>{x, x * 1.5} : std::vector<double>{x};
    };
    for (const hw::GemmPoint& g : cal.gemm)
      for (double m : sizes(g.m)) {
        check_lookup(hw::calibrated_gemm_time_s(cal, g.dtype, g.groups, m, g.n, g.k));
        if (g.groups == 1)
          MOP_FUZZ_CHECK(fuzz::sane(hw::gemm_time_s(h200, cal, m, g.n, g.k, g.dtype)));
      }
    for (const hw::AttentionPoint& a : cal.attention) {
      check_lookup(hw::calibrated_attention_time_s(cal, a.backward, a.shape));
      MOP_FUZZ_CHECK(fuzz::sane(a.backward ? hw::attention_bwd_time_s(h200, cal, a.shape)
                                           : hw::attention_fwd_time_s(h200, cal, a.shape)));
    }
    for (const hw::CollectivePoint& c : cal.collectives)
      for (double bytes : sizes(c.bytes)) {
        check_lookup(hw::calibrated_collective_time_s(cal, c.op, c.group, bytes));
        try {
          const hw::CollectiveCost cost = hw::collective_cost(h200, cal, c.op, bytes, c.group);
          MOP_FUZZ_CHECK(fuzz::sane(cost.time_s));
        } catch (const InputError&) { // a group the h200 node cannot hold
        }
      }
    for (const hw::HostAdamPoint& h : cal.host_adam)
      check_lookup(hw::calibrated_host_adam_params_per_s(cal, h.cores));
    for (int cores : {1, h200.node.host_cores})
      MOP_FUZZ_CHECK(fuzz::sane(hw::host_adam_params_per_s(h200, cal, cores)));
    MOP_FUZZ_CHECK(fuzz::sane(hw::memory_bound_time_s(h200, cal, 1 << 30)));
  } catch (const InputError&) {
  }
  return 0;
}
