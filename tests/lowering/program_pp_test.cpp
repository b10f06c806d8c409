// Pipeline parallelism in the program lowering: what it emits per stage (sends sized by the
// residual stream, recvs paired with them, the tied embeddings' group, zero-bubble's held-back
// weight gradients) and that the simulator plays the stages with the bubble a pipeline has.
#include "lowering/program.hpp"

#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "sim/engine.hpp"
#include "strategies/plan.hpp"
#include "tests/support/approx.hpp"
#include "tests/support/errors.hpp"
#include "workload/catalog.hpp"

#include <algorithm>
#include <doctest/doctest.h>
#include <functional>
#include <string>

namespace lowering_program_pp_test {

using namespace mop;
using strategy::PipelineSchedule;
using strategy::Plan;

namespace {

workload::ModelSpec deeper(const std::string& id, int layers) {
  workload::ModelSpec m = workload::load_model(id);
  while (layers > m.num_layers())
    m.layers.push_back(m.layers[m.layers.size() % 2]);
  m.layers.resize(static_cast<std::size_t>(layers));
  return m;
}

Plan plan(int world, int global_batch, const std::function<void(Plan&)>& edit) {
  Plan p;
  p.world = world;
  p.global_batch = global_batch;
  p.micro_batch = 1;
  edit(p);
  strategy::complete_plan(p);
  return p;
}

int index_of(const sim::RankClass& rc, const std::string& name) {
  for (std::size_t i = 0; i < rc.ops.size(); ++i)
    if (rc.ops[i].name == name)
      return static_cast<int>(i);
  FAIL("no op " << name << " in " << rc.name);
  return -1;
}

} // namespace

TEST_CASE("program lowering: pipeline sends carry the residual stream to their recvs" *
          doctest::test_suite("independent")) {
  // tiny-dense (hidden 64), two stages of TP 2 with SP, 4 micro-batches of 2 sequences of 64
  // tokens: a rank holds 2·64 / 2 = 64 rows of the residual stream, 64 x 64 BF16 = 8192 bytes.
  const workload::ModelSpec m = deeper("tiny-dense", 4);
  const sim::Schedule s = lowering::lower_program(plan(4, 8,
                                                       [](Plan& p) {
                                                         p.pp = 2;
                                                         p.micro_batch = 2;
                                                         p.attention.tp = 2;
                                                         p.dense.tp = 2;
                                                         p.embed.tp = 2;
                                                       }),
                                                  {&m, 64, 8});
  sim::check_schedule(s);
  REQUIRE(s.classes.size() == 2);
  for (std::size_t c = 0; c < 2; ++c) {
    const sim::RankClass& rc = s.classes[c];
    CHECK(rc.stage == static_cast<int>(c));
    CHECK(rc.multiplicity == 2);
    int sends = 0, recvs = 0;
    for (const sim::Op& op : rc.ops) {
      if (op.kind == sim::OpKind::send) {
        ++sends;
        CHECK(op.bytes == 2.0 * 64 * 64);
        CHECK(op.peer_class == 1 - static_cast<int>(c));
      } else if (op.kind == sim::OpKind::recv) {
        ++recvs;
        CHECK(op.bytes == 0); // a recv takes no time of its own
        REQUIRE(op.remote_deps.size() == 1);
        const sim::Op& send = s.classes[static_cast<std::size_t>(op.peer_class)]
                                  .ops[static_cast<std::size_t>(op.remote_deps[0].op)];
        CHECK(send.kind == sim::OpKind::send);
        CHECK(send.micro_batch == op.micro_batch);
      }
    }
    // Stage 0 sends 4 activations and receives 4 gradients; stage 1 the reverse.
    CHECK(sends == 4);
    CHECK(recvs == 4);
  }
}

TEST_CASE("program lowering: interleaved stages hop 2·(pp·vp - 1) times per micro-batch" *
          doctest::test_suite("independent")) {
  // 2 stages x 2 chunks = 4 virtual stages: 3 hops forward and 3 back per micro-batch, 4
  // micro-batches: 24 sends over both stages, each with its recv.
  const workload::ModelSpec m = deeper("tiny-dense", 4);
  const sim::Schedule s = lowering::lower_program(plan(2, 4,
                                                       [](Plan& p) {
                                                         p.pp = 2;
                                                         p.vp = 2;
                                                         p.schedule =
                                                             PipelineSchedule::interleaved_1f1b;
                                                       }),
                                                  {&m, 16, 8});
  sim::check_schedule(s);
  int sends = 0, recvs = 0;
  for (const sim::RankClass& rc : s.classes)
    for (const sim::Op& op : rc.ops) {
      sends += op.kind == sim::OpKind::send ? 1 : 0;
      recvs += op.kind == sim::OpKind::recv ? 1 : 0;
    }
  CHECK(sends == 24);
  CHECK(recvs == 24);
  // Stage 0 holds layers 0 and 2, stage 1 layers 1 and 3 (one layer per virtual stage).
  CHECK(index_of(s.classes[0], "L2.qkv_proj.mb0") > index_of(s.classes[0], "L0.qkv_proj.mb0"));
  CHECK(index_of(s.classes[1], "L3.qkv_proj.mb0") > index_of(s.classes[1], "L1.qkv_proj.mb0"));
}

TEST_CASE("program lowering: tied embeddings sum their gradients over the first and last stage" *
          doctest::test_suite("independent")) {
  // Four stages of one rank: the tied group holds ranks 0 and 3 only; the all-reduce sums the
  // table's FP32 gradient, 256 x 64 x 4 bytes, on those two stages.
  const workload::ModelSpec m = deeper("tiny-dense", 4);
  REQUIRE(m.tied_embeddings);
  const sim::Schedule s =
      lowering::lower_program(plan(4, 4, [](Plan& p) { p.pp = 4; }), {&m, 16, 8});
  sim::check_schedule(s);
  int tied = -1;
  for (std::size_t g = 0; g < s.groups.size(); ++g)
    if (s.groups[g].spec.ends_only)
      tied = static_cast<int>(g);
  REQUIRE(tied >= 0);
  CHECK(s.groups[static_cast<std::size_t>(tied)].ranks == 2);
  const sim::MeshView& v = s.mesh.view("embed");
  CHECK(v.members(0, s.groups[static_cast<std::size_t>(tied)].spec) == std::vector<int>{0, 3});
  for (std::size_t c = 0; c < 4; ++c) {
    int count = 0;
    for (const sim::Op& op : s.classes[c].ops)
      if (op.group == tied) {
        ++count;
        CHECK(op.kind == sim::OpKind::all_reduce);
        CHECK(op.bytes == 256.0 * 64 * 4);
      }
    CHECK(count == (c == 0 || c == 3 ? 1 : 0));
  }
}

TEST_CASE("program lowering: zero-bubble holds weight gradients back to the next flush" *
          doctest::test_suite("independent")) {
  // ZB-H1 on stage 0 of 2 with 4 micro-batches: F0, F1, B0, F2, B1, F3, B2, B3, the held-back
  // weight gradients flushed before every step after the warm-up. B0's weight gradients
  // therefore run after B0's last op (the embedding's backward) and before F2 starts (its
  // tokens); under 1F1B they run inside B0, before the embedding's backward.
  const workload::ModelSpec m = deeper("tiny-dense", 4);
  for (auto sched : {PipelineSchedule::zero_bubble, PipelineSchedule::one_f_one_b}) {
    CAPTURE(static_cast<int>(sched));
    const sim::Schedule s = lowering::lower_program(plan(2, 4,
                                                         [&](Plan& p) {
                                                           p.pp = 2;
                                                           p.schedule = sched;
                                                         }),
                                                    {&m, 16, 8});
    sim::check_schedule(s);
    const sim::RankClass& rc = s.classes[0];
    const int w = index_of(rc, "L0.qkv_proj.wgrad.mb0.bwd");
    const int embed_bwd = index_of(rc, "embedding.mb0.bwd");
    if (sched == PipelineSchedule::zero_bubble) {
      CHECK(w > embed_bwd);
      CHECK(w < index_of(rc, "tokens.mb2"));
    } else {
      CHECK(w < embed_bwd);
    }
  }
}

TEST_CASE("program lowering: the simulator plays a GPipe program with its bubble" *
          doctest::test_suite("independent")) {
  // Hand argument (GPipe, Huang et al. 2019): with m micro-batches on p balanced stages, a
  // stage's work for one micro-batch takes one slot each way and the step lasts m + p - 1 slots
  // each way, (m + p - 1) / m times the compute per stage without a pipeline. tiny-dense with 8
  // layers, seq 256, m = 4 micro-batches of one sequence, p = 2: 5/4.
  const workload::ModelSpec m = deeper("tiny-dense", 8);
  const hw::ClusterSpec cluster = hw::load_cluster("h100");
  const int micro = 4, stages = 2;
  auto lower = [&](int pp) {
    return lowering::lower_program(plan(pp, micro,
                                        [&](Plan& p) {
                                          p.pp = pp;
                                          p.schedule = PipelineSchedule::gpipe;
                                        }),
                                   {&m, 256, 8});
  };
  const sim::Schedule one = lower(1), two = lower(stages);
  sim::check_schedule(two);
  const sim::SimResult r1 = sim::simulate(one, cluster, hw::Calibration{});
  const sim::SimResult r2 = sim::simulate(two, cluster, hw::Calibration{});
  // Each stage's compute for micro-batch 0 forward and backward, and its optimizer step, from
  // the ops' standalone durations.
  auto per_stage = [&](const sim::Schedule& s, std::size_t c, sim::Category cat) {
    double t = 0;
    for (const sim::Op& op : s.classes[c].ops)
      if (op.category == cat && (cat == sim::Category::optimizer || op.micro_batch == 0))
        t += sim::op_duration_s(op, s, cluster, hw::Calibration{});
    return t;
  };
  const double opt1 = per_stage(one, 0, sim::Category::optimizer);
  const double no_pipeline_per_stage = (r1.step_time_s - opt1) / stages;
  const double opt2 = per_stage(two, 0, sim::Category::optimizer); // stage 0 ends the step
  // The bubble: within 5% of (m + p - 1) / m, the allowance covering the last stage's extra
  // head work (about 4% of a stage here) and the sends' latency between the stages.
  CHECK((r2.step_time_s - opt2) / no_pipeline_per_stage ==
        test::rel(static_cast<double>(micro + stages - 1) / micro, 0.05));
  CHECK(r2.breakdown.bubble > 0);
  // Unequal stages: the forwards take Σ_s f_s + (m - 1)·max_s f_s, the backwards likewise; 3%
  // allowance for the sends' latency and compute slowed beside them.
  double sum_f = 0, max_f = 0, sum_b = 0, max_b = 0;
  for (std::size_t c = 0; c < 2; ++c) {
    const double f = per_stage(two, c, sim::Category::forward);
    const double b = per_stage(two, c, sim::Category::backward);
    sum_f += f;
    sum_b += b;
    max_f = std::max(max_f, f);
    max_b = std::max(max_b, b);
  }
  CHECK(r2.step_time_s ==
        test::rel(sum_f + (micro - 1) * max_f + sum_b + (micro - 1) * max_b + opt2, 0.03));
}

TEST_CASE("program lowering: a virtual stage without a layer relays the activations" *
          doctest::test_suite("plumbing")) {
  // Two layers over 2 stages x 2 chunks: virtual stages 2 and 3 hold none (Megatron's uneven
  // split of, say, 94 layers over 96 virtual stages). Stage 0's second chunk receives each
  // micro-batch's activations and sends them on, its gradients likewise.
  const workload::ModelSpec m = workload::load_model("tiny-dense"); // 2 layers
  const Plan p = plan(2, 4, [](Plan& q) {
    q.pp = 2;
    q.vp = 2;
    q.schedule = PipelineSchedule::interleaved_1f1b;
  });
  const sim::Schedule s = lowering::lower_program(p, {&m, 16, 8});
  sim::check_schedule(s);
  int relays = 0;
  for (const sim::Op& op : s.classes[0].ops)
    relays += op.name.rfind("pp.send_act.chunk1.", 0) == 0 ? 1 : 0;
  CHECK(relays == p.micro_batches());
  const sim::SimResult r = sim::simulate(s, hw::load_cluster("h100"), hw::Calibration{});
  CHECK(r.step_time_s > 0);
}

} // namespace lowering_program_pp_test
