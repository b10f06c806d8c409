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

// Loads the model, the cluster and the calibration and checks every number against its ceiling
// (common/limits.hpp): nodes, GPUs (nodes x GPUs per node), sequence length, global batch.
PlanInputs resolve_inputs(const PlanOptions& opt);

// InputError unless nodes x gpus_per_node is at most limits::max_gpus.
void check_gpus(std::int64_t nodes, int gpus_per_node, const std::string& cluster_name);
// A --seq value ("128K") in tokens, at most limits::max_seq_tokens.
std::int64_t parse_seq(const std::string& text);
// InputError unless 1 <= threads <= limits::max_threads.
void check_threads(int threads);

} // namespace mop::cli
