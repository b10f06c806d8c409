#pragma once
// Expert loads (workload/routing.hpp) on a plan's ranks: each expert-parallel rank holds a
// contiguous block of ep-th of the routed experts (Megatron-Core's placement), so its tokens
// are its experts' loads; a capacity factor caps each expert at that many times the mean
// (the rest dropped). The lowering's full-rank simulation, the memory model's headroom and the
// commands' "worst rank" line all read these numbers.
#include "strategies/plan.hpp"
#include "workload/model_spec.hpp"
#include "workload/rebalance.hpp"

#include <string>
#include <vector>

namespace mop::strategy {

struct RankLoads {
  int ep = 1;
  int local_experts = 0;                   // experts per expert-parallel rank
  std::vector<std::vector<double>> capped; // per layer, per expert: min(load, capacity factor)
  std::vector<std::vector<double>> rank;   // per layer, per ep rank: the mean load of the rows
                                           // its experts process (after rebalancing, if any)
  std::vector<double> exchange;            // per layer: the largest rank load (1 for dense)
  bool uniform = true;                     // every rank load is 1: balanced routing

  // Least-loaded rebalancing (plan.moe.rebalance), per MoE layer (empty rows for dense ones):
  // the assignment in units of an expert's mean load, the ranks' loads before it, and the
  // expert copies each rank receives and sends, on its node and across nodes.
  bool rebalanced = false;
  std::vector<std::vector<double>> native;
  std::vector<std::vector<workload::Segment>> segments;
  std::vector<std::vector<int>> copies_in_node, copies_in_net, copies_out_node, copies_out_net;
  int most_copies_in = 0; // the most copies any rank receives for one layer
};

// What rebalancing needs beyond the loads: an expert's mean tokens per micro-batch over the
// expert-parallel group (for the minimum share) and the group's ranks per node.
struct RoutingScale {
  double expert_tokens = 0; // 0: no minimum share
  int ep_per_node = 1;
};
RoutingScale routing_scale(const Plan& p, const workload::ModelSpec& m, std::int64_t seq,
                           int gpus_per_node);

// Empty rows in `expert_loads` (dense layers) stay empty. InputError when the loads do not
// match the model (layers, experts). A plan with least-loaded rebalancing gets each layer's
// assignment (workload/rebalance.hpp), `rank` and `exchange` then after it.
RankLoads rank_loads(const Plan& p, const workload::ModelSpec& m,
                     const std::vector<std::vector<double>>& expert_loads,
                     const RoutingScale& scale = {});

// The largest load any rank meets in any layer (at least 1): the imbalance a plan reserves its
// routed buffers for (Plan::moe.imbalance).
double worst_rank_load(const RankLoads& r);

// The rank that holds the most routed rows over all MoE layers (the most saved activations)
// and, for it, the layer where its load is highest and the hottest expert there.
struct HotRank {
  int ep_rank = 0;
  double mean_load = 1; // over the MoE layers
  int layer = -1;       // where its load peaks
  double load = 1;      // its load there
  int expert = -1;      // the hottest of its experts there
  double expert_load = 1;
};
HotRank hottest_rank(const RankLoads& r);
HotRank rank_summary(const RankLoads& r, int ep_rank);

// One line: "ep rank 17 (experts 68-71): 1.42x the mean tokens in layer 12, expert 69 at 2.9x".
std::string describe(const HotRank& h, int local_experts);

} // namespace mop::strategy
