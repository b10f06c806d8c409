#include "workload/rebalance.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace mop::workload {

Rebalanced least_loaded(const std::vector<double>& expert_tokens, int ep,
                        const RebalanceOptions& options) {
  Rebalanced out;
  const auto experts = static_cast<std::int64_t>(expert_tokens.size());
  const auto n = static_cast<std::size_t>(std::max(ep, 1));
  out.rank_tokens.assign(n, 0.0);
  if (experts == 0)
    return out;
  std::vector<double> native(n, 0.0);
  for (std::int64_t e = 0; e < experts; ++e)
    native[static_cast<std::size_t>(expert_owner(e, experts, static_cast<int>(n)))] +=
        expert_tokens[static_cast<std::size_t>(e)];
  const double total = std::accumulate(native.begin(), native.end(), 0.0);
  const double mean = total / static_cast<double>(n);
  const double most = *std::max_element(native.begin(), native.end());
  if (n == 1 || !(total > 0) || most <= options.threshold * mean) {
    for (std::int64_t e = 0; e < experts; ++e) {
      const double t = expert_tokens[static_cast<std::size_t>(e)];
      if (t > 0)
        out.segments.push_back(
            Segment{static_cast<int>(e), expert_owner(e, experts, static_cast<int>(n)), 0, t});
    }
    out.rank_tokens = native;
    return out;
  }
  out.triggered = true;
  double cap = std::max(options.capacity, 1.0) * mean;
  if (options.whole)
    cap = std::max(1.0, std::ceil(cap - 1e-9 * cap));
  out.capacity = cap;
  // The hottest first; ties by index, so every rank computes the same order.
  std::vector<std::int64_t> order(static_cast<std::size_t>(experts));
  std::iota(order.begin(), order.end(), std::int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
    return expert_tokens[static_cast<std::size_t>(a)] > expert_tokens[static_cast<std::size_t>(b)];
  });
  // A rank's effective load: what it was assigned plus its own experts not yet placed (so a
  // helper is not picked when its own hot experts are still to come).
  std::vector<double> pending = native, assigned(n, 0.0);
  auto effective = [&](std::size_t g) { return assigned[g] + pending[g]; };
  const int per_node = std::max(1, options.ranks_per_node);
  std::vector<std::vector<Segment>> by_expert(static_cast<std::size_t>(experts));
  std::vector<std::size_t> helpers;
  helpers.reserve(n);
  for (std::int64_t e : order) {
    const double t = expert_tokens[static_cast<std::size_t>(e)];
    if (!(t > 0))
      continue;
    const auto o = static_cast<std::size_t>(expert_owner(e, experts, static_cast<int>(n)));
    auto& segs = by_expert[static_cast<std::size_t>(e)];
    pending[o] -= t;
    // Real-valued loads: a remainder this small is rounding, not tokens.
    const double eps = options.whole ? 0.5 : 1e-9 * t;
    double keep = std::clamp(cap - effective(o), 0.0, t);
    if (t - keep <= eps)
      keep = t;
    if (keep > eps) {
      segs.push_back(Segment{static_cast<int>(e), static_cast<int>(o), 0, keep});
      assigned[o] += keep;
    }
    double offset = keep > eps ? keep : 0, rest = t - offset;
    while (rest > eps) {
      // The other ranks, the owner's node first, then by effective load, then by index.
      helpers.clear();
      for (std::size_t g = 0; g < n; ++g)
        if (g != o)
          helpers.push_back(g);
      const auto node_of = [&](std::size_t g) { return static_cast<int>(g) / per_node; };
      std::stable_sort(helpers.begin(), helpers.end(), [&](std::size_t a, std::size_t b) {
        const bool fa = node_of(a) != node_of(o), fb = node_of(b) != node_of(o);
        if (fa != fb)
          return !fa;
        return effective(a) < effective(b);
      });
      std::size_t pick = n;
      double chunk = 0;
      for (int pass = 0; pass < 2 && pick == n; ++pass)
        for (std::size_t g : helpers) {
          const double room = cap - effective(g);
          if (!(room > eps))
            continue;
          double c = std::min(rest, room);
          if (rest - c <= eps)
            c = rest;
          // First pass: no share below the minimum unless it finishes the expert.
          if (pass == 0 && c < options.min_tokens && c < rest)
            continue;
          pick = g;
          chunk = c;
          break;
        }
      if (pick == n) {
        // No room anywhere (cannot happen while ep · capacity >= total): the least loaded.
        pick = *std::min_element(helpers.begin(), helpers.end(), [&](std::size_t a, std::size_t b) {
          return effective(a) < effective(b);
        });
        chunk = rest;
      }
      segs.push_back(Segment{static_cast<int>(e), static_cast<int>(pick), offset, offset + chunk});
      assigned[pick] += chunk;
      offset += chunk;
      rest -= chunk;
    }
  }
  for (auto& segs : by_expert)
    for (const Segment& s : segs)
      out.segments.push_back(s);
  out.rank_tokens = assigned;
  return out;
}

} // namespace mop::workload
