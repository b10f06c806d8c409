// The program IR held together: the CPU interpreter runs the lowered Schedule rank by rank, and
// (a) the loss, gradients and updated parameters equal the single-rank float64 reference,
// (b) the ops each rank ran (kind, communicator, bytes of the buffers it used) are exactly the
//     ops of its rank class in the Schedule, and
// (c) each rank's peak live bytes equal the simulator's memory tracker replaying its class's
//     allocations in program order (no allocator allowance: the interpreter allocates exactly
//     the Schedule's tensors).
#include "common/error.hpp"
#include "tests/support/program_case.hpp"

#include <doctest/doctest.h>

namespace real_backend_cpu_interpreter_test {

using mop::strategy::Plan;
using mop::test::expect_held_together;
using mop::test::make_case;

TEST_CASE("interpreter: one rank runs the lowered program as the reference trains" *
          doctest::test_suite("independent")) {
  expect_held_together(make_case("tiny-dense", 1, 2, 16, [](Plan&) {}));
}

TEST_CASE("interpreter: data parallelism under every ZeRO stage" *
          doctest::test_suite("independent")) {
  for (int zero = 0; zero <= 3; ++zero) {
    CAPTURE(zero);
    expect_held_together(make_case("tiny-dense", 2, 4, 16, [&](Plan& p) {
      for (auto& s : p.state)
        s.zero = zero;
    }));
  }
}

TEST_CASE("interpreter: HSDP shards in blocks and sums across them" *
          doctest::test_suite("independent")) {
  expect_held_together(make_case("tiny-dense", 4, 4, 16, [&](Plan& p) {
    for (auto& s : p.state) {
      s.zero = 3;
      s.shard_group = 2;
    }
  }));
}

TEST_CASE("interpreter: tensor and sequence parallelism with a vocabulary-parallel head" *
          doctest::test_suite("independent")) {
  expect_held_together(make_case("tiny-dense", 2, 2, 16, [](Plan& p) {
    p.attention.tp = 2;
    p.dense.tp = 2;
    p.embed.tp = 2;
  }));
  // Different TP degrees per layer kind, with DP and ZeRO-3 on top, and gradient accumulation.
  expect_held_together(make_case("tiny-dense", 4, 8, 16, [](Plan& p) {
    p.attention.tp = 2;
    p.dense.tp = 4;
    p.embed.tp = 1;
    p.micro_batch = 1;
    for (auto& s : p.state)
      s.zero = 3;
  }));
}

TEST_CASE("interpreter: tensor parallelism without sequence parallelism all-reduces whole rows" *
          doctest::test_suite("independent")) {
  // Megatron's TP without SP: every TP rank holds the micro-batch's whole rows, the row-parallel
  // GEMMs' outputs (and the column-parallel ones' input gradients) all-reduce, the norms'
  // gradients are whole on each TP rank and sum over the data-parallel ranks only.
  expect_held_together(make_case("tiny-dense", 2, 2, 16, [](Plan& p) {
    p.attention.tp = 2;
    p.attention.sp = false;
    p.dense.tp = 2;
    p.embed.tp = 2;
  }));
  // With DP and ZeRO-3 on top, and gradient accumulation.
  expect_held_together(make_case("tiny-dense", 4, 8, 16, [](Plan& p) {
    p.attention.tp = 2;
    p.attention.sp = false;
    p.dense.tp = 2;
    p.embed.tp = 2;
    p.micro_batch = 1;
    for (auto& s : p.state)
      s.zero = 3;
  }));
}

TEST_CASE("interpreter: selective and full recompute run the blocks again before their backward" *
          doctest::test_suite("independent")) {
  using mop::strategy::Recompute;
  for (Recompute r : {Recompute::selective, Recompute::full}) {
    CAPTURE(static_cast<int>(r));
    expect_held_together(make_case("tiny-dense", 1, 2, 16, [&](Plan& p) {
      for (auto& k : p.recompute)
        k = r;
    }));
    // With TP+SP (the recomputed block's collectives run again) and ZeRO-3 (the recompute uses
    // the backward's parameter gathers).
    expect_held_together(make_case("tiny-dense", 4, 4, 16, [&](Plan& p) {
      p.attention.tp = 2;
      p.dense.tp = 2;
      p.embed.tp = 2;
      for (auto& k : p.recompute)
        k = r;
      for (auto& s : p.state)
        s.zero = 3;
    }));
  }
}

TEST_CASE("interpreter: the host optimizer under every overlap mode" *
          doctest::test_suite("independent")) {
  using mop::strategy::OptimizerOverlap;
  using mop::strategy::Placement;
  for (auto mode : {OptimizerOverlap::after_backward, OptimizerOverlap::stream_backward,
                    OptimizerOverlap::stream_forward})
    for (int zero : {0, 2, 3}) {
      CAPTURE(static_cast<int>(mode));
      CAPTURE(zero);
      // Three steps: under stream-forward the update of one step runs inside the next, and the
      // last one after the run.
      expect_held_together(make_case("tiny-dense", 2, 4, 16,
                                     [&](Plan& p) {
                                       p.optimizer_on_host = true;
                                       p.optimizer = Placement::host;
                                       p.overlap = mode;
                                       for (auto& s : p.state)
                                         s.zero = zero;
                                     }),
                           3);
    }
  // FSDP2's CPU offload: the parameter shards live on the host and are uploaded for each gather.
  expect_held_together(make_case("tiny-dense", 2, 4, 16,
                                 [&](Plan& p) {
                                   p.optimizer_on_host = true;
                                   p.optimizer = Placement::host;
                                   p.params = Placement::host;
                                   p.overlap = OptimizerOverlap::stream_forward;
                                 }),
                       3);
}

TEST_CASE("interpreter: activation offload moves what the backward reads out and back" *
          doctest::test_suite("independent")) {
  using mop::strategy::Recompute;
  for (Recompute r : {Recompute::none, Recompute::selective, Recompute::full}) {
    CAPTURE(static_cast<int>(r));
    expect_held_together(make_case("tiny-dense", 2, 4, 16, [&](Plan& p) {
      p.activation_offload = 0.5;
      p.attention.tp = 2;
      p.dense.tp = 2;
      for (auto& k : p.recompute)
        k = r;
    }));
  }
  expect_held_together(make_case("tiny-dense", 1, 2, 16, [&](Plan& p) {
    p.activation_offload = 1;
    p.recompute[static_cast<int>(mop::strategy::LayerKind::attention)] = Recompute::full;
  }));
}

TEST_CASE("interpreter: a plan the program cannot lower is refused with one sentence" *
          doctest::test_suite("plumbing")) {
  // TP 4 over tiny-dense's 2 key/value heads replicates them: lowered with a priced-only
  // projection, which the interpreter refuses by name.
  CHECK_THROWS_AS(
      expect_held_together(make_case("tiny-dense", 4, 4, 16, [](Plan& p) { p.attention.tp = 4; })),
      mop::InputError);
}

TEST_CASE("interpreter: the last step's timeline runs each rank's ops in program order, from 0" *
          doctest::test_suite("plumbing")) {
  const auto k = make_case("tiny-dense", 2, 4, 16, [](Plan& p) {
    for (auto& s : p.state)
      s.zero = 3;
  });
  mop::real::RunOptions o;
  o.steps = 2;
  o.timeline = true;
  const auto data = mop::real::DataSource::synthetic(k.config.vocab, 3);
  const auto r = mop::real::interpret<double>(k.schedule, k.config, data,
                                              mop::real::initial_state<double>(k.config, 11), o);
  REQUIRE(r.timeline.size() == 2);
  double earliest = 1e30;
  for (int rank = 0; rank < 2; ++rank) {
    const auto& ops = r.timeline[static_cast<std::size_t>(rank)];
    CHECK(ops.size() == mop::test::class_of(k.schedule, rank).ops.size());
    double prev_end = 0;
    for (const auto& t : ops) {
      CHECK(t.start_s >= prev_end); // one after another, in program order
      CHECK(t.end_s >= t.start_s);
      prev_end = t.end_s;
      earliest = std::min(earliest, t.start_s);
    }
    CHECK(r.memory_timeline[static_cast<std::size_t>(rank)].size() == ops.size());
  }
  CHECK(earliest == 0.0);
}

} // namespace real_backend_cpu_interpreter_test
