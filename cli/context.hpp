#pragma once
// The arguments shared by the planning commands (CLI.md "Common arguments") and their
// resolution into a model, a cluster and a planning context.
#include "common/json_io.hpp"
#include "hw_models/cluster.hpp"
#include "strategies/frameworks.hpp"
#include "strategies/presets.hpp"
#include "workload/model_spec.hpp"
#include "workload/routing.hpp"

#include <CLI/CLI.hpp>
#include <optional>
#include <string>

namespace mop::cli {

// The plan flags (CLI.md "Common arguments"), as given.
struct PlanFlags {
  std::optional<int> tp, cp, pp, vp, ep, etp, zero, micro_batch;
  bool sp = false, no_sp = false;
  std::string cp_kind, pp_schedule, recompute, offload; // empty: not given
  std::string global_batch_tokens;                      // "4M"; empty: not given
  std::string precision; // bf16, fp8, mxfp8; empty: the configuration's, else bf16
  std::string attention_kernel; // flash, flash2, cudnn; empty: the plan family's framework
  std::optional<double> capacity_factor; // MoE token dropping (0: dropless)
  std::string rebalance;                      // none or least-loaded
  std::optional<double> rebalance_threshold;  // its lambda
};

struct PlanOptions : PlanFlags {
  std::string model, cluster, seq, plan = "mop", calibration;
  std::string from; // FRAMEWORK:FILE
  int nodes = 1;
  const CLI::Option* nodes_option = nullptr; // to tell a given --nodes from the default
  int max_simulations = 400;                 // plan, sweep, fit: the search's budget
  double hbm_headroom_gib = 2;               // HBM a fitting plan leaves free
  int global_batch = 0;
  bool json = false;
  // Uneven expert routing (workload/routing.hpp): --routing SPEC|FILE, --routing-imbalance R
  // (= imbalance:R), --routing-seed N.
  std::string routing;
  std::optional<double> routing_imbalance;
  std::int64_t routing_seed = 0;
};

// Adds --model --cluster --nodes --seq --global-batch --global-batch-tokens --plan
// --calibration --json and the plan flags (--tp --sp --cp --cp-kind --pp --vp --pp-schedule
// --ep --etp --zero --micro-batch --recompute --offload --precision).
void add_plan_options(CLI::App* cmd, PlanOptions& opt, bool with_plan = true);

struct PlanInputs {
  workload::ModelSpec model;
  hw::ClusterSpec cluster;
  int nodes = 1;
  std::int64_t seq = 0;
  int global_batch = 0;
  strategy::PlanOverrides overrides;
  sim::Dtype gemm_dtype = sim::Dtype::bf16;
  std::optional<sim::AttentionKernel> attention_kernel; // `--attention-kernel`
  std::optional<bool> compiled; // a torchtitan job's compile.enable (--from)
  std::optional<strategy::Fp8Recipe> fp8_recipe;       // a Megatron-LM launch's (--from)
  std::optional<strategy::EpDispatcher> ep_dispatcher; // a Megatron-LM launch's (--from)
  std::string precision = "bf16";
  int max_simulations = 400;
  double hbm_headroom_bytes = 0;
  // --from: the framework's run (its plan before the flags apply) and the file it came from.
  std::optional<strategy::FrameworkRun> run;
  std::string run_origin;
  // --routing: the model's expert loads per layer; `uneven` when they are not all balanced.
  workload::RoutingSpec routing;
  std::vector<std::vector<double>> expert_loads;
  bool uneven = false;
  std::uint64_t routing_id = 0; // strategy::PlanContext::routing_id
  // The context points at this object's expert loads: keep it alive while the context is used.
  strategy::PlanContext context() const;
  // The same inputs with the routing drawn from another seed (mop simulate --routing-seeds).
  void reseed_routing(std::uint64_t seed);
};

// The plan a memory or simulate command is about: the --from configuration's, else --plan's.
strategy::ResolvedPlan resolve_command_plan(const PlanOptions& opt, const PlanInputs& in);

// What the --from configuration sets that mop does not represent: one "mop: note:" line each
// on stderr (so that stdout stays one JSON object), and the same sentences as a JSON array.
Json report_not_represented(const PlanInputs& in);

// Loads the model, the cluster and the calibration and checks every number against its ceiling
// (common/limits.hpp): nodes, GPUs (nodes x GPUs per node), sequence length, global batch, the
// plan flags' degrees; the precision against the GPU (MXFP8 needs Blackwell).
PlanInputs resolve_inputs(const PlanOptions& opt);

// InputError unless nodes x gpus_per_node is at most limits::max_gpus.
void check_gpus(std::int64_t nodes, int gpus_per_node, const std::string& cluster_name);
// A --seq value ("128K") in tokens, at most limits::max_seq_tokens.
std::int64_t parse_seq(const std::string& text);
// InputError unless 1 <= threads <= limits::max_threads.
void check_threads(int threads);

} // namespace mop::cli
