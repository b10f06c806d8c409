#include "cli/context.hpp"
#include "cli/output.hpp"
#include "cli/plan.hpp"

#include "common/error.hpp"
#include "common/file_io.hpp"
#include "common/limits.hpp"
#include "common/units.hpp"
#include "hw_models/calibration.hpp"
#include "strategies/hardware.hpp"
#include "workload/catalog.hpp"

#include <cstdio>
#include <fmt/format.h>

namespace mop::cli {

namespace {

void add_plan_flags(CLI::App* cmd, PlanFlags& f) {
  const char* group = "Plan flags (fix these parts of the plan; on plan, sweep and fit they "
                      "constrain the search)";
  auto degree = [&](const char* flag, std::optional<int>& v, const char* what) {
    cmd->add_option(flag, v, what)->group(group);
  };
  degree("--tp", f.tp,
         "tensor parallel degree of attention (dense MLPs and the vocabulary follow "
         "where the family ties them)");
  CLI::Option* sp = cmd->add_flag("--sp", f.sp, "sequence parallelism with TP")->group(group);
  cmd->add_flag("--no-sp", f.no_sp, "no sequence parallelism: TP all-reduces whole activations")
      ->excludes(sp)
      ->group(group);
  degree("--cp", f.cp, "context parallel degree");
  cmd->add_option("--cp-kind", f.cp_kind,
                  "ring, ulysses or hybrid (Ulysses in a node, ring "
                  "across nodes)")
      ->check(CLI::IsMember({"ring", "ulysses", "hybrid"}))
      ->group(group);
  degree("--pp", f.pp, "pipeline stages");
  degree("--vp", f.vp, "virtual stages per rank (more than 1: interleaved 1F1B)");
  cmd->add_option("--pp-schedule", f.pp_schedule, "gpipe, 1f1b, interleaved-1f1b or zero-bubble")
      ->check(CLI::IsMember({"gpipe", "1f1b", "interleaved-1f1b", "zero-bubble"}))
      ->group(group);
  degree("--ep", f.ep, "expert parallel degree");
  degree("--etp", f.etp, "expert tensor parallel degree");
  degree("--zero", f.zero, "ZeRO stage of every layer kind: 0, 1, 2 or 3 (3 = FSDP)");
  degree("--micro-batch", f.micro_batch, "sequences per micro-batch");
  cmd->add_option("--recompute", f.recompute,
                  "activation recompute of every layer kind: none, "
                  "selective or full")
      ->check(CLI::IsMember({"none", "selective", "full"}))
      ->group(group);
  cmd->add_option("--offload", f.offload,
                  "what lives on the host: none, or a comma-separated list of params, grads, opt "
                  "(state and step on the CPU), act (checkpointed activations)")
      ->group(group);
  cmd->add_option("--capacity-factor", f.capacity_factor,
                  "MoE token dropping: each expert takes at most this many times its mean "
                  "tokens, the rest dropped (0: dropless)")
      ->group(group);
  cmd->add_option("--rebalance", f.rebalance,
                  "MoE expert-load rebalancing at run time: none, or least-loaded (LLEP: a "
                  "layer's excess tokens and the weights of their experts spill to the least "
                  "loaded ranks)")
      ->check(CLI::IsMember({"none", "least-loaded"}))
      ->group(group);
  cmd->add_option("--rebalance-threshold", f.rebalance_threshold,
                  "least-loaded rebalancing starts when a rank holds more than this many times "
                  "the mean tokens (default 1.3)")
      ->group(group);
  cmd->add_option("--precision", f.precision,
                  "precision of the layers' GEMMs: bf16 (default), fp8 or mxfp8 (Blackwell)")
      ->check(CLI::IsMember({"bf16", "fp8", "mxfp8"}))
      ->group(group);
  cmd->add_option("--attention-kernel", f.attention_kernel,
                  "the attention kernel the framework runs: cudnn, flash2 (FlashAttention-2, "
                  "PyTorch SDPA's flash backend) or flash (the newest FlashAttention); default: "
                  "the plan family's framework (docs/HARDWARE.md)")
      ->check(CLI::IsMember({"flash", "flash2", "cudnn"}))
      ->group(group);
}

strategy::PlanOverrides overrides_of(const PlanFlags& f) {
  auto degree = [](const char* flag, const std::optional<int>& v, std::int64_t low,
                   std::int64_t high) {
    if (v && (*v < low || *v > high))
      throw InputError(
          fmt::format("{} must be a whole number from {} to {} (got {}).", flag, low, high, *v));
    return v;
  };
  strategy::PlanOverrides o;
  o.tp = degree("--tp", f.tp, 1, limits::max_gpus);
  if (f.sp || f.no_sp)
    o.sp = f.sp;
  o.cp = degree("--cp", f.cp, 1, limits::max_gpus);
  if (!f.cp_kind.empty())
    o.cp_kind = strategy::parse_cp_kind(f.cp_kind, "--cp-kind");
  o.pp = degree("--pp", f.pp, 1, limits::max_gpus);
  o.vp = degree("--vp", f.vp, 1, limits::max_layers);
  if (!f.pp_schedule.empty())
    o.schedule = strategy::parse_schedule(f.pp_schedule, "--pp-schedule");
  o.ep = degree("--ep", f.ep, 1, limits::max_gpus);
  o.etp = degree("--etp", f.etp, 1, limits::max_gpus);
  o.zero = degree("--zero", f.zero, 0, 3);
  o.micro_batch = degree("--micro-batch", f.micro_batch, 1, limits::max_batch_sequences);
  if (!f.recompute.empty())
    o.recompute = strategy::parse_recompute(f.recompute, "--recompute");
  if (!f.offload.empty())
    o.offload = strategy::parse_offload(f.offload);
  if (f.capacity_factor) {
    if (!(*f.capacity_factor == 0 || (*f.capacity_factor >= 0.01 && *f.capacity_factor <= 1000)))
      throw InputError(fmt::format("--capacity-factor must be 0 (dropless) or between 0.01 and "
                                   "1000 (got {}).",
                                   *f.capacity_factor));
    o.capacity_factor = *f.capacity_factor;
  }
  if (!f.rebalance.empty())
    o.rebalance =
        f.rebalance == "none" ? strategy::Rebalance::none : strategy::Rebalance::least_loaded;
  if (f.rebalance_threshold) {
    if (!(*f.rebalance_threshold >= 1 && *f.rebalance_threshold <= 1000))
      throw InputError(fmt::format("--rebalance-threshold must be between 1 and 1000 (got {}).",
                                   *f.rebalance_threshold));
    o.rebalance_threshold = *f.rebalance_threshold;
  }
  return o;
}

sim::Dtype precision_of(const std::string& precision, const hw::ClusterSpec& cluster) {
  if (precision == "bf16")
    return sim::Dtype::bf16;
  // MXFP8 (32-element blocks with E8M0 scales) is a Blackwell tensor-core format; it runs at
  // the FP8 rate there. Hopper runs per-tensor or blockwise-scaled FP8 (--precision fp8).
  if (precision == "mxfp8" && cluster.gpu.arch != hw::GpuArch::blackwell)
    throw InputError(fmt::format("--precision mxfp8 needs a Blackwell GPU; {} is {} ({}): use "
                                 "--precision {}.",
                                 quote_for_message(cluster.name), cluster.gpu.name,
                                 hw::gpu_arch_name(cluster.gpu.arch),
                                 cluster.gpu.peak_flops_fp8 > 0 ? "fp8" : "bf16"));
  // Ampere (A100) has no FP8 tensor cores: its cluster file says peak_flops_fp8 = 0.
  if (cluster.gpu.peak_flops_fp8 <= 0)
    throw InputError(fmt::format("--precision {} needs FP8 tensor cores (Hopper or Blackwell); "
                                 "{} is {} ({}), which has none: use --precision bf16.",
                                 precision, quote_for_message(cluster.name), cluster.gpu.name,
                                 hw::gpu_arch_name(cluster.gpu.arch)));
  return sim::Dtype::fp8;
}

} // namespace

void add_plan_options(CLI::App* cmd, PlanOptions& opt, bool with_plan) {
  cmd->add_option(
      "--model", opt.model,
      "catalog id (mop model list), a config.json path or a Hugging Face snapshot folder "
      "(required unless --from "
      "describes the model)");
  cmd->add_option("--cluster", opt.cluster, "node type (mop hw list) or a cluster JSON path")
      ->required();
  opt.nodes_option = cmd->add_option("--nodes", opt.nodes,
                                     "number of nodes (default: the --from launcher's, else 1)")
                         ->capture_default_str();
  cmd->add_option("--seq", opt.seq,
                  "sequence length: 4096, 4K, 128K, 1M (K = 1024) (required unless --from states "
                  "it)");
  CLI::Option* from =
      cmd->add_option("--from", opt.from,
                      "a framework's run configuration as the plan: megatron:FILE (Megatron-LM "
                      "arguments or launch script), torchtitan:FILE (job TOML or its "
                      "--parallelism.* overrides) or deepspeed:FILE (ds.json); the model, "
                      "sequence, batch and nodes come from it where it says");
  cmd->add_option("--global-batch", opt.global_batch,
                  "sequences per optimizer step (default: at least 4M tokens, a multiple of the "
                  "data-parallel replicas)");
  if (!with_plan)
    cmd->add_option("--max-simulations", opt.max_simulations,
                    "the search's budget of simulated plans: past it, the best so far without "
                    "the proof that the rest are slower")
        ->capture_default_str();
  if (with_plan)
    cmd->add_option("--plan", opt.plan,
                    "preset (fsdp2, megatron, ulysses-zero3, mop), auto-tuned, or a plan JSON")
        ->capture_default_str()
        ->excludes(from);
  cmd->add_option("--global-batch-tokens", opt.global_batch_tokens,
                  "the global batch in tokens (4M = 4,194,304), a whole number of sequences "
                  "(torchtitan counts it so)")
      ->excludes("--global-batch");
  add_plan_flags(cmd, opt);
  const char* routing = "Expert routing (uneven: every expert-parallel rank simulated)";
  CLI::Option* spec =
      cmd->add_option("--routing", opt.routing,
                      "how the router spreads tokens over experts: balanced (default), "
                      "imbalance:R (max/mean expert load R in every layer), zipf:S, dirichlet:A, "
                      "or a measured histogram file (JSON or CSV, docs/ROUTING.md)")
          ->group(routing);
  cmd->add_option("--routing-imbalance", opt.routing_imbalance,
                  "the same as --routing imbalance:R: the hottest expert of every MoE layer "
                  "takes R times the mean tokens")
      ->excludes(spec)
      ->group(routing);
  cmd->add_option("--routing-seed", opt.routing_seed,
                  "seed of the random routing models (which experts run hot), 0 to 2^53")
      ->check(CLI::Range(std::int64_t{0}, std::int64_t{1} << 53))
      ->capture_default_str()
      ->group(routing);
  cmd->add_option("--hbm-headroom", opt.hbm_headroom_gib,
                  "GiB of HBM a plan must leave free to fit (allocator spikes, what no model "
                  "counts)")
      ->capture_default_str();
  cmd->add_option("--calibration", opt.calibration, "calibration JSON from mop calibrate");
  add_output_options(cmd, opt.json);
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

namespace {

// --from FRAMEWORK:FILE, read with the model when --model names it.
strategy::FrameworkRun read_from(const std::string& from, const workload::ModelSpec* model,
                                 std::string& origin) {
  const auto colon = from.find(':');
  if (colon == std::string::npos || colon + 1 == from.size())
    throw InputError(fmt::format("--from takes FRAMEWORK:FILE, e.g. megatron:run.sh (got {}).",
                                 quote_for_message(from)));
  const strategy::Framework fw = strategy::parse_framework(from.substr(0, colon));
  origin = from.substr(colon + 1);
  const std::string text = read_input_file(origin);
  if (fw == strategy::Framework::megatron)
    return strategy::read_megatron_args(text, origin, model);
  if (fw == strategy::Framework::torchtitan)
    return strategy::read_torchtitan_config(text, origin, model);
  if (model == nullptr)
    throw InputError(fmt::format("{}: a DeepSpeed config does not describe the model; name it "
                                 "with --model.",
                                 origin));
  return strategy::read_deepspeed_config(text, origin);
}

} // namespace

PlanInputs resolve_inputs(const PlanOptions& opt) {
  PlanInputs in;
  if (opt.from.empty()) {
    if (opt.model.empty())
      throw CLI::RequiredError("--model");
    if (opt.seq.empty())
      throw CLI::RequiredError("--seq");
  }
  if (opt.nodes <= 0 || opt.nodes > limits::max_gpus)
    throw InputError(fmt::format("--nodes must be a number of nodes from 1 to {} (got {}).",
                                 limits::max_gpus, opt.nodes));
  if (opt.global_batch < 0 || opt.global_batch > limits::max_batch_sequences)
    throw InputError(fmt::format("--global-batch must be a number of sequences from 1 to {} "
                                 "(got {}).",
                                 limits::max_batch_sequences, opt.global_batch));
  in.cluster = hw::load_cluster(opt.cluster);
  in.nodes = opt.nodes;
  if (!opt.model.empty())
    in.model = workload::load_model(opt.model);
  if (!opt.from.empty()) {
    in.run = read_from(opt.from, opt.model.empty() ? nullptr : &in.model, in.run_origin);
    if (opt.model.empty()) {
      if (!in.run->model)
        throw InputError(fmt::format("{}: the configuration does not describe the model; name "
                                     "it with --model.",
                                     in.run_origin));
      in.model = *in.run->model;
    }
    if (opt.seq.empty() && in.run->seq == 0)
      throw InputError(fmt::format("{}: the configuration states no sequence length; give --seq.",
                                   in.run_origin));
    const bool nodes_given = opt.nodes_option != nullptr && opt.nodes_option->count() > 0;
    if (!nodes_given && in.run->nodes > 0) {
      const std::int64_t gpus = std::int64_t{in.run->nodes} * in.run->gpus_per_node;
      const int per_node = in.cluster.node.gpus_per_node;
      if (gpus % per_node != 0)
        throw InputError(fmt::format("{}: its launcher starts {} ranks, not whole nodes of {} "
                                     "GPUs; give --nodes.",
                                     in.run_origin, gpus, per_node));
      in.nodes = static_cast<int>(std::min<std::int64_t>(gpus / per_node, limits::max_gpus));
    }
  }
  in.seq = opt.seq.empty() ? in.run->seq : parse_seq(opt.seq);
  check_gpus(in.nodes, in.cluster.node.gpus_per_node, in.cluster.name);
  if (!opt.calibration.empty()) {
    const hw::Calibration cal = hw::load_calibration(opt.calibration);
    in.cluster = hw::calibrated_cluster(in.cluster, cal);
  }
  in.global_batch = opt.global_batch;
  if (in.run && in.global_batch == 0)
    in.global_batch = in.run->global_batch;
  if (!opt.global_batch_tokens.empty()) {
    const std::int64_t tokens = parse_count(opt.global_batch_tokens, "--global-batch-tokens");
    if (tokens % in.seq != 0 || tokens / in.seq > limits::max_batch_sequences)
      throw InputError(fmt::format("--global-batch-tokens {} ({} tokens) must be a whole number "
                                   "of sequences of {} tokens, at most {} of them.",
                                   quote_for_message(opt.global_batch_tokens), tokens, in.seq,
                                   limits::max_batch_sequences));
    in.global_batch = static_cast<int>(tokens / in.seq);
  }
  if (opt.max_simulations < 1 || opt.max_simulations > 1000000)
    throw InputError(fmt::format("--max-simulations must be between 1 and 1000000 (got {}).",
                                 opt.max_simulations));
  in.max_simulations = opt.max_simulations;
  if (!(opt.hbm_headroom_gib >= 0 && opt.hbm_headroom_gib <= 1024))
    throw InputError(fmt::format("--hbm-headroom must be between 0 and 1024 GiB (got {}).",
                                 opt.hbm_headroom_gib));
  in.hbm_headroom_bytes = opt.hbm_headroom_gib * 1024.0 * 1024.0 * 1024.0;
  in.overrides = overrides_of(opt);
  in.precision = !opt.precision.empty() ? opt.precision : in.run ? in.run->precision : "bf16";
  in.gemm_dtype = precision_of(in.precision, in.cluster);
  in.attention_kernel = sim::parse_attention_kernel(opt.attention_kernel); // CLI11 checked it
  if (in.run) {
    in.compiled = in.run->compiled;
    in.fp8_recipe = in.run->fp8_recipe;
    in.ep_dispatcher = in.run->ep_dispatcher;
  }
  std::string routing = opt.routing;
  if (opt.routing_imbalance)
    routing = fmt::format("imbalance:{}", *opt.routing_imbalance);
  if (!routing.empty()) {
    in.routing = workload::parse_routing(routing, static_cast<std::uint64_t>(opt.routing_seed));
    in.reseed_routing(in.routing.seed);
    if (!in.model.is_moe())
      std::fputs(fmt::format("mop: note: {} has no MoE layers; --routing changes nothing.\n",
                             in.model.name)
                     .c_str(),
                 stderr);
  }
  return in;
}

void PlanInputs::reseed_routing(std::uint64_t seed) {
  routing.seed = seed;
  expert_loads = workload::expert_loads(routing, model);
  routing_id = strategy::next_routing_id();
  uneven = false;
  for (const auto& row : expert_loads)
    for (double x : row)
      uneven = uneven || x != 1.0;
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
  c.hw.hbm_headroom_bytes = hbm_headroom_bytes;
  c.global_batch = global_batch;
  c.overrides = overrides;
  c.gemm_dtype = gemm_dtype;
  c.attention_kernel = attention_kernel;
  c.compiled = compiled;
  c.fp8_recipe = fp8_recipe;
  c.ep_dispatcher = ep_dispatcher;
  c.expert_loads = uneven ? &expert_loads : nullptr;
  c.routing_id = routing_id;
  return c;
}

} // namespace mop::cli

namespace mop::cli {

strategy::ResolvedPlan resolve_command_plan(const PlanOptions& opt, const PlanInputs& in) {
  if (in.run)
    return strategy::resolve_given_plan(in.run->plan, in.context(), in.run_origin);
  const auto& families = strategy::family_names();
  if (std::find(families.begin(), families.end(), opt.plan) != families.end()) {
    // A preset is the fastest plan of its family, as `mop plan --family` finds it (one
    // resolution for every command); when none fits, the one closest to fitting.
    const planner::SearchResult s = run_search(in, opt.plan, 1, 2, false);
    if (!s.results.empty()) {
      strategy::ResolvedPlan r;
      r.plan = s.results[0].plan;
      r.memory = strategy::analyze_memory(in.model, r.plan, in.seq, in.context().hw,
                                          strategy::activation_options(in.context()));
      r.candidates = static_cast<int>(s.candidates_evaluated);
      return r;
    }
  }
  return strategy::resolve_plan(opt.plan, in.context());
}

Json report_not_represented(const PlanInputs& in) {
  Json notes = Json::array();
  if (!in.run)
    return notes;
  for (const std::string& n : in.run->not_represented) {
    std::fputs(fmt::format("mop: note: {}: {}.\n", in.run_origin, n).c_str(), stderr);
    notes.push_back(n);
  }
  return notes;
}

} // namespace mop::cli
