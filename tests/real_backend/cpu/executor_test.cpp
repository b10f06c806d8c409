// The equivalence matrix: every Plan feature, played by the CPU executor on threads, trains the
// same model as the single-rank reference. The executor runs in double here, so any difference
// beyond summation order (about 1e-15 relative per operation) is a decomposition bug; the bound
// 1e-9 leaves six orders of magnitude for sums reordered across ranks. One float run checks the
// executor's production precision against the double reference.
#include "common/error.hpp"
#include "real_backend/cpu/checkpoint.hpp"
#include "real_backend/cpu/executor.hpp"
#include "strategies/plan.hpp"
#include "tests/support/approx.hpp"
#include "workload/catalog.hpp"

#include <cmath>
#include <cstdio>
#include <doctest/doctest.h>
#include <functional>

using namespace mop;
using namespace mop::real;
using strategy::Plan;

namespace {

TinyConfig model(const std::string& id, int layers = 0) {
  TinyConfig c = tiny_config(workload::load_model(id));
  while (layers > c.num_layers()) // deeper copies for pipelines: repeat the layer pattern
    c.layers.push_back(c.layers[c.layers.size() % 2]);
  return c;
}

Plan plan(int world, int global_batch, const std::function<void(Plan&)>& edit) {
  Plan p;
  p.world = world;
  p.global_batch = global_batch;
  edit(p);
  strategy::complete_plan(p);
  return p;
}

RunResult<double> check(const TinyConfig& c, const Plan& p, int seq = 16, int steps = 2) {
  RunOptions o;
  o.seq_len = seq;
  o.steps = steps;
  o.check = true;
  const auto data = DataSource::synthetic(c.vocab, 7);
  return run_plan<double>(c, p, data, initial_state<double>(c, 11), o);
}

void expect_equivalent(const RunResult<double>& r) {
  CHECK(r.max_loss_rel_diff < 1e-12);
  CHECK(r.max_grad_rel_diff < 1e-9);
  CHECK(r.max_param_rel_diff < 1e-9);
}

} // namespace

TEST_CASE("executor on one rank equals the reference" * doctest::test_suite("independent")) {
  for (const char* id : {"tiny-dense", "tiny-moe"}) {
    CAPTURE(id);
    const auto c = model(id);
    expect_equivalent(check(c, plan(1, 2, [](Plan&) {})));
  }
}

TEST_CASE("executor data parallel under every ZeRO stage equals the reference" *
          doctest::test_suite("independent")) {
  for (const char* id : {"tiny-dense", "tiny-moe"})
    for (int zero = 0; zero <= 3; ++zero) {
      CAPTURE(id);
      CAPTURE(zero);
      const auto c = model(id);
      expect_equivalent(check(c, plan(2, 4, [&](Plan& p) {
                                for (auto& s : p.state)
                                  s.zero = zero;
                              })));
    }
}

TEST_CASE("executor HSDP equals the reference" * doctest::test_suite("independent")) {
  const auto c = model("tiny-moe");
  expect_equivalent(check(c, plan(4, 4, [&](Plan& p) {
                            for (auto& s : p.state) {
                              s.zero = 3;
                              s.shard_group = 2;
                            }
                          })));
}

TEST_CASE("executor tensor and sequence parallelism equals the reference" *
          doctest::test_suite("independent")) {
  for (const char* id : {"tiny-dense", "tiny-moe"}) {
    CAPTURE(id);
    const auto c = model(id);
    expect_equivalent(check(c, plan(2, 2, [](Plan& p) {
                              p.attention.tp = 2;
                              p.dense.tp = 2;
                              p.embed.tp = 2;
                            })));
  }
}

TEST_CASE("executor ring context parallelism equals the reference" *
          doctest::test_suite("independent")) {
  const auto c = model("tiny-moe");
  expect_equivalent(check(c, plan(2, 2, [](Plan& p) { p.attention.cp = 2; })));
  expect_equivalent(check(c, plan(4, 2, [](Plan& p) { p.attention.cp = 4; })));
}

TEST_CASE("executor Ulysses context parallelism equals the reference" *
          doctest::test_suite("independent")) {
  const auto c = model("tiny-dense");
  expect_equivalent(check(c, plan(2, 2, [](Plan& p) {
                            p.attention.cp = 2;
                            p.attention.cp_kind = strategy::CpKind::ulysses;
                          })));
}

TEST_CASE("executor expert parallelism equals the reference" * doctest::test_suite("independent")) {
  const auto c = model("tiny-moe");
  expect_equivalent(check(c, plan(2, 2, [](Plan& p) { p.moe.ep = 2; })));
  expect_equivalent(check(c, plan(4, 4, [](Plan& p) { p.moe.ep = 4; })));
  expect_equivalent(check(c, plan(4, 4, [](Plan& p) {
                            p.moe.ep = 2;
                            p.moe.etp = 2;
                          })));
}

TEST_CASE("executor pipeline schedules equal the reference" * doctest::test_suite("independent")) {
  using strategy::PipelineSchedule;
  const auto c = model("tiny-moe", 4);
  for (auto s :
       {PipelineSchedule::gpipe, PipelineSchedule::one_f_one_b, PipelineSchedule::zero_bubble}) {
    CAPTURE(static_cast<int>(s));
    expect_equivalent(check(c, plan(2, 4, [&](Plan& p) {
                              p.pp = 2;
                              p.schedule = s;
                            })));
  }
  expect_equivalent(check(c, plan(2, 4, [&](Plan& p) {
                            p.pp = 2;
                            p.vp = 2;
                            p.schedule = PipelineSchedule::interleaved_1f1b;
                          })));
}

TEST_CASE("executor recompute and activation offload equal the reference" *
          doctest::test_suite("independent")) {
  using strategy::LayerKind;
  using strategy::Recompute;
  const auto c = model("tiny-moe");
  for (auto rc : {Recompute::selective, Recompute::full}) {
    CAPTURE(static_cast<int>(rc));
    expect_equivalent(check(c, plan(2, 4, [&](Plan& p) {
                              p.attention.tp = 2;
                              p.dense.tp = 2;
                              for (auto& r : p.recompute)
                                r = rc;
                            })));
  }
  expect_equivalent(check(c, plan(2, 4, [](Plan& p) {
                            p.moe.ep = 2;
                            p.activation_offload = 0.5;
                            p.recompute[static_cast<int>(LayerKind::attention)] = Recompute::full;
                          })));
}

TEST_CASE("executor host optimizer under every overlap mode equals the reference" *
          doctest::test_suite("independent")) {
  using strategy::OptimizerOverlap;
  const auto c = model("tiny-moe");
  for (auto mode : {OptimizerOverlap::after_backward, OptimizerOverlap::stream_backward,
                    OptimizerOverlap::stream_forward}) {
    CAPTURE(static_cast<int>(mode));
    // Three steps: under stream-forward the step of one iteration runs inside the next.
    expect_equivalent(check(c,
                            plan(2, 4,
                                 [&](Plan& p) {
                                   p.optimizer_on_host = true;
                                   p.optimizer = strategy::Placement::host;
                                   p.overlap = mode;
                                   for (auto& s : p.state)
                                     s.zero = 2;
                                 }),
                            16, 3));
  }
}

TEST_CASE("executor gradient accumulation equals one large batch" *
          doctest::test_suite("independent")) {
  // Eight micro-batches of one sequence on each of two replicas: the reference sees the sixteen
  // sequences at once.
  const auto c = model("tiny-dense");
  const auto r = check(c, plan(2, 16, [](Plan& p) { p.micro_batch = 1; }));
  expect_equivalent(r);
}

TEST_CASE("executor tied embeddings across pipeline stages equal the reference" *
          doctest::test_suite("independent")) {
  // tiny-dense ties the LM head to the embedding: stage 0 and the last stage hold copies whose
  // gradients are summed (Megatron's embedding group).
  const auto c = model("tiny-dense", 4);
  CHECK(c.tied_embeddings);
  expect_equivalent(check(c, plan(4, 4, [](Plan& p) {
                            p.pp = 2;
                            p.embed.tp = 2;
                            for (auto& s : p.state)
                              s.zero = 3;
                          })));
}

TEST_CASE("executor mixture of parallelisms equals the reference" *
          doctest::test_suite("independent")) {
  // The docs/example-plan.json kind of plan on 8 ranks: two pipeline stages, attention TP2 x
  // ring CP2, experts EP4, a different ZeRO stage per kind, recompute, offload, host optimizer
  // streamed into the forward.
  const auto c = model("tiny-moe", 4);
  expect_equivalent(check(c,
                          plan(8, 4,
                               [](Plan& p) {
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
                                   r = strategy::Recompute::full;
                                 p.activation_offload = 0.5;
                                 p.optimizer_on_host = true;
                                 p.optimizer = strategy::Placement::host;
                                 p.overlap = strategy::OptimizerOverlap::stream_forward;
                               }),
                          32, 2));
}

TEST_CASE("executor in float agrees with the float64 reference" *
          doctest::test_suite("independent")) {
  // float rounding (2^-24 ~ 6e-8 per operation) accumulated over a few hundred operations per
  // value bounds the loss at 1e-6 and the gradients at 1e-4 of their largest element.
  const auto c = model("tiny-moe");
  const auto p = plan(4, 4, [](Plan& q) {
    q.attention.tp = 2;
    q.dense.tp = 2;
    q.moe.ep = 2;
  });
  RunOptions o;
  o.seq_len = 32;
  o.steps = 1;
  o.check = true;
  const auto r =
      run_plan<float>(c, p, DataSource::synthetic(c.vocab, 3), initial_state<float>(c, 5), o);
  CHECK(r.max_loss_rel_diff < 1e-6);
  CHECK(r.max_grad_rel_diff < 1e-4);
}

TEST_CASE("executor expert parallelism with skewed routing equals the reference" *
          doctest::test_suite("independent")) {
  // A router that scores only expert 0 (all other logits exactly 0, ties going to the lower
  // index) sends every token to experts {0, 1} or {1, 2}: with EP 4 the first expert rank gets
  // almost every row, the second a few and the last two none, so the all-to-all-v counts are as
  // uneven as they get, zeros included.
  const auto c = model("tiny-moe");
  auto start = initial_state<double>(c, 11);
  const auto layout = param_layout(c);
  const int router = find_param(layout, ParamRole::router, 1);
  REQUIRE(router >= 0);
  auto& w = start.params[static_cast<std::size_t>(router)];
  for (std::size_t i = 0; i < w.size(); ++i)
    w[i] = i % static_cast<std::size_t>(c.experts) == 0 ? 0.5 : 0.0;
  RunOptions o;
  o.seq_len = 16;
  o.steps = 2;
  o.check = true;
  const auto data = DataSource::synthetic(c.vocab, 7);
  for (int etp : {1, 2}) {
    CAPTURE(etp);
    const auto p = plan(4, 4, [&](Plan& q) {
      q.moe.ep = 4 / etp;
      q.moe.etp = etp;
    });
    expect_equivalent(run_plan<double>(c, p, data, start, o));
  }
}

TEST_CASE("executor training lowers the loss" * doctest::test_suite("independent")) {
  // The synthetic stream is next = (5·prev + 7) mod 256 with 10% uniform noise: its entropy is
  // 0.9·0 + 0.1·ln 256 + H(0.1) ≈ 0.88 nats, against ln 256 ≈ 5.55 for a uniform guess. Thirty
  // steps must cover well over half of that gap.
  const auto c = model("tiny-moe");
  const auto p = plan(2, 8, [](Plan& q) { q.moe.ep = 2; });
  RunOptions o;
  o.seq_len = 32;
  o.steps = 30;
  o.adam.lr = 3e-3;
  const auto r =
      run_plan<float>(c, p, DataSource::synthetic(c.vocab, 1), initial_state<float>(c, 1), o);
  CHECK(r.losses.front() == mop::test::rel(std::log(256.0), 0.01));
  CHECK(r.losses.back() < 0.5 * (std::log(256.0) + 0.88));
}

TEST_CASE("executor checkpoint and resume are bit-identical to an uninterrupted run" *
          doctest::test_suite("plumbing")) {
  const auto c = model("tiny-moe");
  // ZeRO-3 shards and a host optimizer streamed into the next forward: the resumed run must
  // rebuild the shards and the held-back step exactly.
  const auto p = plan(4, 4, [](Plan& q) {
    q.moe.ep = 2;
    for (auto& s : q.state)
      s.zero = 3;
    q.optimizer_on_host = true;
    q.optimizer = strategy::Placement::host;
    q.overlap = strategy::OptimizerOverlap::stream_forward;
  });
  RunOptions o;
  o.seq_len = 16;
  const auto data = DataSource::synthetic(c.vocab, 2);
  o.steps = 4;
  const auto whole = run_plan<float>(c, p, data, initial_state<float>(c, 3), o);
  o.steps = 2;
  const auto first = run_plan<float>(c, p, data, initial_state<float>(c, 3), o);
  const std::string path = "executor_test.ckpt";
  const CheckpointIdentity id =
      checkpoint_identity(c, PlanIdentity{strategy::summary(p), strategy::to_json(p).dump()}, data);
  save_checkpoint(path, id, c, first.state);
  const auto loaded = load_checkpoint(path, c, id).state;
  std::remove(path.c_str());
  CHECK(loaded.step == 2);
  CHECK(loaded.params == first.state.params);
  const auto second = run_plan<float>(c, p, data, loaded, o);
  CHECK(second.state.step == 4);
  CHECK(second.losses[0] == whole.losses[2]);
  CHECK(second.losses[1] == whole.losses[3]);
  CHECK(second.state.params == whole.state.params);
  CHECK(second.state.adam_m == whole.state.adam_m);
  CHECK(second.state.adam_v == whole.state.adam_v);
}

TEST_CASE("executor resumes a state under another plan (resharding) as the same training" *
          doctest::test_suite("independent")) {
  // The state is unsharded, so a run under any plan can continue it: two steps on 4 ranks
  // (EP 2, ZeRO-3, the optimizer streamed into the next forward), two more on 2 ranks under
  // TP+SP, equal four steps on the first plan up to the order of sums (double precision, the
  // equivalence matrix's bounds).
  const auto c = model("tiny-moe");
  const auto zero3 = plan(4, 4, [](Plan& q) {
    q.moe.ep = 2;
    for (auto& s : q.state)
      s.zero = 3;
    q.optimizer_on_host = true;
    q.optimizer = strategy::Placement::host;
    q.overlap = strategy::OptimizerOverlap::stream_forward;
  });
  const auto tp = plan(2, 4, [](Plan& q) {
    q.attention.tp = 2;
    q.dense.tp = 2;
    q.embed.tp = 2;
  });
  RunOptions o;
  o.seq_len = 16;
  const auto data = DataSource::synthetic(c.vocab, 2);
  o.steps = 4;
  const auto whole = run_plan<double>(c, zero3, data, initial_state<double>(c, 3), o);
  o.steps = 2;
  const auto first = run_plan<double>(c, zero3, data, initial_state<double>(c, 3), o);
  const auto second = run_plan<double>(c, tp, data, first.state, o);
  CHECK(second.state.step == 4);
  CHECK(second.losses[1] == mop::test::rel(whole.losses[3], 1e-12));
  for (std::size_t i = 0; i < whole.state.params.size(); ++i) {
    double scale = 0, diff = 0;
    for (std::size_t k = 0; k < whole.state.params[i].size(); ++k) {
      scale = std::max(scale, std::abs(whole.state.params[i][k]));
      diff = std::max(diff, std::abs(second.state.params[i][k] - whole.state.params[i][k]));
    }
    CHECK(diff <= 1e-9 * scale);
  }
}

TEST_CASE("executor refuses what it cannot run with one sentence" *
          doctest::test_suite("plumbing")) {
  const auto c = model("tiny-moe");
  RunOptions o;
  const auto data = DataSource::synthetic(c.vocab, 1);
  auto run = [&](const Plan& p, int seq) {
    o.seq_len = seq;
    return run_plan<float>(c, p, data, initial_state<float>(c, 1), o);
  };
  // tp 4 exceeds the 2 key/value heads
  CHECK_THROWS_AS(run(plan(4, 4, [](Plan& p) { p.attention.tp = 4; }), 16), InputError);
  // ring CP 2 needs the sequence in 4 chunks
  CHECK_THROWS_AS(run(plan(2, 2, [](Plan& p) { p.attention.cp = 2; }), 6), InputError);
  CHECK_THROWS_AS(run(plan(2, 2,
                           [](Plan& p) {
                             p.attention.cp = 2;
                             p.attention.cp_kind = strategy::CpKind::hybrid;
                           }),
                      16),
                  InputError);
}
