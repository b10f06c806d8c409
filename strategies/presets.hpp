#pragma once
// Presets: each a family of Plans, auto-tuned for a model, sequence length and cluster.
#include "sim/schedule.hpp"
#include "strategies/lower.hpp"
#include "strategies/memory.hpp"
#include "strategies/overrides.hpp"
#include "strategies/plan.hpp"
#include "workload/model_spec.hpp"

#include <functional>
#include <string>
#include <vector>

namespace mop::strategy {

struct PlanContext {
  const workload::ModelSpec* model = nullptr;
  std::int64_t seq = 0;
  ClusterShape cluster;
  MemoryHardware hw;
  int global_batch = 0;    // sequences per step; 0 = the default (default_global_batch)
  PlanOverrides overrides; // parts of every plan fixed by the user (`--tp 2`, ...)
  sim::Dtype gemm_dtype = sim::Dtype::bf16; // `--precision`: the layers' GEMMs
  // `--attention-kernel`: the attention kernel every plan runs; unset: each family's framework's
  // (strategy::attention_kernel).
  std::optional<sim::AttentionKernel> attention_kernel = std::nullopt;
  // torch.compile for the eager family (LoweringContext::compiled): a torchtitan job's
  // compile.enable; unset: eager.
  std::optional<bool> compiled = std::nullopt;
  // A framework configuration's FP8 recipe and EP dispatcher (--from); unset: the family's.
  std::optional<Fp8Recipe> fp8_recipe = std::nullopt;
  std::optional<EpDispatcher> ep_dispatcher = std::nullopt;
  // `--routing`: every MoE layer's expert loads (workload::expert_loads); null for balanced.
  // Each plan reserves its routed buffers for its worst rank's load (Plan::moe.imbalance), and
  // the lowering simulates every expert-parallel rank (LoweringContext::expert_loads).
  const std::vector<std::vector<double>>* expert_loads = nullptr;
  // Names those loads (a new id for every draw: next_routing_id()), so that what is derived
  // from them can be kept across the plans of a search.
  std::uint64_t routing_id = 0;
};

// A fresh PlanContext::routing_id.
std::uint64_t next_routing_id();

// The plan's routed buffers reserved for the context's routing: Plan::moe.imbalance raised to
// the worst rank's load (strategies/routing.hpp). Nothing without routing.
void reserve_for_routing(Plan& p, const PlanContext& ctx);

// The lowering's context for this planning context (its model, sequence, node size, memory
// figures and GEMM precision).
LoweringContext lowering_context(const PlanContext& ctx);

const std::vector<std::string>& family_names(); // fsdp2, megatron, ulysses-zero3, mop

// The default batch: at least 4M tokens (2^22) per optimizer step, at least one sequence per
// data-parallel replica, rounded up to a multiple of replicas x micro-batch. InputError when
// that passes limits::max_batch_sequences.
int default_global_batch(std::int64_t seq, std::int64_t replicas_times_micro_batch);

ModelShape model_shape(const workload::ModelSpec& m);

// Every valid plan of a family for the context (completed and validated), with the context's
// overrides applied (duplicates they create removed). When none is valid and `rejection` is
// given, it receives the rule the first candidate broke (one sentence).
std::vector<Plan> enumerate_family(const std::string& family, const PlanContext& ctx,
                                   std::string* rejection = nullptr);

// Until the analytic time model ranks plans, a preset resolves to the fitting plan with the
// least expected overhead (recompute, pipeline bubble, offload, TP/CP communication): lower is
// better. Documented in docs/PLANS.md.
double preference_cost(const Plan& p);

struct ResolvedPlan {
  Plan plan;
  MemoryReport memory;
  int candidates = 0; // plans of the family considered
};

// The training code's options the memory model reads (LoweringContext::compiled's twin), so that
// the planner's memory check and the lowering's tracker count the same bytes.
ActivationOptions activation_options(const PlanContext& ctx);

// A preset name is auto-tuned over its family; a path is a plan JSON, checked as it is.
// When no plan of a family fits, the one closest to fitting is returned (memory.fits() false).
// `admissible`, when given, throws InputError for a plan the caller cannot use (an executor's
// limits): it is asked down the order of choice, the first plan it accepts is returned, and when
// it accepts none its last sentence is the error.
ResolvedPlan resolve_plan(const std::string& name_or_path, const PlanContext& ctx,
                          const std::function<void(const Plan&)>& admissible = {});

// A plan given whole (a plan JSON, a framework's configuration): a `world` of 0 becomes the
// cluster's, the context's overrides and batch apply (the default batch where neither the plan
// nor the context gives one), then it is completed and validated. `stated`, the JSON it was
// read from, has its derived degrees checked (they must be what the plan derives).
ResolvedPlan resolve_given_plan(Plan plan, const PlanContext& ctx, const std::string& origin,
                                const Json* stated = nullptr,
                                const std::function<void(const Plan&)>& admissible = {});

} // namespace mop::strategy
