// A routing histogram file (JSON or CSV) -> expert loads -> each rank's load, as `--routing FILE`
// reads it for tiny-moe (8 experts, one MoE layer). An InputError is the accepted answer to a
// bad file; anything else is a finding, and so are loads that are not finite, negative, or do
// not average 1.
#include "common/error.hpp"
#include "fuzz/fuzz_support.hpp"
#include "strategies/routing.hpp"
#include "workload/catalog.hpp"
#include "workload/routing.hpp"

#include <cmath>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace mop;
  static fuzz::ScratchFile file(".routing");
  static const workload::ModelSpec model = workload::load_model("tiny-moe");
  try {
    const workload::RoutingSpec spec = workload::parse_routing(file.write(data, size));
    const auto loads = workload::expert_loads(spec, model);
    MOP_FUZZ_CHECK(loads.size() == model.layers.size());
    for (const auto& row : loads) {
      if (row.empty())
        continue;
      MOP_FUZZ_CHECK(row.size() == 8);
      double sum = 0;
      for (double x : row) {
        MOP_FUZZ_CHECK(std::isfinite(x) && x >= 0);
        sum += x;
      }
      MOP_FUZZ_CHECK(std::fabs(sum / 8 - 1) < 1e-9);
    }
    for (int ep : {1, 2, 4, 8}) {
      strategy::Plan p;
      p.moe.ep = ep;
      const strategy::RankLoads r = strategy::rank_loads(p, model, loads);
      const double worst = strategy::worst_rank_load(r);
      MOP_FUZZ_CHECK(std::isfinite(worst) && worst >= 1 && worst <= 8 + 1e-9);
      const strategy::HotRank h = strategy::hottest_rank(r);
      MOP_FUZZ_CHECK(h.ep_rank >= 0 && h.ep_rank < ep);
    }
  } catch (const InputError&) {
  }
  return 0;
}
