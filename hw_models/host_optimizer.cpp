#include "hw_models/host_optimizer.hpp"

#include "common/error.hpp"
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"

#include <algorithm>
#include <cmath>
#include <fmt/format.h>

namespace mop::hw {

double host_adam_params_per_s(const ClusterSpec& c, const Calibration& calibration,
                              int cores_used) {
  if (cores_used < 1 || cores_used > c.node.host_cores)
    throw InputError(fmt::format("cores used by the host optimizer must be between 1 and the "
                                 "node's {} host cores (got {}).",
                                 c.node.host_cores, cores_used));
  if (auto rate = calibrated_host_adam_params_per_s(calibration, cores_used))
    return *rate;
  const HostOptimizerSpec& h = c.host_optimizer;
  const double dram_ceiling =
      calibration.host_memory_bytes_per_s.value_or(c.node.host_memory_bandwidth_achievable) /
      h.adam_bytes_per_param;
  // Outside a calibration's measured core counts, the measured rate per core of the nearest
  // count, times the cores, up to what the host's memory streams: a machine calibrated on 16
  // cores still answers for the 112 of a node.
  double per_core = h.adam_params_per_s / c.node.host_cores;
  if (!calibration.host_adam.empty()) {
    const HostAdamPoint* nearest = &calibration.host_adam.front();
    for (const HostAdamPoint& p : calibration.host_adam)
      if (std::abs(p.cores - cores_used) < std::abs(nearest->cores - cores_used))
        nearest = &p;
    per_core = nearest->params_per_s / nearest->cores;
  }
  return std::min(per_core * cores_used, dram_ceiling);
}

double host_adam_time_s(const ClusterSpec& c, const Calibration& calibration, double params,
                        int cores_used) {
  if (!(params >= 0) || !std::isfinite(params))
    throw InputError(fmt::format("parameters for the host optimizer must be a non-negative "
                                 "number (got {}).",
                                 params));
  const double rate = host_adam_params_per_s(c, calibration, cores_used);
  return params / rate;
}

} // namespace mop::hw
