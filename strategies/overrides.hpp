#pragma once
// Plan overrides: the parts of a plan a user fixes (`--tp 2 --pp 4 --zero 1`, CLI.md "Common
// arguments"). Every plan a family enumerates gets them, and the rest is derived as the family
// derives it: the data-parallel degrees, the batch, and whatever the flags leave to the search.
// On `memory` and `simulate` the preset then picks among those plans as it always does; on
// `plan`, `sweep` and `fit` the search runs over them (docs/PLANS.md "Overrides").
#include "strategies/plan.hpp"

#include <optional>
#include <string>

namespace mop::strategy {

// What lives on the host instead of HBM (`--offload`): a set of parts.
struct Offload {
  bool params = false;      // BF16 weights between uses (FSDP2's CPUOffloadPolicy)
  bool grads = false;       // gradients between reduction and the step
  bool optimizer = false;   // FP32 master weights and moments, stepped on the host CPU
  bool activations = false; // checkpointed activations (the family's fraction, else all)
  bool operator==(const Offload&) const = default;
};

struct PlanOverrides {
  std::optional<int> tp; // attention TP; dense MLPs and the vocabulary follow where the family
                         // ties them to it (Megatron's one TP, FSDP2's)
  std::optional<bool> sp;
  std::optional<int> cp;
  std::optional<CpKind> cp_kind;
  std::optional<int> pp;
  std::optional<int> vp;
  std::optional<PipelineSchedule> schedule;
  std::optional<int> ep;
  std::optional<int> etp;
  std::optional<int> zero; // every layer kind's ZeRO stage
  std::optional<int> micro_batch;
  std::optional<Recompute> recompute; // every layer kind's
  std::optional<Offload> offload;
  std::optional<double> capacity_factor; // MoE token dropping: 0 = dropless
  std::optional<Rebalance> rebalance;     // run-time expert-load rebalancing
  std::optional<double> rebalance_threshold; // its λ (the capacity α follows when above it)

  bool empty() const;
};

// The plan with the overrides' parts set. Ties are kept: a plan whose dense or vocabulary TP
// equalled its attention TP takes the new TP for them too; `--vp 2` makes the schedule
// interleaved unless `--pp-schedule` says otherwise; `--pp 1` drops virtual stages and the
// stage split; moving the optimizer to the host steps it there (with torch's AdamW where the
// family uses it), moving it back steps it on the GPU after the backward.
void apply_overrides(const PlanOverrides& o, Plan& p);

// "tp 2, pp 4, zero 1" (for messages); empty when there are none.
std::string describe(const PlanOverrides& o);

// "none" or a comma-separated list of params, grads, opt, act. InputError otherwise.
Offload parse_offload(const std::string& text);
std::string offload_name(const Offload& o); // the form parse_offload reads

// A pipeline schedule, CP kind or recompute policy by the name the plan JSON uses
// (`name(...)`); InputError naming `flag` and the allowed names otherwise.
PipelineSchedule parse_schedule(const std::string& text, const std::string& flag);
CpKind parse_cp_kind(const std::string& text, const std::string& flag);
Recompute parse_recompute(const std::string& text, const std::string& flag);

} // namespace mop::strategy
