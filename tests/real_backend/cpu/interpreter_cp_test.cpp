// Context parallelism in the program IR, held together (tests/support/program_case.hpp): ring
// CP (K/V blocks and their gradients travel the cp.ring group with send_recv), Ulysses CP
// (all-to-alls over cp.ulysses between transposes) and both at once (hybrid), alone and with
// TP/SP, DP and ZeRO-3, gradient accumulation and sliding windows. Each case: the loss,
// gradients and parameters equal the single-rank float64 reference, every rank runs exactly its
// class's ops, and its peak live bytes equal the memory tracker's.
#include "tests/support/program_case.hpp"

#include <doctest/doctest.h>
#include <functional>
#include <string>

namespace real_backend_cpu_interpreter_cp_test {

using mop::strategy::CpKind;
using mop::strategy::Plan;
using mop::test::expect_held_together;
using mop::test::make_case;

namespace {

// A case whose model gets sliding windows (tiny-dense has none): layer 0 attends to the last
// `window` tokens, layer 1 keeps full causal attention. gpus_per_node decides how hybrid CP
// splits (Ulysses over the CP ranks of one node).
mop::test::Case windowed_case(int world, int global_batch, int seq, std::int64_t window,
                              int gpus_per_node, const std::function<void(Plan&)>& edit) {
  mop::test::Case k;
  k.spec = mop::workload::load_model("tiny-dense");
  k.spec.layers[0].window = window;
  k.config = mop::real::tiny_config(k.spec);
  k.plan.world = world;
  k.plan.global_batch = global_batch;
  edit(k.plan);
  mop::strategy::complete_plan(k.plan);
  k.schedule = mop::lowering::lower_program(k.plan, {&k.spec, seq, gpus_per_node});
  mop::sim::check_schedule(k.schedule);
  return k;
}

// Collectives of one kind over one group in rank class 0, per step.
int count(const mop::sim::Schedule& s, mop::sim::OpKind kind, const std::string& group) {
  int n = 0;
  for (const mop::sim::Op& op : s.classes[0].ops)
    if (op.kind == kind && op.group >= 0 &&
        s.groups[static_cast<std::size_t>(op.group)].name == group)
      ++n;
  return n;
}

} // namespace

TEST_CASE("interpreter: ring context parallelism over 2 and 4 ranks" *
          doctest::test_suite("independent")) {
  for (int cp : {2, 4}) {
    CAPTURE(cp);
    const auto k = make_case("tiny-dense", cp, 2, 16, [&](Plan& p) { p.attention.cp = cp; });
    // Per layer and micro-batch: cp - 1 K/V hops forward; backward cp - 1 K/V hops and cp
    // dK/dV hops.
    const int per = static_cast<int>(k.spec.num_layers()) * k.plan.micro_batches();
    CHECK(count(k.schedule, mop::sim::OpKind::send_recv, "attention.cp.ring") ==
          per * ((cp - 1) + (cp - 1) + cp));
    expect_held_together(k);
  }
}

TEST_CASE("interpreter: Ulysses context parallelism" * doctest::test_suite("independent")) {
  // One and two sequences per micro-batch (two: the received chunks are regrouped by sequence).
  for (int mb : {1, 2}) {
    CAPTURE(mb);
    const auto k = make_case("tiny-dense", 2, 2, 16, [&](Plan& p) {
      p.attention.cp = 2;
      p.attention.cp_kind = CpKind::ulysses;
      p.micro_batch = mb;
    });
    // By hand: q, k, v and o forward, dO, dq, dk, dv backward, per layer and micro-batch (no
    // all-to-all of the log-sum-exp).
    const int per = static_cast<int>(k.spec.num_layers()) * k.plan.micro_batches();
    CHECK(count(k.schedule, mop::sim::OpKind::all_to_all, "attention.cp.ulysses") == per * 8);
    expect_held_together(k);
  }
}

TEST_CASE("interpreter: ring CP with tensor and sequence parallelism" *
          doctest::test_suite("independent")) {
  expect_held_together(make_case("tiny-dense", 4, 2, 16, [](Plan& p) {
    p.attention.tp = 2;
    p.dense.tp = 2;
    p.embed.tp = 2;
    p.attention.cp = 2;
  }));
}

TEST_CASE("interpreter: context parallelism with data parallelism and ZeRO-3" *
          doctest::test_suite("independent")) {
  expect_held_together(make_case("tiny-dense", 4, 8, 16, [](Plan& p) {
    p.attention.cp = 2;
    p.micro_batch = 1;
    for (auto& s : p.state)
      s.zero = 3;
  }));
  expect_held_together(make_case("tiny-dense", 4, 4, 16, [](Plan& p) {
    p.attention.cp = 2;
    p.attention.cp_kind = CpKind::ulysses;
    p.micro_batch = 2;
    for (auto& s : p.state)
      s.zero = 3;
  }));
}

TEST_CASE("interpreter: hybrid CP runs Ulysses inside a ring" *
          doctest::test_suite("independent")) {
  // Two GPUs per node: CP 4 splits into Ulysses 2 (a node) x ring 2.
  for (int mb : {1, 2}) {
    CAPTURE(mb);
    const auto k = windowed_case(4, 2, 16, 0, 2, [&](Plan& p) {
      p.attention.cp = 4;
      p.attention.cp_kind = CpKind::hybrid;
      p.micro_batch = mb;
    });
    REQUIRE(k.schedule.mesh.view("attention").extent("cp.ulysses") == 2);
    REQUIRE(k.schedule.mesh.view("attention").extent("cp.ring") == 2);
    const int per = static_cast<int>(k.spec.num_layers()) * k.plan.micro_batches();
    CHECK(count(k.schedule, mop::sim::OpKind::all_to_all, "attention.cp.ulysses") == per * 8);
    CHECK(count(k.schedule, mop::sim::OpKind::send_recv, "attention.cp.ring") == per * 4);
    expect_held_together(k);
  }
}

TEST_CASE("interpreter: sliding windows stay exact under context parallelism" *
          doctest::test_suite("independent")) {
  // Ring CP 4 cuts 16 tokens into 8 chunks of 2: windows of 3 and 6 reach one and several
  // chunks back, 40 is past the sequence (full causal attention); ring, Ulysses and hybrid.
  for (std::int64_t window : {3, 6, 40}) {
    CAPTURE(window);
    expect_held_together(windowed_case(4, 2, 16, window, 8, [](Plan& p) { p.attention.cp = 4; }));
    expect_held_together(windowed_case(2, 2, 16, window, 8, [](Plan& p) {
      p.attention.cp = 2;
      p.attention.cp_kind = CpKind::ulysses;
    }));
    expect_held_together(windowed_case(4, 2, 16, window, 2, [](Plan& p) {
      p.attention.cp = 4;
      p.attention.cp_kind = CpKind::hybrid;
    }));
  }
}

TEST_CASE("interpreter: the program's CP collectives, counted by hand" *
          doctest::test_suite("independent")) {
  // Per layer and micro-batch, by hand: ring CP r sends the key/value blocks r - 1 hops in the
  // forward, again r - 1 in the backward, and their gradients r hops home (3r - 2 send_recv);
  // Ulysses all-to-alls q, k, v and the output in the forward, dO and dq, dk, dv in the
  // backward (8). Only CP's kinds are counted (the gradient buckets are another feature's).
  struct Run {
    const char* what;
    int world;
    double send_recv, all_to_all; // per layer and micro-batch
    std::function<void(Plan&)> edit;
  };
  const Run runs[] = {{"ring CP 2", 2, 3 * 2 - 2, 0, [](Plan& p) { p.attention.cp = 2; }},
                      {"ring CP 4", 4, 3 * 4 - 2, 0, [](Plan& p) { p.attention.cp = 4; }},
                      {"Ulysses CP 2", 2, 0, 8,
                       [](Plan& p) {
                         p.attention.cp = 2;
                         p.attention.cp_kind = CpKind::ulysses;
                       }},
                      {"ring CP 2 x TP 2", 4, 3 * 2 - 2, 0, [](Plan& p) {
                         p.attention.cp = 2;
                         p.attention.tp = 2;
                         p.dense.tp = 2;
                         p.embed.tp = 2;
                       }}};
  for (const Run& run : runs) {
    CAPTURE(std::string(run.what));
    const auto k = make_case("tiny-dense", run.world, 2, 16, run.edit);
    const double per_rank = static_cast<double>(k.spec.num_layers() * k.plan.micro_batches());
    for (auto kind : {mop::sim::OpKind::all_to_all, mop::sim::OpKind::send_recv}) {
      CAPTURE(std::string(mop::sim::op_kind_name(kind)));
      int scheduled = 0;
      for (const mop::sim::Op& op : k.schedule.classes[0].ops)
        scheduled += op.kernel == mop::sim::Kernel::collective && op.kind == kind ? 1 : 0;
      const double want =
          per_rank * (kind == mop::sim::OpKind::send_recv ? run.send_recv : run.all_to_all);
      CHECK(scheduled == want);
    }
    expect_held_together(k, 1); // and the ranks run exactly these
  }
}

TEST_CASE("interpreter: context parallelism under recompute and activation offload" *
          doctest::test_suite("independent")) {
  using mop::strategy::CpKind;
  using mop::strategy::Recompute;
  for (CpKind kind : {CpKind::ring, CpKind::ulysses})
    for (Recompute r : {Recompute::selective, Recompute::full}) {
      CAPTURE(static_cast<int>(kind));
      CAPTURE(static_cast<int>(r));
      mop::test::expect_held_together(mop::test::make_case("tiny-dense", 2, 2, 16, [&](Plan& p) {
        p.attention.cp = 2;
        p.attention.cp_kind = kind;
        p.activation_offload = 0.5;
        for (auto& k : p.recompute)
          k = r;
      }));
    }
}

} // namespace real_backend_cpu_interpreter_cp_test
