// Pipeline parallelism in the program IR: one rank class per stage, activations and their
// gradients sent between the same places of neighbouring stages, every schedule's order
// (strategies/pipeline.hpp), zero-bubble's held-back weight gradients and tied embeddings across
// the first and last stage. Each case of the equivalence matrix's pipelines (docs/EXECUTOR.md)
// is held together with the float64 reference, the Schedule's ops and its memory tracker
// (tests/support/program_case.hpp).
#include "tests/support/program_case.hpp"

#include <doctest/doctest.h>

namespace real_backend_cpu_interpreter_pp_test {

using mop::strategy::PipelineSchedule;
using mop::strategy::Plan;
using mop::test::deeper;
using mop::test::expect_held_together;
using mop::test::make_case;

TEST_CASE("interpreter: two pipeline stages under GPipe, 1F1B and zero-bubble" *
          doctest::test_suite("independent")) {
  for (auto s :
       {PipelineSchedule::gpipe, PipelineSchedule::one_f_one_b, PipelineSchedule::zero_bubble}) {
    CAPTURE(static_cast<int>(s));
    const auto k = make_case(deeper("tiny-dense", 4), 2, 4, 16, [&](Plan& p) {
      p.pp = 2;
      p.schedule = s;
    });
    REQUIRE(k.schedule.classes.size() == 2);
    expect_held_together(k);
  }
}

TEST_CASE("interpreter: interleaved 1F1B with two model chunks per stage" *
          doctest::test_suite("independent")) {
  // Four layers over 2 stages x 2 chunks: stage 0 holds layers 0 and 2, stage 1 layers 1 and 3,
  // so activations cross from the last stage back to the first between the chunks.
  expect_held_together(make_case(deeper("tiny-dense", 4), 2, 4, 16, [](Plan& p) {
    p.pp = 2;
    p.vp = 2;
    p.schedule = PipelineSchedule::interleaved_1f1b;
  }));
}

TEST_CASE("interpreter: a pipeline accumulates gradients over many micro-batches" *
          doctest::test_suite("independent")) {
  // Sixteen micro-batches of one sequence through two stages: 1F1B's steady state and
  // zero-bubble's held-back weight gradients over many passes; the reference sees the sixteen
  // sequences at once.
  for (auto s : {PipelineSchedule::one_f_one_b, PipelineSchedule::zero_bubble}) {
    CAPTURE(static_cast<int>(s));
    expect_held_together(make_case(deeper("tiny-dense", 4), 2, 16, 16, [&](Plan& p) {
      p.pp = 2;
      p.micro_batch = 1;
      p.schedule = s;
    }));
  }
}

TEST_CASE("interpreter: tied embeddings across pipeline stages, vocabulary parallel" *
          doctest::test_suite("independent")) {
  // tiny-dense ties the LM head to the embedding: stage 0 and the last stage hold copies whose
  // gradients are summed (Megatron's embedding group), under every ZeRO stage.
  const auto spec = deeper("tiny-dense", 4);
  REQUIRE(spec.tied_embeddings);
  for (int zero = 0; zero <= 3; ++zero) {
    CAPTURE(zero);
    expect_held_together(make_case(spec, 4, 4, 16, [&](Plan& p) {
      p.pp = 2;
      p.embed.tp = 2;
      for (auto& s : p.state)
        s.zero = zero;
    }));
  }
  // Four stages: the tied group skips the two middle ones.
  expect_held_together(make_case(spec, 4, 4, 16, [&](Plan& p) { p.pp = 4; }));
  // Data parallel copies of both ends, their state sharded: the last stage's copy shards as the
  // first stage's table does (the final norm in a bucket of its own).
  for (int zero : {1, 3}) {
    CAPTURE(zero);
    const auto k = make_case(spec, 4, 4, 16, [&](Plan& p) {
      p.pp = 2;
      for (auto& s : p.state)
        s.zero = zero;
    });
    int final_norm = 0;
    for (const auto& b : k.schedule.buckets)
      final_norm += b.name == "final norm" ? 1 : 0;
    CHECK(final_norm == 1);
    expect_held_together(k);
  }
}

TEST_CASE("interpreter: an untied LM head on the last stage" * doctest::test_suite("independent")) {
  auto spec = deeper("tiny-dense", 4);
  spec.tied_embeddings = false;
  expect_held_together(make_case(spec, 4, 4, 16, [](Plan& p) {
    p.pp = 2;
    p.embed.tp = 2;
    for (auto& s : p.state)
      s.zero = 3;
  }));
}

TEST_CASE("interpreter: pipeline with tensor and data parallelism" *
          doctest::test_suite("independent")) {
  // Eight ranks: two stages of TP 2 x DP 2, a different ZeRO stage per kind, zero-bubble.
  expect_held_together(make_case(deeper("tiny-dense", 4), 8, 8, 16, [](Plan& p) {
    p.pp = 2;
    p.attention.tp = 2;
    p.dense.tp = 2;
    p.embed.tp = 2;
    p.schedule = PipelineSchedule::zero_bubble;
    p.state[0].zero = 3;
    p.state[1].zero = 1;
    p.state[2].zero = 3;
    p.state[3].zero = 2;
  }));
}

TEST_CASE("interpreter: pipelines with every other feature of the program" *
          doctest::test_suite("independent")) {
  using mop::strategy::CpKind;
  using mop::strategy::OptimizerOverlap;
  using mop::strategy::PipelineSchedule;
  using mop::strategy::Placement;
  using mop::strategy::Recompute;
  // The 8-rank mixture (PP 2, TP 2 x ring CP 2, a ZeRO stage per kind, recompute, offload, the
  // host optimizer streamed into the next forward), on a dense model.
  mop::test::expect_held_together(mop::test::make_case(mop::test::deeper("tiny-dense", 4), 8, 4, 32,
                                                       [](Plan& p) {
                                                         p.pp = 2;
                                                         p.schedule = PipelineSchedule::one_f_one_b;
                                                         p.attention.tp = 2;
                                                         p.dense.tp = 2;
                                                         p.embed.tp = 2;
                                                         p.attention.cp = 2;
                                                         p.attention.cp_kind = CpKind::ring;
                                                         p.state[0].zero = 3;
                                                         p.state[2].zero = 1;
                                                         p.state[3].zero = 2;
                                                         for (auto& r : p.recompute)
                                                           r = Recompute::selective;
                                                         p.activation_offload = 0.5;
                                                         p.optimizer_on_host = true;
                                                         p.optimizer = Placement::host;
                                                         p.overlap =
                                                             OptimizerOverlap::stream_forward;
                                                       }),
                                  3);
  // Experts under a zero-bubble pipeline.
  mop::test::expect_held_together(
      mop::test::make_case(mop::test::deeper("tiny-moe", 4), 4, 4, 16, [](Plan& p) {
        p.pp = 2;
        p.schedule = PipelineSchedule::zero_bubble;
        p.moe.ep = 2;
      }));
}

TEST_CASE("interpreter: gradients summed on the host under pipelines" *
          doctest::test_suite("independent")) {
  using mop::strategy::OptimizerOverlap;
  using mop::strategy::Placement;
  auto host = [](Plan& p) {
    p.optimizer_on_host = true;
    p.optimizer = Placement::host;
    p.grads = Placement::host;
    p.overlap = OptimizerOverlap::stream_forward;
  };
  // Zero-bubble holds each micro-batch's reductions and downloads back with its weight
  // gradients; an untied head on the last stage.
  for (int zero : {1, 3}) {
    CAPTURE(zero);
    expect_held_together(make_case(deeper("tiny-moe", 4), 4, 8, 16,
                                   [&](Plan& p) {
                                     p.pp = 2;
                                     p.schedule = PipelineSchedule::zero_bubble;
                                     p.micro_batch = 1;
                                     host(p);
                                     for (auto& s : p.state)
                                       s.zero = zero;
                                   }),
                         3);
  }
  // Tied embeddings across the stages sum the two copies' gradients once per step, so their
  // buckets keep their gradients on the GPU until the step (the final norm's too, sharded beside
  // them under ZeRO-1); interleaved 1F1B.
  expect_held_together(make_case(deeper("tiny-dense", 4), 4, 8, 16,
                                 [&](Plan& p) {
                                   p.pp = 2;
                                   p.vp = 2;
                                   p.schedule = PipelineSchedule::interleaved_1f1b;
                                   p.micro_batch = 1;
                                   host(p);
                                   for (auto& s : p.state)
                                     s.zero = 1;
                                 }),
                       3);
}

} // namespace real_backend_cpu_interpreter_pp_test
