#include "strategies/routing.hpp"

#include "common/error.hpp"
#include "strategies/mesh.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <limits>

namespace mop::strategy {

namespace {

// Each MoE layer's least-loaded assignment, in units of an expert's mean load.
void rebalance(const Plan& p, const RoutingScale& scale, RankLoads& r) {
  r.rebalanced = true;
  const std::size_t L = r.capped.size();
  const auto ep = static_cast<std::size_t>(r.ep);
  const double local = r.local_experts;
  workload::RebalanceOptions o;
  o.threshold = p.moe.rebalance_threshold;
  o.capacity = p.moe.rebalance_capacity;
  o.min_tokens = scale.expert_tokens > 0 ? p.moe.rebalance_min_tokens / scale.expert_tokens : 0;
  o.ranks_per_node = std::max(1, scale.ep_per_node);
  r.native = r.rank;
  r.segments.assign(L, {});
  r.copies_in_node.assign(L, {});
  r.copies_in_net = r.copies_out_node = r.copies_out_net = r.copies_in_node;
  r.uniform = true;
  for (std::size_t l = 0; l < L; ++l) {
    if (r.capped[l].empty())
      continue;
    workload::Rebalanced a = workload::least_loaded(r.capped[l], r.ep, o);
    auto& f = r.rank[l];
    for (std::size_t g = 0; g < ep; ++g) {
      f[g] = a.rank_tokens[g] / local;
      r.uniform = r.uniform && f[g] == 1.0;
    }
    r.exchange[l] = *std::max_element(f.begin(), f.end());
    r.copies_in_node[l].assign(ep, 0);
    r.copies_in_net[l].assign(ep, 0);
    r.copies_out_node[l].assign(ep, 0);
    r.copies_out_net[l].assign(ep, 0);
    const std::int64_t experts = static_cast<std::int64_t>(r.capped[l].size());
    for (const workload::Segment& s : a.segments) {
      const int owner = workload::expert_owner(s.expert, experts, r.ep);
      if (s.rank == owner)
        continue;
      const bool same_node = owner / o.ranks_per_node == s.rank / o.ranks_per_node;
      ++(same_node ? r.copies_in_node : r.copies_in_net)[l][static_cast<std::size_t>(s.rank)];
      ++(same_node ? r.copies_out_node : r.copies_out_net)[l][static_cast<std::size_t>(owner)];
    }
    for (std::size_t g = 0; g < ep; ++g)
      r.most_copies_in = std::max(r.most_copies_in, r.copies_in_node[l][g] + r.copies_in_net[l][g]);
    // A rank's experts' uneven loads change its GEMMs even when its total is the mean.
    for (double x : r.capped[l])
      r.uniform = r.uniform && x == 1.0;
    r.segments[l] = std::move(a.segments);
  }
}

} // namespace

RoutingScale routing_scale(const Plan& p, const workload::ModelSpec& m, std::int64_t seq,
                           int gpus_per_node) {
  RoutingScale s;
  if (!m.is_moe() || m.moe.num_routed_experts <= 0)
    return s;
  // Tokens of one micro-batch entering a MoE block on a rank (the sequence split over CP, the
  // rows over SP), times top-k, over the group's ranks, per expert.
  const double sp = p.attention.sp && p.attention.tp > 1 ? p.attention.tp : 1;
  const double tokens = static_cast<double>(p.micro_batch) * static_cast<double>(seq) /
                        p.attention.cp / sp;
  s.expert_tokens = tokens * static_cast<double>(m.moe.experts_per_token) * p.moe.ep /
                    static_cast<double>(m.moe.num_routed_experts);
  if (p.moe.ep > 1)
    s.ep_per_node = plan_mesh(p, gpus_per_node).view("moe").ranks_per_node(ep_group(),
                                                                          gpus_per_node);
  return s;
}

RankLoads rank_loads(const Plan& p, const workload::ModelSpec& m,
                     const std::vector<std::vector<double>>& expert_loads,
                     const RoutingScale& scale) {
  RankLoads r;
  const auto L = static_cast<std::size_t>(m.num_layers());
  if (expert_loads.size() != L)
    throw InputError(fmt::format("routing: {} rows of expert loads for {} layers of {}.",
                                 expert_loads.size(), L, m.name));
  const auto experts = static_cast<std::size_t>(m.moe.num_routed_experts);
  r.ep = std::max(1, p.moe.ep);
  const auto ep = static_cast<std::size_t>(r.ep);
  r.local_experts = experts > 0 ? static_cast<int>(experts / ep) : 0;
  const double cap = p.moe.capacity_factor > 0 ? p.moe.capacity_factor
                                               : std::numeric_limits<double>::infinity();
  r.capped.resize(L);
  r.rank.resize(L);
  r.exchange.assign(L, 1.0);
  for (std::size_t l = 0; l < L; ++l) {
    const auto& row = expert_loads[l];
    if (row.empty())
      continue;
    if (row.size() != experts || experts % ep != 0)
      throw InputError(fmt::format("routing: layer {} has {} expert loads; {} has {} routed "
                                   "experts over ep {}.",
                                   l, row.size(), m.name, experts, ep));
    auto& c = r.capped[l];
    c.resize(experts);
    for (std::size_t e = 0; e < experts; ++e)
      c[e] = std::min(row[e], cap);
    auto& f = r.rank[l];
    f.assign(ep, 0.0);
    const std::size_t local = experts / ep;
    for (std::size_t e = 0; e < experts; ++e)
      f[e / local] += c[e] / static_cast<double>(local);
    for (double x : f)
      r.uniform = r.uniform && x == 1.0;
    for (double x : c)
      r.uniform = r.uniform && x == 1.0;
    r.exchange[l] = *std::max_element(f.begin(), f.end());
  }
  if (p.moe.rebalance == Rebalance::least_loaded && ep > 1)
    rebalance(p, scale, r);
  return r;
}

double worst_rank_load(const RankLoads& r) {
  double worst = 1;
  for (double x : r.exchange)
    worst = std::max(worst, x);
  return worst;
}

HotRank rank_summary(const RankLoads& r, int ep_rank) {
  HotRank h;
  h.ep_rank = ep_rank;
  double sum = 0;
  int layers = 0;
  for (std::size_t l = 0; l < r.rank.size(); ++l) {
    if (r.rank[l].empty())
      continue;
    const double f = r.rank[l][static_cast<std::size_t>(ep_rank)];
    sum += f;
    ++layers;
    if (h.layer < 0 || f > h.load) {
      h.layer = static_cast<int>(l);
      h.load = f;
      const auto first = static_cast<std::size_t>(ep_rank) * static_cast<std::size_t>(r.local_experts);
      const auto& c = r.capped[l];
      const auto it = std::max_element(c.begin() + static_cast<std::ptrdiff_t>(first),
                                       c.begin() + static_cast<std::ptrdiff_t>(first) + r.local_experts);
      h.expert = static_cast<int>(it - c.begin());
      h.expert_load = *it;
    }
  }
  h.mean_load = layers > 0 ? sum / layers : 1;
  return h;
}

HotRank hottest_rank(const RankLoads& r) {
  HotRank best = rank_summary(r, 0);
  for (int k = 1; k < r.ep; ++k) {
    const HotRank h = rank_summary(r, k);
    if (h.mean_load > best.mean_load)
      best = h;
  }
  return best;
}

std::string describe(const HotRank& h, int local_experts) {
  const int first = h.ep_rank * local_experts;
  const std::string experts =
      local_experts == 1 ? fmt::format("expert {}", first)
                         : fmt::format("experts {}-{}", first, first + local_experts - 1);
  if (h.layer < 0)
    return fmt::format("ep rank {} ({})", h.ep_rank, experts);
  return fmt::format("ep rank {} ({}): {:.2f}x the mean tokens over the MoE layers, {:.2f}x in "
                     "layer {} (expert {} at {:.2f}x)",
                     h.ep_rank, experts, h.mean_load, h.load, h.layer, h.expert, h.expert_load);
}

} // namespace mop::strategy
