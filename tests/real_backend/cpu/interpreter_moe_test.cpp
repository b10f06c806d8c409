// The program IR with Mixture-of-Experts layers held together: tiny-moe (layer 0 dense, layer 1
// MoE: 8 experts, top-2, normalised weights) lowered by the program lowering and run by the CPU
// interpreter under the MoE plans of the equivalence matrix (docs/EXECUTOR.md). Each case passes
// all three checks of tests/support/program_case.hpp: (a) loss, gradients and parameters equal the
// float64 single-rank reference; (b) every rank ran its class's ops in order (kind and communicator
// exactly; bytes exactly for static ops, and for routing-sized ops the Schedule's operands at
// the rows the routing gave, whose world sums equal the Schedule's expected bytes, or exceed
// them only by the ETP gather's padding); (c) each rank's peak live bytes equal the memory
// tracker's replay with the routing-sized tensors at the rows they had.
#include "tests/support/program_case.hpp"

#include <algorithm>
#include <cstdint>
#include <doctest/doctest.h>
#include <functional>
#include <vector>

namespace real_backend_cpu_interpreter_moe_test {

using mop::strategy::Plan;
using mop::test::expect_held_together;
using mop::test::make_case;

TEST_CASE("interpreter MoE: one rank routes, runs every expert and trains as the reference" *
          doctest::test_suite("independent")) {
  expect_held_together(make_case("tiny-moe", 1, 2, 16, [](Plan&) {}));
}

TEST_CASE("interpreter MoE: data parallelism under every ZeRO stage" *
          doctest::test_suite("independent")) {
  for (int zero = 0; zero <= 3; ++zero) {
    CAPTURE(zero);
    expect_held_together(make_case("tiny-moe", 2, 4, 16, [&](Plan& p) {
      for (auto& s : p.state)
        s.zero = zero;
    }));
  }
}

TEST_CASE("interpreter MoE: expert parallelism dispatches by counts over 2 and 4 ranks" *
          doctest::test_suite("independent")) {
  expect_held_together(make_case("tiny-moe", 2, 2, 16, [](Plan& p) { p.moe.ep = 2; }));
  expect_held_together(make_case("tiny-moe", 4, 4, 16, [](Plan& p) { p.moe.ep = 4; }));
}

TEST_CASE("interpreter MoE: expert tensor parallelism gathers count tables and padded rows" *
          doctest::test_suite("independent")) {
  expect_held_together(make_case("tiny-moe", 4, 4, 16, [](Plan& p) {
    p.moe.ep = 2;
    p.moe.etp = 2;
  }));
  // ETP alone (no EP): every rank holds every expert's half width.
  expect_held_together(make_case("tiny-moe", 2, 2, 16, [](Plan& p) { p.moe.etp = 2; }));
}

TEST_CASE("interpreter MoE: tensor and sequence parallelism route each rank's SP rows" *
          doctest::test_suite("independent")) {
  expect_held_together(make_case("tiny-moe", 2, 2, 16, [](Plan& p) {
    p.attention.tp = 2;
    p.dense.tp = 2;
    p.embed.tp = 2;
  }));
  // With EP over the TP ranks, ZeRO-3 and gradient accumulation on top.
  expect_held_together(make_case("tiny-moe", 4, 8, 16, [](Plan& p) {
    p.attention.tp = 2;
    p.dense.tp = 2;
    p.moe.ep = 2;
    p.micro_batch = 1;
    for (auto& s : p.state)
      s.zero = 3;
  }));
}

TEST_CASE("interpreter MoE: HSDP shards the experts in blocks and sums across them" *
          doctest::test_suite("independent")) {
  expect_held_together(make_case("tiny-moe", 4, 4, 16, [](Plan& p) {
    for (auto& s : p.state) {
      s.zero = 3;
      s.shard_group = 2;
    }
  }));
}

TEST_CASE("interpreter MoE: a rank the routing leaves without rows, or gives more than the "
          "expectation, runs its share" *
          doctest::test_suite("independent")) {
  // One token per sequence: each rank routes 1 x 2 (token, slot) rows, so an EP rank expects 2
  // and the routing of a few tokens leaves some ranks none and gives others 4.
  const auto k = make_case("tiny-moe", 4, 4, 1, [](Plan& p) {
    p.moe.ep = 2;
    p.moe.etp = 2;
  });
  expect_held_together(k);
  mop::real::RunOptions o;
  o.steps = 2;
  o.trace = true;
  const auto data = mop::real::DataSource::synthetic(k.config.vocab, 7);
  const auto r = mop::real::interpret<double>(k.schedule, k.config, data,
                                              mop::real::initial_state<double>(k.config, 11), o);
  int dispatched = -1;
  const auto& tensors = k.schedule.classes[0].tensors;
  for (std::size_t t = 0; t < tensors.size(); ++t)
    if (tensors[t].name == "L1.dispatched.mb0")
      dispatched = static_cast<int>(t);
  REQUIRE(dispatched >= 0);
  CHECK(tensors[static_cast<std::size_t>(dispatched)].shape[0] == 2);
  std::int64_t fewest = 1 << 20, most = 0;
  for (const auto& rank : r.runtime_rows)
    for (const auto& step : rank) {
      fewest = std::min(fewest, step[static_cast<std::size_t>(dispatched)]);
      most = std::max(most, step[static_cast<std::size_t>(dispatched)]);
    }
  CHECK(fewest == 0);
  CHECK(most > 2);
}

TEST_CASE("interpreter MoE: the program issues the expert all-to-alls counted by hand" *
          doctest::test_suite("independent")) {
  // Per MoE layer and micro-batch the count exchange, dispatch and combine, and the backward's
  // two: 5 all-to-alls; none on an EP group of one rank.
  const std::vector<std::function<void(Plan&)>> plans = {
      [](Plan& p) { p.moe.ep = 2; },
      [](Plan& p) { p.moe.ep = 4; },
      [](Plan& p) {
        p.moe.ep = 2;
        p.moe.etp = 2;
      },
      [](Plan& p) { p.moe.etp = 2; },
  };
  for (std::size_t i = 0; i < plans.size(); ++i) {
    CAPTURE(i);
    const auto k = make_case("tiny-moe", 4, 4, 16, plans[i]);
    mop::real::RunOptions o;
    o.seq_len = 16;
    const auto data = mop::real::DataSource::synthetic(k.config.vocab, 7);
    const auto start = mop::real::initial_state<double>(k.config, 11);
    const auto program = mop::real::interpret<double>(k.schedule, k.config, data, start, o);
    const auto it = program.ops.find("all_to_all");
    const std::int64_t count = it == program.ops.end() ? 0 : it->second.count;
    // One MoE layer, one micro-batch per rank, four ranks: 5 each with EP.
    CHECK(count == (k.plan.moe.ep > 1 ? 4 * 5 : 0));
  }
}

TEST_CASE("interpreter: experts under recompute and activation offload" *
          doctest::test_suite("independent")) {
  using mop::strategy::LayerKind;
  using mop::strategy::Recompute;
  // The equivalence matrix's case: EP 2, half the layers offloaded, attention fully recomputed.
  mop::test::expect_held_together(mop::test::make_case("tiny-moe", 2, 4, 16, [](Plan& p) {
    p.moe.ep = 2;
    p.activation_offload = 0.5;
    p.recompute[static_cast<int>(LayerKind::attention)] = Recompute::full;
  }));
  for (Recompute r : {Recompute::selective, Recompute::full}) {
    CAPTURE(static_cast<int>(r));
    mop::test::expect_held_together(mop::test::make_case("tiny-moe", 4, 4, 16, [&](Plan& p) {
      p.moe.ep = 2;
      p.moe.etp = 2;
      p.activation_offload = 1;
      for (auto& k : p.recompute)
        k = r;
      for (auto& s : p.state)
        s.zero = 3;
    }));
  }
}

TEST_CASE("interpreter: expert parallelism with skewed routing" *
          doctest::test_suite("independent")) {
  // A router that scores only expert 0 (all other logits exactly 0, ties going to the lower
  // index) sends every token to experts {0, 1} or {1, 2}: with EP 4 the first expert rank gets
  // almost every row, the second a few and the last two none, so the all-to-all-v counts are as
  // uneven as they get, zeros included.
  for (int etp : {1, 2}) {
    CAPTURE(etp);
    const auto k = mop::test::make_case("tiny-moe", 4, 4, 16, [&](Plan& q) {
      q.moe.ep = 4 / etp;
      q.moe.etp = etp;
    });
    mop::real::RunOptions o;
    o.steps = 2;
    o.check = true;
    const auto r = mop::real::interpret<double>(
        k.schedule, k.config, mop::real::DataSource::synthetic(k.config.vocab, 7),
        mop::test::skewed_router_start(k), o);
    mop::test::expect_reference_and_counts(r);
  }
}

TEST_CASE("interpreter MoE: ring context parallelism over 2 and 4 ranks" *
          doctest::test_suite("independent")) {
  for (int cp : {2, 4}) {
    CAPTURE(cp);
    expect_held_together(make_case("tiny-moe", cp, 2, 16, [&](Plan& p) { p.attention.cp = cp; }));
  }
}

TEST_CASE("interpreter MoE: pipelines under every schedule" * doctest::test_suite("independent")) {
  using mop::strategy::PipelineSchedule;
  // Four layers (dense, MoE, dense, MoE) over two stages.
  for (auto s : {PipelineSchedule::gpipe, PipelineSchedule::one_f_one_b,
                 PipelineSchedule::zero_bubble, PipelineSchedule::interleaved_1f1b}) {
    CAPTURE(static_cast<int>(s));
    expect_held_together(make_case(mop::test::deeper("tiny-moe", 4), 2, 4, 16, [&](Plan& p) {
      p.pp = 2;
      p.vp = s == PipelineSchedule::interleaved_1f1b ? 2 : 1;
      p.schedule = s;
    }));
  }
}

TEST_CASE("interpreter MoE: recompute under tensor parallelism" *
          doctest::test_suite("independent")) {
  using mop::strategy::Recompute;
  for (Recompute r : {Recompute::selective, Recompute::full}) {
    CAPTURE(static_cast<int>(r));
    expect_held_together(make_case("tiny-moe", 2, 4, 16, [&](Plan& p) {
      p.attention.tp = 2;
      p.dense.tp = 2;
      for (auto& k : p.recompute)
        k = r;
    }));
  }
}

TEST_CASE("interpreter MoE: the host optimizer under every overlap mode" *
          doctest::test_suite("independent")) {
  using mop::strategy::OptimizerOverlap;
  for (auto mode : {OptimizerOverlap::after_backward, OptimizerOverlap::stream_backward,
                    OptimizerOverlap::stream_forward}) {
    CAPTURE(static_cast<int>(mode));
    // Three steps: under stream-forward the update of one step runs inside the next.
    expect_held_together(make_case("tiny-moe", 2, 4, 16,
                                   [&](Plan& p) {
                                     p.optimizer_on_host = true;
                                     p.optimizer = mop::strategy::Placement::host;
                                     p.overlap = mode;
                                     for (auto& s : p.state)
                                       s.zero = 2;
                                   }),
                         3);
  }
}

TEST_CASE("interpreter MoE: a mixture of every parallelism on 8 ranks" *
          doctest::test_suite("independent")) {
  // The docs/example-plan.json kind of plan: two pipeline stages, attention TP 2 x ring CP 2,
  // experts EP 4, a different ZeRO stage per kind, full recompute, offload, the host optimizer
  // streamed into the next forward.
  expect_held_together(make_case(mop::test::deeper("tiny-moe", 4), 8, 4, 32, [](Plan& p) {
    p.pp = 2;
    p.attention.tp = 2;
    p.attention.cp = 2;
    p.moe.ep = 4;
    p.dense.tp = 2;
    p.embed.tp = 2;
    p.state[0].zero = 3;
    p.state[1].zero = 1;
    p.state[2].zero = 3;
    p.state[3].zero = 2;
    for (auto& r : p.recompute)
      r = mop::strategy::Recompute::full;
    p.activation_offload = 0.5;
    p.optimizer_on_host = true;
    p.optimizer = mop::strategy::Placement::host;
    p.overlap = mop::strategy::OptimizerOverlap::stream_forward;
  }));
}

TEST_CASE("interpreter: gradients summed on the host over the micro-batches, under every overlap "
          "mode" *
          doctest::test_suite("independent")) {
  // Each micro-batch's reduced gradients are downloaded into the host gradients (the first
  // download of a step overwrites them, the others add), which the host optimizer reads; under
  // stream-forward it reads the previous step's before this step's first download replaces
  // them. Four micro-batches of one sequence per rank, three steps (the last stream-forward
  // update runs after the run): ZeRO-1 over DP 2 (reduce-scatter into a transient shard), the
  // experts over EP 2 (their data-parallel group has one rank: nothing to reduce), one rank
  // (no group at all), ZeRO-0 (an all-reduce in place) and ZeRO-3, and HSDP (the shard summed
  // over the replicas every micro-batch).
  using mop::strategy::OptimizerOverlap;
  using mop::strategy::Placement;
  struct Row {
    const char* what;
    int world, zero, ep, shard_group;
  };
  const Row rows[] = {{"ZeRO-1 over DP 2", 2, 1, 1, 0}, {"experts EP 2, edp 1", 2, 1, 2, 0},
                      {"one rank", 1, 1, 1, 0},         {"ZeRO-0 over DP 2", 2, 0, 1, 0},
                      {"ZeRO-3 over DP 2", 2, 3, 1, 0}, {"HSDP 2 x 2", 4, 3, 1, 2}};
  for (auto mode : {OptimizerOverlap::after_backward, OptimizerOverlap::stream_backward,
                    OptimizerOverlap::stream_forward})
    for (const Row& r : rows) {
      CAPTURE(static_cast<int>(mode));
      CAPTURE(r.what);
      const auto k = make_case("tiny-moe", r.world, 4 * r.world, 16, [&](Plan& p) {
        p.micro_batch = 1;
        p.moe.ep = r.ep;
        p.optimizer_on_host = true;
        p.optimizer = Placement::host;
        p.grads = Placement::host;
        p.overlap = mode;
        for (auto& s : p.state) {
          s.zero = r.zero;
          s.shard_group = r.shard_group;
        }
      });
      int downloads = 0;
      for (const mop::sim::Op& op : k.schedule.classes[0].ops)
        downloads += op.name.find(".grad_download.mb") != std::string::npos ? 1 : 0;
      // Every bucket (embedding, head, two layers' attention and MLP or experts) downloads
      // every micro-batch.
      CHECK(downloads == static_cast<int>(k.schedule.buckets.size()) * 4);
      expect_held_together(k, 3);
    }
}

} // namespace real_backend_cpu_interpreter_moe_test
