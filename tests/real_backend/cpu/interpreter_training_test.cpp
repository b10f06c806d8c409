// Training through the program interpreter: precision, learning, checkpoints and resharding,
// end to end (the equivalence matrix's cases that are not about one feature).
#include "real_backend/cpu/checkpoint.hpp"
#include "tests/support/program_case.hpp"

#include <cmath>
#include <cstdio>
#include <doctest/doctest.h>
#include <string>

namespace real_backend_cpu_interpreter_training_test {

using namespace mop;
using mop::strategy::Plan;
using mop::test::expect_held_together;
using mop::test::make_case;

namespace {

template <class T>
real::RunResult<T> train(const test::Case& k, const real::TrainState<T>& start, int steps,
                         std::uint64_t data_seed, double lr = 1e-3, bool check = false) {
  real::RunOptions o;
  o.steps = steps;
  o.check = check;
  o.adam.lr = lr;
  return real::interpret<T>(k.schedule, k.config,
                            real::DataSource::synthetic(k.config.vocab, data_seed), start, o);
}

void zero3_host_streamed(Plan& q) {
  for (auto& s : q.state)
    s.zero = 3;
  q.optimizer_on_host = true;
  q.optimizer = strategy::Placement::host;
  q.overlap = strategy::OptimizerOverlap::stream_forward;
}

} // namespace

TEST_CASE("interpreter: gradient accumulation equals one large batch" *
          doctest::test_suite("independent")) {
  // Eight micro-batches of one sequence on each of two replicas: the reference sees the sixteen
  // sequences at once.
  expect_held_together(make_case("tiny-dense", 2, 16, 16, [](Plan& p) { p.micro_batch = 1; }));
}

TEST_CASE("interpreter in float agrees with the float64 reference" *
          doctest::test_suite("independent")) {
  // float rounding (2^-24 ~ 6e-8 per operation) accumulated over a few hundred operations per
  // value bounds the loss at 1e-6 and the gradients at 1e-4 of their largest element.
  for (const char* id : {"tiny-dense", "tiny-moe"}) {
    CAPTURE(id);
    const auto k = make_case(id, 4, 4, 32, [&](Plan& q) {
      q.attention.tp = 2;
      q.dense.tp = 2;
      if (std::string(id) == "tiny-moe")
        q.moe.ep = 2;
    });
    const auto r = train<float>(k, real::initial_state<float>(k.config, 5), 1, 3, 1e-3, true);
    CHECK(r.max_loss_rel_diff < 1e-6);
    CHECK(r.max_grad_rel_diff < 1e-4);
  }
}

TEST_CASE("interpreter training lowers the loss" * doctest::test_suite("independent")) {
  // The synthetic stream is next = (5·prev + 7) mod 256 with 10% uniform noise: its entropy is
  // 0.9·0 + 0.1·ln 256 + H(0.1) ≈ 0.88 nats, against ln 256 ≈ 5.55 for a uniform guess. Thirty
  // steps must cover well over half of that gap.
  const auto k = make_case("tiny-dense", 2, 8, 32, [](Plan&) {});
  const auto r = train<float>(k, real::initial_state<float>(k.config, 1), 30, 1, 3e-3);
  CHECK(r.losses.front() == test::rel(std::log(256.0), 0.01));
  CHECK(r.losses.back() < 0.5 * (std::log(256.0) + 0.88));
}

TEST_CASE("interpreter checkpoint and resume are bit-identical to an uninterrupted run" *
          doctest::test_suite("plumbing")) {
  // ZeRO-3 shards and a host optimizer streamed into the next forward: the resumed run must
  // rebuild the shards, and the update the first run applied when it ended must not run twice.
  const auto k = make_case("tiny-dense", 4, 4, 16, zero3_host_streamed);
  const auto start = real::initial_state<float>(k.config, 3);
  const auto whole = train<float>(k, start, 4, 2);
  const auto first = train<float>(k, start, 2, 2);
  const std::string path = "interpreter_test.ckpt";
  const auto data = real::DataSource::synthetic(k.config.vocab, 2);
  const real::CheckpointIdentity id = real::checkpoint_identity(
      k.config, real::PlanIdentity{strategy::summary(k.plan), strategy::to_json(k.plan).dump()},
      data);
  real::save_checkpoint(path, id, k.config, first.state);
  const auto loaded = real::load_checkpoint(path, k.config, id).state;
  std::remove(path.c_str());
  CHECK(loaded.step == 2);
  CHECK(loaded.params == first.state.params);
  const auto second = train<float>(k, loaded, 2, 2);
  CHECK(second.state.step == 4);
  CHECK(second.losses[0] == whole.losses[2]);
  CHECK(second.losses[1] == whole.losses[3]);
  CHECK(second.state.params == whole.state.params);
  CHECK(second.state.adam_m == whole.state.adam_m);
  CHECK(second.state.adam_v == whole.state.adam_v);
}

TEST_CASE("interpreter resumes a state under another plan (resharding) as the same training" *
          doctest::test_suite("independent")) {
  // The state is unsharded, so a program of any plan can continue it: two steps on 4 ranks
  // (ZeRO-3, the optimizer streamed into the next forward), two more on 2 ranks under TP+SP,
  // equal four steps on the first plan up to the order of sums (double precision).
  const auto zero3 = make_case("tiny-dense", 4, 4, 16, zero3_host_streamed);
  const auto tp = make_case("tiny-dense", 2, 4, 16, [](Plan& q) {
    q.attention.tp = 2;
    q.dense.tp = 2;
    q.embed.tp = 2;
  });
  const auto start = real::initial_state<double>(zero3.config, 3);
  const auto whole = train<double>(zero3, start, 4, 2);
  const auto first = train<double>(zero3, start, 2, 2);
  const auto second = train<double>(tp, first.state, 2, 2);
  CHECK(second.state.step == 4);
  CHECK(second.losses[1] == test::rel(whole.losses[3], 1e-12));
  for (std::size_t i = 0; i < whole.state.params.size(); ++i) {
    double scale = 0, diff = 0;
    for (std::size_t e = 0; e < whole.state.params[i].size(); ++e) {
      scale = std::max(scale, std::abs(whole.state.params[i][e]));
      diff = std::max(diff, std::abs(second.state.params[i][e] - whole.state.params[i][e]));
    }
    CHECK(diff <= 1e-9 * scale);
  }
}

} // namespace real_backend_cpu_interpreter_training_test
