// mop memory: does a plan fit, per rank class, and what runs out first.
#include "cli/memory.hpp"
#include "cli/commands.hpp"
#include "cli/output.hpp"
#include "common/units.hpp"
#include "strategies/presets.hpp"
#include "strategies/routing.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <iostream>
#include <memory>

namespace mop::cli {

Json breakdown_json(const strategy::MemoryBreakdown& b) {
  return Json{{"weights", b.weights},           {"grads", b.grads},
              {"optimizer", b.optimizer},       {"activations", b.activations},
              {"comm_buffers", b.comm_buffers}, {"other", b.other}};
}

Json memory_json(const strategy::ResolvedPlan& r) {
  const strategy::MemoryReport& m = r.memory;
  const strategy::RankClassMemory& w = m.classes[static_cast<std::size_t>(m.worst)];
  Json classes = Json::array();
  for (const auto& c : m.classes)
    classes.push_back(Json{{"name", c.name},
                           {"stage", c.stage},
                           {"ranks", c.ranks},
                           {"layers", c.layers},
                           {"micro_batches_in_flight", c.micro_batches_in_flight},
                           {"peak_hbm_bytes", c.peak_hbm_bytes},
                           {"hbm", breakdown_json(c.hbm)},
                           {"host_per_rank", breakdown_json(c.host)},
                           {"host_bytes_per_node", c.host_bytes_per_node},
                           {"dominant", c.dominant}});
  Json j{{"fits", m.fits()},
         {"fits_hbm", m.fits_hbm},
         {"fits_host", m.fits_host},
         {"peak_hbm_bytes", m.peak_hbm_bytes},
         {"hbm_capacity_bytes", m.hbm_capacity_bytes},
         {"peak_host_bytes", m.peak_host_bytes},
         {"host_capacity_bytes", m.host_capacity_bytes},
         {"memory_breakdown", breakdown_json(w.hbm)},
         {"host_breakdown", breakdown_json(w.host)},
         {"worst_rank", Json{{"name", w.name},
                             {"stage", w.stage},
                             {"dominant", w.dominant},
                             {"peak_hbm_bytes", w.peak_hbm_bytes}}},
         {"rank_classes", classes},
         {"candidates_considered", r.candidates},
         {"plan", strategy::to_json(r.plan)}};
  if (!m.fits())
    j["first_to_run_out"] = m.first_to_run_out;
  return j;
}

namespace {

strategy::RankLoads loads_on(const PlanInputs& in, const strategy::Plan& p) {
  return strategy::rank_loads(
      p, in.model, in.expert_loads,
      strategy::routing_scale(p, in.model, in.seq, in.cluster.node.gpus_per_node));
}

// What least-loaded rebalancing did: the worst rank's load before and after, the layers it
// rebalanced, the most expert copies one rank received for a layer.
struct RebalanceSummary {
  double before = 1, after = 1;
  int layers = 0, moe_layers = 0;
  int copies = 0;
};
RebalanceSummary rebalance_summary(const strategy::RankLoads& loads) {
  RebalanceSummary s;
  s.after = strategy::worst_rank_load(loads);
  s.copies = loads.most_copies_in;
  for (std::size_t l = 0; l < loads.native.size(); ++l) {
    if (loads.native[l].empty())
      continue;
    ++s.moe_layers;
    s.before = std::max(s.before, *std::max_element(loads.native[l].begin(), loads.native[l].end()));
    int moved = 0;
    for (int c : loads.copies_in_node[l])
      moved += c;
    for (int c : loads.copies_in_net[l])
      moved += c;
    s.layers += moved > 0 ? 1 : 0;
  }
  return s;
}

} // namespace

Json routing_json(const PlanInputs& in, const strategy::Plan& p) {
  if (!in.uneven || !in.model.is_moe())
    return nullptr;
  const strategy::RankLoads loads = loads_on(in, p);
  const strategy::HotRank h = strategy::hottest_rank(loads);
  const int first = h.ep_rank * loads.local_experts;
  Json j{{"model", in.routing.source},
         {"seed", in.routing.seed},
         {"reserved_load", p.moe.imbalance},
         {"worst_rank",
          Json{{"ep_rank", h.ep_rank},
               {"experts", Json::array({first, first + loads.local_experts - 1})},
               {"mean_load", h.mean_load},
               {"peak_layer", h.layer},
               {"peak_load", h.load},
               {"hottest_expert", h.expert},
               {"hottest_expert_load", h.expert_load}}}};
  if (loads.rebalanced) {
    const RebalanceSummary s = rebalance_summary(loads);
    j["rebalance"] = Json{{"kind", strategy::name(p.moe.rebalance)},
                          {"threshold", p.moe.rebalance_threshold},
                          {"capacity", p.moe.rebalance_capacity},
                          {"min_tokens", p.moe.rebalance_min_tokens},
                          {"worst_load_before", s.before},
                          {"worst_load_after", s.after},
                          {"layers_rebalanced", s.layers},
                          {"moe_layers", s.moe_layers},
                          {"most_copies_per_layer", s.copies}};
  }
  return j;
}

std::string routing_text(const PlanInputs& in, const strategy::Plan& p) {
  if (!in.uneven || !in.model.is_moe())
    return "";
  const strategy::RankLoads loads = loads_on(in, p);
  std::string out =
      fmt::format("routing {} (seed {}): routed buffers reserved for {:.2f}x the mean tokens\n",
                  in.routing.source, in.routing.seed, p.moe.imbalance);
  if (loads.rebalanced) {
    const RebalanceSummary s = rebalance_summary(loads);
    out += fmt::format("least-loaded rebalancing (threshold {:g}, capacity {:g}): {} of {} MoE "
                       "layers rebalanced, the worst rank {:.2f}x -> {:.2f}x the mean, at most "
                       "{} expert copies to a rank per layer\n",
                       p.moe.rebalance_threshold, p.moe.rebalance_capacity, s.layers,
                       s.moe_layers, s.before, s.after, s.copies);
  }
  out += fmt::format("most loaded: {}\n",
                     strategy::describe(strategy::hottest_rank(loads), loads.local_experts));
  return out;
}

void print_memory_text(const strategy::ResolvedPlan& r, const PlanInputs& in) {
  const strategy::MemoryReport& m = r.memory;
  std::cout << fmt::format("{} on {} x {} ({} GPUs), seq {}, global batch {}\n", in.model.name,
                           in.nodes, in.cluster.name, in.nodes * in.cluster.node.gpus_per_node,
                           in.seq, r.plan.global_batch);
  std::cout << fmt::format("plan ({}): {}\n\n", r.plan.family, strategy::summary(r.plan));
  TextTable t{{"rank class", "ranks", "weights", "grads", "optimizer", "activations", "buffers",
               "other", "HBM peak", "host/node"},
              {},
              {false, true, true, true, true, true, true, true, true, true}};
  auto b = [](double v) { return format_bytes(v); };
  for (const auto& c : m.classes)
    t.rows.push_back({c.name, std::to_string(c.ranks), b(c.hbm.weights), b(c.hbm.grads),
                      b(c.hbm.optimizer), b(c.hbm.activations), b(c.hbm.comm_buffers),
                      b(c.hbm.other), b(c.peak_hbm_bytes), b(c.host_bytes_per_node)});
  std::cout << t.render() << "\n";
  std::cout << routing_text(in, r.plan);
  std::cout << fmt::format("HBM {} of {} per GPU; host {} of {} per node\n", b(m.peak_hbm_bytes),
                           b(m.hbm_capacity_bytes), b(m.peak_host_bytes), b(m.host_capacity_bytes));
  if (m.fits())
    std::cout << "fits\n";
  else
    std::cout << fmt::format("does not fit: {}\n", m.first_to_run_out);
}

void add_memory_command(CLI::App& app) {
  auto opt = std::make_shared<PlanOptions>();
  CLI::App* cmd = app.add_subcommand(
      "memory", "Does a plan fit: bytes per rank class, in HBM and host memory\n\nExample:\n"
                "  mop memory --model kimi-k2 --cluster h200 --nodes 12 --seq 1M --plan mop");
  add_plan_options(cmd, *opt);
  cmd->callback([opt] {
    const PlanInputs in = resolve_inputs(*opt);
    const strategy::ResolvedPlan r = resolve_command_plan(*opt, in);
    const Json notes = report_not_represented(in);
    if (opt->json) {
      Json j = memory_json(r);
      if (in.uneven)
        j["routing"] = routing_json(in, r.plan);
      if (in.run)
        j["not_represented"] = notes;
      print_json(j);
    } else
      print_memory_text(r, in);
  });
}

} // namespace mop::cli
