#include "validation/compare.hpp"

#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "planner/evaluate.hpp"
#include "strategies/hardware.hpp"

#include <cmath>
#include <limits>

namespace mop::validation {

namespace {

bool time_like(const std::string& metric) {
  return metric != "peak_mem_gib";
}

double mape(const std::vector<Point>& points, auto keep) {
  double sum = 0;
  int n = 0;
  for (const Point& p : points)
    if (p.predicted && keep(p)) {
      sum += std::fabs(p.rel_error);
      ++n;
    }
  return n ? sum / n : std::numeric_limits<double>::quiet_NaN();
}

} // namespace

Report validate(const std::vector<Row>& rows, planner::Lowering lowering) {
  Report rep;
  rep.rows = static_cast<int>(rows.size());
  for (const Row& row : rows) {
    const Translation t = translate(row);
    std::string reason = t.reason;
    // Predictions for this row, by metric.
    std::vector<std::pair<std::string, double>> predicted;
    if (t.plan) {
      try {
        const hw::ClusterSpec cluster = hw::load_cluster(t.cluster_id);
        const strategy::MemoryHardware mh = strategy::memory_hardware(cluster);
        strategy::LoweringContext lc{&*t.model, row.seq_len, cluster.node.gpus_per_node, mh, {}};
        lc.gemm_dtype = row.precision == "fp8" ? sim::Dtype::fp8 : sim::Dtype::bf16;
        const planner::StepEvaluation e =
            planner::evaluate_step(*t.plan, lc, cluster, hw::Calibration{}, 16, lowering);
        const double gpus = row.num_gpus;
        const double tflops = e.model_flops_per_step / e.step_time_s / gpus / 1e12;
        double peak = 0;
        for (const sim::ClassResult& c : e.result.classes) {
          const double dynamic = c.memory.at_peak[static_cast<int>(sim::MemoryKind::activations)] +
                                 c.memory.at_peak[static_cast<int>(sim::MemoryKind::comm_buffers)];
          peak = std::max(peak, c.memory.peak_hbm_bytes + mh.fragmentation * dynamic);
        }
        predicted = {{"tokens_per_sec_per_gpu", e.tokens_per_step / e.step_time_s / gpus},
                     {"step_time_s", e.step_time_s},
                     {"tflops_per_gpu", tflops},
                     // MFU against the dense BF16 peak, as most sources compute it.
                     {"mfu", tflops * 1e12 / cluster.gpu.peak_flops_bf16},
                     {"peak_mem_gib", peak / (1024.0 * 1024.0 * 1024.0)}};
        ++rep.rows_predicted;
        if (e.program)
          ++rep.rows_predicted_by_program;
      } catch (const std::exception& ex) {
        reason = std::string("the simulation failed: ") + ex.what();
      }
    }
    for (const auto& [metric, value] : row.measured.items()) {
      Point p;
      p.id = row.id;
      p.metric = metric;
      p.measured = value.is_number() ? value.get<double>() : 0;
      p.moe = t.model && t.model->is_moe();
      p.time_like = time_like(metric);
      for (const auto& [name, v] : predicted)
        if (name == metric)
          p.predicted = v;
      if (p.predicted && p.measured != 0)
        p.rel_error = (*p.predicted - p.measured) / p.measured;
      else if (!p.predicted)
        p.reason = reason.empty() ? "mop does not predict this metric yet." : reason;
      rep.points.push_back(std::move(p));
    }
  }
  rep.mape_time = mape(rep.points, [](const Point& p) { return p.time_like; });
  rep.mape_memory = mape(rep.points, [](const Point& p) { return !p.time_like; });
  rep.mape_time_dense = mape(rep.points, [](const Point& p) { return p.time_like && !p.moe; });
  rep.mape_time_moe = mape(rep.points, [](const Point& p) { return p.time_like && p.moe; });
  rep.mape_memory_dense = mape(rep.points, [](const Point& p) { return !p.time_like && !p.moe; });
  rep.mape_memory_moe = mape(rep.points, [](const Point& p) { return !p.time_like && p.moe; });
  return rep;
}

} // namespace mop::validation
