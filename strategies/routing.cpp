#include "strategies/routing.hpp"

#include "common/error.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <limits>

namespace mop::strategy {

RankLoads rank_loads(const Plan& p, const workload::ModelSpec& m,
                     const std::vector<std::vector<double>>& expert_loads) {
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
