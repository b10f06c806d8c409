#include "cli/context.hpp"

#include "common/error.hpp"
#include "common/limits.hpp"
#include "common/units.hpp"
#include "hw_models/calibration.hpp"
#include "strategies/hardware.hpp"
#include "workload/catalog.hpp"

#include <fmt/format.h>

namespace mop::cli {

void add_plan_options(CLI::App* cmd, PlanOptions& opt, bool with_plan) {
  cmd->add_option("--model", opt.model, "catalog id (mop model list) or a config.json path")
      ->required();
  cmd->add_option("--cluster", opt.cluster, "node type (mop hw list) or a cluster JSON path")
      ->required();
  cmd->add_option("--nodes", opt.nodes, "number of nodes")->capture_default_str();
  cmd->add_option("--seq", opt.seq, "sequence length: 4096, 4K, 128K, 1M (K = 1024)")->required();
  cmd->add_option("--global-batch", opt.global_batch,
                  "sequences per optimizer step (default: at least 4M tokens, a multiple of the "
                  "data-parallel replicas)");
  if (with_plan)
    cmd->add_option("--plan", opt.plan,
                    "preset (fsdp2, megatron, ulysses-zero3, mop), auto-tuned, or a plan JSON")
        ->capture_default_str();
  cmd->add_option("--calibration", opt.calibration, "calibration JSON from mop calibrate");
  cmd->add_flag("--json", opt.json, std::string("print one JSON object"));
}

void check_gpus(std::int64_t nodes, int gpus_per_node, const std::string& cluster_name) {
  if (nodes * gpus_per_node > limits::max_gpus)
    throw InputError(fmt::format("{} nodes of {} GPUs ({}) are {} GPUs, above mop's ceiling of {}.",
                                 nodes, gpus_per_node, quote_for_message(cluster_name),
                                 nodes * gpus_per_node, limits::max_gpus));
}

void check_threads(int threads) {
  if (threads < 1 || threads > limits::max_threads)
    throw InputError(
        fmt::format("--threads must be between 1 and {} (got {}).", limits::max_threads, threads));
}

PlanInputs resolve_inputs(const PlanOptions& opt) {
  PlanInputs in;
  if (opt.nodes <= 0 || opt.nodes > limits::max_gpus)
    throw InputError(fmt::format("--nodes must be a number of nodes from 1 to {} (got {}).",
                                 limits::max_gpus, opt.nodes));
  if (opt.global_batch < 0 || opt.global_batch > limits::max_batch_sequences)
    throw InputError(fmt::format("--global-batch must be a number of sequences from 1 to {} "
                                 "(got {}).",
                                 limits::max_batch_sequences, opt.global_batch));
  in.seq = parse_seq(opt.seq);
  in.model = workload::load_model(opt.model);
  in.cluster = hw::load_cluster(opt.cluster);
  check_gpus(opt.nodes, in.cluster.node.gpus_per_node, in.cluster.name);
  if (!opt.calibration.empty()) {
    const hw::Calibration cal = hw::load_calibration(opt.calibration);
    in.cluster.overheads = hw::memory_overheads(in.cluster, cal);
  }
  in.nodes = opt.nodes;
  in.global_batch = opt.global_batch;
  return in;
}

std::int64_t parse_seq(const std::string& text) {
  const std::int64_t seq = parse_count(text, "--seq");
  if (seq > limits::max_seq_tokens)
    throw InputError(fmt::format("--seq {} is {} tokens, above mop's ceiling of {} (64M).",
                                 quote_for_message(text), seq, limits::max_seq_tokens));
  return seq;
}

strategy::PlanContext PlanInputs::context() const {
  strategy::PlanContext c;
  c.model = &model;
  c.seq = seq;
  c.cluster = strategy::ClusterShape{cluster.node.gpus_per_node, nodes};
  c.hw = strategy::memory_hardware(cluster);
  c.global_batch = global_batch;
  return c;
}

} // namespace mop::cli
