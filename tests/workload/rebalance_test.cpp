// Least-loaded rebalancing (LLEP): a hand-worked assignment, the capacity bound over many
// random layers, and exactness (every expert's tokens covered once, in order).
#include "workload/catalog.hpp"
#include "workload/rebalance.hpp"
#include "workload/routing.hpp"

#include <doctest/doctest.h>
#include <cmath>
#include <map>
#include <numeric>

namespace workload_rebalance_test {

using namespace mop::workload;

namespace {

// Every expert's segments cover [0, tokens) once, contiguous, in order, and the ranks' totals
// are their segments'.
bool exact(const std::vector<double>& tokens, int ep, const Rebalanced& r) {
  std::map<int, double> next;
  std::vector<double> per_rank(static_cast<std::size_t>(ep), 0.0);
  bool ok = true;
  auto near = [](double a, double b) { return std::abs(a - b) <= 1e-9 * std::max(1.0, std::abs(b)); };
  for (const Segment& s : r.segments) {
    ok = ok && near(s.begin, next[s.expert]) && s.end > s.begin;
    next[s.expert] = s.end;
    per_rank[static_cast<std::size_t>(s.rank)] += s.tokens();
  }
  for (std::size_t e = 0; e < tokens.size(); ++e)
    ok = ok && near(next[static_cast<int>(e)], tokens[e]);
  for (int g = 0; g < ep; ++g)
    ok = ok && near(per_rank[static_cast<std::size_t>(g)], r.rank_tokens[static_cast<std::size_t>(g)]);
  return ok;
}

} // namespace

TEST_CASE("rebalance: a hot expert spread over four ranks, by hand" *
          doctest::test_suite("independent")) {
  // 8 experts on 4 ranks (two each), two ranks per node. Tokens 60 20 10 10 10 10 10 10: rank 0
  // holds 80 of 140 (2.29x the mean of 35), so it rebalances with capacity α = 1 → 35 each.
  // Expert 0 first: rank 0 keeps 35 − 20 (its expert 1 still pending) = 15, its node-mate rank 1
  // takes 15 (room 35 − 20), then ranks 2 and 3 (room 15 each) take 15 each. Everything else
  // stays home, and every rank ends at exactly 35.
  const std::vector<double> t{60, 20, 10, 10, 10, 10, 10, 10};
  RebalanceOptions o;
  o.threshold = 1.3;
  o.capacity = 1.0;
  o.min_tokens = 1;
  o.ranks_per_node = 2;
  o.whole = true;
  const Rebalanced r = least_loaded(t, 4, o);
  REQUIRE(r.triggered);
  CHECK(r.capacity == 35);
  REQUIRE(r.segments.size() >= 4);
  const std::vector<std::pair<int, double>> e0{{0, 15}, {1, 15}, {2, 15}, {3, 15}};
  for (std::size_t i = 0; i < e0.size(); ++i) {
    CHECK(r.segments[i].expert == 0);
    CHECK(r.segments[i].rank == e0[i].first);
    CHECK(r.segments[i].tokens() == e0[i].second);
  }
  CHECK(r.segments.size() == 4 + 7); // the other experts one segment each, at home
  for (double x : r.rank_tokens)
    CHECK(x == 35);
  CHECK(exact(t, 4, r));
  // A minimum share of 20 tokens cannot be met by any helper (room 15 each): the shares are
  // taken anyway (the minimum is avoided, never at the cost of the capacity).
  o.min_tokens = 20;
  const Rebalanced m = least_loaded(t, 4, o);
  for (double x : m.rank_tokens)
    CHECK(x == 35);
}

TEST_CASE("rebalance: below the threshold nothing moves" * doctest::test_suite("independent")) {
  // Rank loads 12, 10, 9, 9 (mean 10): 1.2x < 1.3, every expert stays with its owner.
  const std::vector<double> t{7, 5, 5, 5, 4, 5, 4, 5};
  RebalanceOptions o;
  o.whole = true;
  const Rebalanced r = least_loaded(t, 4, o);
  CHECK_FALSE(r.triggered);
  CHECK(r.segments.size() == 8);
  for (const Segment& s : r.segments)
    CHECK(s.rank == s.expert / 2);
  CHECK(r.rank_tokens == std::vector<double>{12, 10, 9, 9});
}

TEST_CASE("rebalance: no rank above the capacity (<= λ · mean), over random skewed layers" *
          doctest::test_suite("independent")) {
  // Zipf and Dirichlet loads of Kimi-K2's 384 experts over ep 8..64, as whole token counts and as
  // expected loads; α = 1.1 <= λ = 1.3, so rebalanced ranks hold at most ⌈1.1 · mean⌉.
  const ModelSpec m = load_model("kimi-k2");
  int triggered = 0;
  for (const char* spec : {"zipf:1.2", "dirichlet:0.3", "imbalance:3", "imbalance:1.2"})
    for (std::uint64_t seed = 1; seed <= 3; ++seed) {
      const auto loads = expert_loads(parse_routing(spec, seed), m);
      for (std::size_t l = 0; l < loads.size(); l += 5) {
        const auto& row = loads[l];
        if (row.empty())
          continue;
        for (int ep : {8, 32, 64})
          for (bool whole : {true, false}) {
            std::vector<double> t(row.size());
            for (std::size_t e = 0; e < row.size(); ++e)
              t[e] = whole ? std::round(row[e] * 4096) : row[e] * 4096;
            RebalanceOptions o;
            o.ranks_per_node = 8;
            o.whole = whole;
            const Rebalanced r = least_loaded(t, ep, o);
            const double total = std::accumulate(t.begin(), t.end(), 0.0);
            const double mean = total / ep;
            double worst = 0;
            for (double x : r.rank_tokens)
              worst = std::max(worst, x);
            if (r.triggered) {
              ++triggered;
              CHECK(worst <= (whole ? std::ceil(1.1 * mean) : 1.1 * mean * (1 + 1e-9)));
            }
            CHECK(worst <= std::max(1.3 * mean, whole ? std::ceil(1.1 * mean) : 0.0) * (1 + 1e-9));
            CHECK(exact(t, ep, r));
          }
      }
    }
  CHECK(triggered > 50);
}

} // namespace workload_rebalance_test
