// Cluster JSON text -> ClusterSpec, then what `mop hw show` and `mop hw collective` compute
// from it. An InputError is the accepted answer to a bad file; anything else is a finding.
#include "common/error.hpp"
#include "common/json_io.hpp"
#include "fuzz/fuzz_support.hpp"
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "hw_models/collective.hpp"
#include "hw_models/compute.hpp"
#include "strategies/hardware.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace mop;
  try {
    const Json json = parse_json(fuzz::as_text(data, size), "cluster.json");
    const hw::ClusterSpec c = hw::cluster_from_json(json, "cluster.json", "fuzz");
    MOP_FUZZ_CHECK(c.node.gpus_per_node > 0);
    MOP_FUZZ_CHECK(fuzz::sane(c.gpu.hbm_bytes) && c.gpu.hbm_bytes > 0);
    MOP_FUZZ_CHECK(fuzz::sane(c.node.host_memory_bytes));
    (void)hw::cluster_to_json(c).dump();

    const strategy::MemoryHardware mh = strategy::memory_hardware(c);
    MOP_FUZZ_CHECK(fuzz::sane(mh.hbm_bytes) && fuzz::sane(mh.host_bytes));
    MOP_FUZZ_CHECK(fuzz::sane(mh.cuda_context_bytes) && fuzz::sane(mh.fragmentation));

    const hw::Calibration none;
    MOP_FUZZ_CHECK(fuzz::sane(hw::gemm_time_s(c, none, 4096, 4096, 4096, hw::Dtype::bf16)));
    hw::AttentionShape a;
    a.q_len = a.kv_len = 4096;
    MOP_FUZZ_CHECK(fuzz::sane(hw::attention_fwd_time_s(c, none, a)));
    MOP_FUZZ_CHECK(fuzz::sane(hw::attention_bwd_time_s(c, none, a)));
    MOP_FUZZ_CHECK(fuzz::sane(hw::memory_bound_time_s(c, none, 1 << 30)));
    const hw::GroupShape groups[] = {{c.node.gpus_per_node, 1}, {c.node.gpus_per_node, 2}, {1, 4}};
    for (const hw::GroupShape g : groups)
      for (hw::CollectiveOp op : {hw::CollectiveOp::all_reduce, hw::CollectiveOp::all_gather,
                                  hw::CollectiveOp::reduce_scatter, hw::CollectiveOp::all_to_all,
                                  hw::CollectiveOp::send_recv})
        for (double bytes : {8.0, 1e6, 1e9}) {
          const hw::CollectiveCost cost = hw::collective_cost(c, none, op, bytes, g);
          MOP_FUZZ_CHECK(fuzz::sane(cost.time_s) && fuzz::sane(cost.algbw) &&
                         fuzz::sane(cost.busbw));
        }
  } catch (const InputError&) {
  }
  return 0;
}
