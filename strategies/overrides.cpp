#include "strategies/overrides.hpp"

#include "common/error.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <sstream>
#include <vector>

namespace mop::strategy {

bool PlanOverrides::empty() const {
  return !tp && !sp && !cp && !cp_kind && !pp && !vp && !schedule && !ep && !etp && !zero &&
         !micro_batch && !recompute && !offload && !capacity_factor &&
         !rebalance && !rebalance_threshold;
}

void apply_overrides(const PlanOverrides& o, Plan& p) {
  if (o.tp) {
    if (p.dense.tp == p.attention.tp)
      p.dense.tp = *o.tp;
    if (p.embed.tp == p.attention.tp)
      p.embed.tp = *o.tp;
    p.attention.tp = *o.tp;
  }
  if (o.sp)
    p.attention.sp = *o.sp;
  if (o.cp)
    p.attention.cp = *o.cp;
  if (o.cp_kind)
    p.attention.cp_kind = *o.cp_kind;
  if (o.pp) {
    if (*o.pp != p.pp)
      p.stage_layers.clear();
    p.pp = *o.pp;
    if (p.pp == 1) {
      p.vp = 1;
      if (p.schedule == PipelineSchedule::interleaved_1f1b)
        p.schedule = PipelineSchedule::one_f_one_b;
    }
  }
  if (o.vp) {
    p.vp = *o.vp;
    if (p.vp > 1)
      p.schedule = PipelineSchedule::interleaved_1f1b;
    else if (p.schedule == PipelineSchedule::interleaved_1f1b)
      p.schedule = PipelineSchedule::one_f_one_b;
    if (p.vp > 1)
      p.stage_layers.clear(); // interleaved stages split evenly
  }
  if (o.schedule)
    p.schedule = *o.schedule;
  if (o.ep)
    p.moe.ep = *o.ep;
  if (o.etp)
    p.moe.etp = *o.etp;
  if (o.zero)
    for (StatePolicy& s : p.state)
      s.zero = *o.zero;
  if (o.micro_batch)
    p.micro_batch = *o.micro_batch;
  if (o.capacity_factor)
    p.moe.capacity_factor = *o.capacity_factor;
  if (o.rebalance)
    p.moe.rebalance = *o.rebalance;
  if (o.rebalance_threshold) {
    p.moe.rebalance_threshold = *o.rebalance_threshold;
    p.moe.rebalance_capacity = std::min(p.moe.rebalance_capacity, p.moe.rebalance_threshold);
  }
  if (o.recompute)
    for (Recompute& r : p.recompute)
      r = *o.recompute;
  if (o.offload) {
    const Offload& off = *o.offload;
    p.params = off.params ? Placement::host : Placement::hbm;
    p.grads = off.grads ? Placement::host : Placement::hbm;
    if (off.optimizer && !p.optimizer_on_host) {
      p.optimizer_on_host = true;
      p.torch_host_optimizer = p.family == "fsdp2" || p.family == "megatron";
      p.overlap = OptimizerOverlap::after_backward;
    } else if (!off.optimizer) {
      p.optimizer_on_host = false;
      p.torch_host_optimizer = false;
      p.overlap = OptimizerOverlap::after_backward;
    }
    p.optimizer = off.optimizer ? Placement::host : Placement::hbm;
    if (!off.activations)
      p.activation_offload = 0;
    else if (p.activation_offload == 0)
      p.activation_offload = 1;
  }
}

std::string describe(const PlanOverrides& o) {
  std::vector<std::string> parts;
  auto number = [&](const char* what, const std::optional<int>& v) {
    if (v)
      parts.push_back(fmt::format("{} {}", what, *v));
  };
  number("tp", o.tp);
  if (o.sp)
    parts.push_back(*o.sp ? "sp" : "no sp");
  number("cp", o.cp);
  if (o.cp_kind)
    parts.push_back(fmt::format("{} cp", name(*o.cp_kind)));
  number("pp", o.pp);
  number("vp", o.vp);
  if (o.schedule)
    parts.push_back(fmt::format("{} schedule", name(*o.schedule)));
  number("ep", o.ep);
  number("etp", o.etp);
  number("zero", o.zero);
  number("micro-batch", o.micro_batch);
  if (o.recompute)
    parts.push_back(fmt::format("{} recompute", name(*o.recompute)));
  if (o.offload)
    parts.push_back(fmt::format("offload {}", offload_name(*o.offload)));
  if (o.capacity_factor)
    parts.push_back(fmt::format("capacity factor {:g}", *o.capacity_factor));
  if (o.rebalance)
    parts.push_back(*o.rebalance == Rebalance::none ? "no rebalancing"
                                                    : "least-loaded rebalancing");
  if (o.rebalance_threshold)
    parts.push_back(fmt::format("rebalance threshold {:g}", *o.rebalance_threshold));
  return fmt::format("{}", fmt::join(parts, ", "));
}

Offload parse_offload(const std::string& text) {
  Offload o;
  if (text == "none")
    return o;
  std::stringstream in(text);
  std::string part;
  bool any = false;
  while (std::getline(in, part, ',')) {
    any = true;
    if (part == "params")
      o.params = true;
    else if (part == "grads")
      o.grads = true;
    else if (part == "opt")
      o.optimizer = true;
    else if (part == "act")
      o.activations = true;
    else
      throw InputError(fmt::format("--offload takes 'none' or a comma-separated list of params, "
                                   "grads, opt, act (got '{}').",
                                   text));
  }
  if (!any)
    throw InputError("--offload takes 'none' or a comma-separated list of params, grads, opt, "
                     "act (got nothing).");
  return o;
}

std::string offload_name(const Offload& o) {
  std::vector<std::string> parts;
  if (o.params)
    parts.emplace_back("params");
  if (o.grads)
    parts.emplace_back("grads");
  if (o.optimizer)
    parts.emplace_back("opt");
  if (o.activations)
    parts.emplace_back("act");
  return parts.empty() ? "none" : fmt::format("{}", fmt::join(parts, ","));
}

namespace {

template <class E, std::size_t N>
E parse_named(const std::string& text, const std::string& flag, const E (&values)[N]) {
  std::vector<std::string> allowed;
  for (E v : values) {
    if (text == name(v))
      return v;
    allowed.emplace_back(name(v));
  }
  throw InputError(
      fmt::format("{} must be one of {} (got '{}').", flag, fmt::join(allowed, ", "), text));
}

} // namespace

PipelineSchedule parse_schedule(const std::string& text, const std::string& flag) {
  constexpr PipelineSchedule all[] = {PipelineSchedule::gpipe, PipelineSchedule::one_f_one_b,
                                      PipelineSchedule::interleaved_1f1b,
                                      PipelineSchedule::zero_bubble};
  return parse_named(text, flag, all);
}

CpKind parse_cp_kind(const std::string& text, const std::string& flag) {
  constexpr CpKind all[] = {CpKind::ring, CpKind::ulysses, CpKind::hybrid};
  return parse_named(text, flag, all);
}

Recompute parse_recompute(const std::string& text, const std::string& flag) {
  constexpr Recompute all[] = {Recompute::none, Recompute::selective, Recompute::full};
  return parse_named(text, flag, all);
}

} // namespace mop::strategy
