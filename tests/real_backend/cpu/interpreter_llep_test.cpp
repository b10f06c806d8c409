// Least-loaded expert rebalancing (LLEP, workload/rebalance.hpp) as the program lowering writes it
// and the CPU interpreter runs it (docs/EXECUTOR.md): tiny-moe (layer 1 MoE: 8 experts, top-2)
// with the rows of overloaded ranks spilled, with copies of their experts' weights, to the least
// loaded ranks, and the copies' gradients added back into the owners'. The math is unchanged:
// loss, gradients and parameters equal the float64 single-rank reference as closely as without
// rebalancing.
#include "tests/support/program_case.hpp"

#include <cmath>
#include <cstdint>
#include <doctest/doctest.h>
#include <string>
#include <vector>

namespace real_backend_cpu_interpreter_llep_test {

using mop::strategy::Plan;
using mop::strategy::Rebalance;
using mop::test::expect_held_together;
using mop::test::make_case;

namespace {

void rebalance(Plan& p, double threshold, double capacity) {
  p.moe.rebalance = Rebalance::least_loaded;
  p.moe.rebalance_threshold = threshold;
  p.moe.rebalance_capacity = capacity;
  p.moe.rebalance_min_tokens = 1;
}

// The tensors of rank class 0 whose names start with `prefix`.
std::vector<std::size_t> tensors_named(const mop::sim::Schedule& s, const std::string& prefix) {
  std::vector<std::size_t> out;
  const auto& ts = s.classes[0].tensors;
  for (std::size_t t = 0; t < ts.size(); ++t)
    if (ts[t].name.rfind(prefix, 0) == 0)
      out.push_back(t);
  return out;
}

// The expert copies the ranks received, over the ranks and steps of a two-step run of the
// schedule from the usual start (tensors named `prefix`).
std::int64_t copies_received(const mop::test::Case& k, const std::string& prefix) {
  mop::real::RunOptions o;
  o.steps = 2;
  o.trace = true;
  const auto r = mop::real::interpret<double>(k.schedule, k.config,
                                              mop::real::DataSource::synthetic(k.config.vocab, 7),
                                              mop::real::initial_state<double>(k.config, 11), o);
  std::int64_t copies = 0;
  for (const auto& rank : r.runtime_rows)
    for (const auto& step : rank)
      for (std::size_t t : tensors_named(k.schedule, prefix))
        copies += std::max<std::int64_t>(0, step[t]);
  return copies;
}

} // namespace

TEST_CASE("interpreter LLEP: skewed routing spills rows and weights and trains as the reference" *
          doctest::test_suite("independent")) {
  // The router of "interpreter: expert parallelism with skewed routing": every token goes to
  // experts {0, 1} or {1, 2}, so the first EP rank holds almost every row. With λ = α = 1 and
  // no smallest share, the assignment spills to every other rank; each rank's expert GEMMs then
  // take at most ⌈mean⌉ rows.
  for (int ep : {2, 4}) {
    CAPTURE(ep);
    const auto k = make_case("tiny-moe", ep, 4, 16, [&](Plan& q) {
      q.moe.ep = ep;
      rebalance(q, 1.0, 1.0);
    });
    mop::real::RunOptions o;
    o.steps = 2;
    o.check = true;
    o.trace = true;
    const auto r = mop::real::interpret<double>(
        k.schedule, k.config, mop::real::DataSource::synthetic(k.config.vocab, 7),
        mop::test::skewed_router_start(k), o);
    mop::test::expect_reference_and_counts(r);
    CHECK(r.ops.at("llep_plan").count > 0);
    // Weight copies moved: the received copies' rows, over ranks and steps.
    const auto foreign = tensors_named(k.schedule, "L1.llep foreign up.mb");
    REQUIRE_FALSE(foreign.empty());
    std::int64_t copies = 0;
    for (const auto& rank : r.runtime_rows)
      for (const auto& step : rank)
        for (std::size_t t : foreign)
          copies += std::max<std::int64_t>(0, step[t]);
    CHECK(copies > 0);
    // Each rank's expert rows (own and foreign slots) at most ⌈α · mean⌉ of its EP group (the
    // world here), every micro-batch of every step.
    const auto dispatched = tensors_named(k.schedule, "L1.dispatched.mb");
    REQUIRE_FALSE(dispatched.empty());
    for (std::size_t t : dispatched)
      for (std::size_t step = 0; step < 2; ++step) {
        std::int64_t total = 0, most = 0;
        for (const auto& rank : r.runtime_rows) {
          total += rank[step][t];
          most = std::max(most, rank[step][t]);
        }
        const double mean = static_cast<double>(total) / ep;
        CAPTURE(step);
        CHECK(total > 0);
        CHECK(static_cast<double>(most) <= std::ceil(1.0 * mean));
      }
  }
}

TEST_CASE("interpreter LLEP: held together with and without a trigger" *
          doctest::test_suite("independent")) {
  // λ = 100: the routing never triggers, the same ops run with no copies and the dispatch is
  // Megatron's. λ = α = 1: the tiny model's random routing is uneven enough to spill.
  for (int ep : {2, 4})
    for (double threshold : {100.0, 1.0}) {
      CAPTURE(ep);
      CAPTURE(threshold);
      const auto k = make_case("tiny-moe", ep, 4, 16, [&](Plan& p) {
        p.moe.ep = ep;
        rebalance(p, threshold, threshold > 10 ? 1.1 : 1.0);
      });
      expect_held_together(k);
      const std::int64_t copies = copies_received(k, "L1.llep foreign up.mb");
      if (threshold > 10)
        CHECK(copies == 0);
      else
        CHECK(copies > 0);
    }
}

TEST_CASE("interpreter LLEP: two EP groups side by side, each planning its own rows" *
          doctest::test_suite("independent")) {
  // World 4 as EP 2 x expert data parallelism 2: each EP pair all-gathers its own counts and
  // rebalances them; the experts' gradients then sum over the pairs (ZeRO-1 over edp).
  const auto k = make_case("tiny-moe", 4, 8, 16, [](Plan& p) {
    p.moe.ep = 2;
    for (auto& s : p.state)
      s.zero = 1;
    rebalance(p, 1.0, 1.0);
  });
  expect_held_together(k);
  CHECK(copies_received(k, "L1.llep foreign up.mb") > 0);
}

TEST_CASE("interpreter LLEP: composes with a pipeline and ZeRO-3, and with activation offload" *
          doctest::test_suite("independent")) {
  // Two stages (dense, MoE | dense, MoE), EP 2 within each stage, every kind under ZeRO-3 (the
  // experts' weights gathered before they are copied to helpers), full recompute of the MoE
  // block (the exchange runs again before the backward).
  expect_held_together(make_case(mop::test::deeper("tiny-moe", 4), 4, 4, 16, [](Plan& p) {
    p.pp = 2;
    p.moe.ep = 2;
    for (auto& s : p.state)
      s.zero = 3;
    p.recompute[static_cast<int>(mop::strategy::LayerKind::moe)] =
        mop::strategy::Recompute::full;
    rebalance(p, 1.0, 1.0);
  }));
  // Activation offload of every layer with selective recompute: the dispatched rows and the
  // experts' activations go to the host and back, the received copies stay until the backward.
  expect_held_together(make_case("tiny-moe", 2, 4, 16, [](Plan& p) {
    p.moe.ep = 2;
    p.activation_offload = 1;
    for (auto& r : p.recompute)
      r = mop::strategy::Recompute::selective;
    rebalance(p, 1.0, 1.0);
  }));
}

} // namespace real_backend_cpu_interpreter_llep_test
