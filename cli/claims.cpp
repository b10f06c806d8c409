// mop claims: the Mixture-of-Parallelisms paper's claims, as mop predicts them.
#include "validation/claims.hpp"
#include "cli/commands.hpp"
#include "cli/output.hpp"
#include "common/units.hpp"
#include "hw_models/cluster.hpp"
#include "workload/catalog.hpp"

#include <fmt/format.h>
#include <iostream>
#include <memory>

namespace mop::cli {
namespace {

std::string seq_name(std::int64_t s) {
  return s >= (1 << 20) ? fmt::format("{}M", s >> 20) : fmt::format("{}K", s >> 10);
}

Json side(const std::optional<planner::RankedPlan>& r) {
  if (!r)
    return Json{{"fits", false}};
  return Json{{"fits", true},
              {"tokens_per_s_per_gpu", r->tokens_per_s_per_gpu},
              {"mfu", r->mfu},
              {"peak_hbm_bytes", r->peak_hbm_bytes},
              {"plan", strategy::summary(r->plan)}};
}

Json point_json(const validation::ClaimPoint& p) {
  Json j{{"seq", p.seq},
         {"nodes", p.nodes},
         {"mop", side(p.mop)},
         {"fsdp2", side(p.fsdp2)},
         {"fsdp2_no_cp", side(p.fsdp2_no_cp)}};
  if (!p.fsdp2_no_cp)
    j["fsdp2_no_cp"]["why"] = p.fsdp2_no_cp_why;
  if (p.mop && p.fsdp2)
    j["ratio_vs_fsdp2"] = p.mop->tokens_per_s_per_gpu / p.fsdp2->tokens_per_s_per_gpu;
  if (p.mop && p.fsdp2_no_cp)
    j["ratio_vs_fsdp2_no_cp"] = p.mop->tokens_per_s_per_gpu / p.fsdp2_no_cp->tokens_per_s_per_gpu;
  return j;
}

std::string cell(const std::optional<planner::RankedPlan>& r) {
  return r ? fmt::format("{:.0f}", r->tokens_per_s_per_gpu) : "OOM";
}

std::string ratio(const validation::ClaimPoint& p, bool no_cp) {
  const auto& base = no_cp ? p.fsdp2_no_cp : p.fsdp2;
  return p.mop && base
             ? fmt::format("{:.2f}x", p.mop->tokens_per_s_per_gpu / base->tokens_per_s_per_gpu)
             : "-";
}

} // namespace

void add_claims_command(CLI::App& app) {
  struct Options {
    std::vector<std::string> models = {"kimi-k2", "deepseek-v3"};
    std::string cluster = "h200";
    int nodes = 12;
    bool json = false;
  };
  auto opt = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "claims", "The Mixture-of-Parallelisms claims as mop predicts them: 1M context on 12 "
                "nodes, where FSDP2 stops fitting, the per-GPU throughput ratio\n\nExample:\n"
                "  mop claims --model kimi-k2");
  cmd->add_option("--model", opt->models, "models (default: kimi-k2 and deepseek-v3)");
  cmd->add_option("--cluster", opt->cluster, "node type or cluster JSON")->capture_default_str();
  cmd->add_option("--nodes", opt->nodes, "nodes")->capture_default_str();
  add_output_options(cmd, opt->json);
  cmd->callback([opt] {
    const hw::ClusterSpec cluster = hw::load_cluster(opt->cluster);
    Json all = Json::array();
    for (const std::string& id : opt->models) {
      const workload::ModelSpec m = workload::load_model(id);
      const validation::ClaimsReport r = validation::check_claims(m, cluster, opt->nodes);
      Json by_seq = Json::array(), by_nodes = Json::array();
      for (const auto& p : r.by_seq)
        by_seq.push_back(point_json(p));
      for (const auto& p : r.by_nodes)
        by_nodes.push_back(point_json(p));
      all.push_back(Json{{"model", id},
                         {"cluster", cluster.name},
                         {"nodes", opt->nodes},
                         {"by_seq", by_seq},
                         {"by_nodes", by_nodes}});
      if (opt->json)
        continue;
      std::cout << fmt::format("{} on {} x {}: best plan per family, tokens/s per GPU\n", id,
                               opt->nodes, cluster.name);
      TextTable t{{"seq", "mop", "fsdp2 (torchtitan, CP allowed)", "fsdp2 FSDP only", "mop / fsdp2",
                   "mop / fsdp2 FSDP only"},
                  {},
                  {true, true, true, true, true, true}};
      for (const auto& p : r.by_seq)
        t.rows.push_back({seq_name(p.seq), cell(p.mop), cell(p.fsdp2), cell(p.fsdp2_no_cp),
                          ratio(p, false), ratio(p, true)});
      std::cout << t.render();
      TextTable s{{"nodes", "mop", "fsdp2", "fsdp2 FSDP only", "mop / fsdp2"},
                  {},
                  {true, true, true, true, true}};
      for (const auto& p : r.by_nodes)
        s.rows.push_back({std::to_string(p.nodes), cell(p.mop), cell(p.fsdp2), cell(p.fsdp2_no_cp),
                          ratio(p, false)});
      std::cout << fmt::format("\nscaling at {}:\n", seq_name(r.scale_seq)) << s.render() << "\n";
    }
    if (opt->json)
      print_json(Json{{"claims", all}});
  });
}

} // namespace mop::cli
