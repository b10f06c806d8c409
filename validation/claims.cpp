#include "validation/claims.hpp"

#include "hw_models/calibration.hpp"
#include "strategies/hardware.hpp"

namespace mop::validation {

namespace {

std::optional<planner::RankedPlan> best(const workload::ModelSpec& m,
                                        const hw::ClusterSpec& cluster, int nodes, std::int64_t seq,
                                        const std::string& family, bool without_cp,
                                        const ClaimsOptions& o, std::string* why) {
  strategy::PlanContext ctx;
  ctx.model = &m;
  ctx.seq = seq;
  ctx.cluster = strategy::ClusterShape{cluster.node.gpus_per_node, nodes};
  ctx.hw = strategy::memory_hardware(cluster);
  planner::SearchOptions so;
  so.families = {family};
  so.top = 1;
  so.threads = o.threads;
  so.max_simulations = o.max_simulations;
  if (without_cp)
    so.filter = [](const strategy::Plan& p) {
      return p.attention.cp == 1 && p.attention.tp == 1; // FSDP (and EP) only
    };
  planner::SearchResult r = planner::search_plans(ctx, cluster, hw::Calibration{}, so);
  if (r.results.empty()) {
    if (why)
      *why = r.closest ? r.closest_memory.first_to_run_out : "no valid plan";
    return std::nullopt;
  }
  return std::move(r.results.front());
}

ClaimPoint point(const workload::ModelSpec& m, const hw::ClusterSpec& c, int nodes,
                 std::int64_t seq, const ClaimsOptions& o) {
  ClaimPoint p;
  p.seq = seq;
  p.nodes = nodes;
  p.mop = best(m, c, nodes, seq, "mop", false, o, nullptr);
  p.fsdp2 = best(m, c, nodes, seq, "fsdp2", false, o, nullptr);
  p.fsdp2_no_cp = best(m, c, nodes, seq, "fsdp2", true, o, &p.fsdp2_no_cp_why);
  return p;
}

} // namespace

ClaimsReport check_claims(const workload::ModelSpec& m, const hw::ClusterSpec& c, int nodes,
                          const ClaimsOptions& o) {
  ClaimsReport r;
  r.model = m.name;
  r.cluster = c.name;
  r.nodes = nodes;
  r.scale_seq = o.scale_seq;
  for (std::int64_t seq : o.seqs)
    r.by_seq.push_back(point(m, c, nodes, seq, o));
  for (int n : o.scale_nodes)
    r.by_nodes.push_back(point(m, c, n, o.scale_seq, o));
  return r;
}

} // namespace mop::validation
