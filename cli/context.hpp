#pragma once
// The arguments shared by the planning commands (CLI.md "Common arguments") and their
// resolution into a model, a cluster and a planning context.
#include "hw_models/cluster.hpp"
#include "strategies/presets.hpp"
#include "workload/model_spec.hpp"

#include <CLI/CLI.hpp>
#include <string>

namespace mop::cli {

struct PlanOptions {
  std::string model, cluster, seq, plan = "mop", calibration;
  int nodes = 1;
  int global_batch = 0;
  bool json = false;
};

// Adds --model --cluster --nodes --seq --global-batch --plan --calibration --json.
void add_plan_options(CLI::App* cmd, PlanOptions& opt, bool with_plan = true);

struct PlanInputs {
  workload::ModelSpec model;
  hw::ClusterSpec cluster;
  int nodes = 1;
  std::int64_t seq = 0;
  int global_batch = 0;
  strategy::PlanContext context() const;
};

PlanInputs resolve_inputs(const PlanOptions& opt);

} // namespace mop::cli
