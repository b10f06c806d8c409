// The cost-only lowering prices exactly the collectives the program lowering issues. For every
// case of the interpreter's equivalence matrix (the same tiny models, plans, sequence lengths and
// batches), the Schedule strategy::lower writes and the one lowering::lower_program writes (a
// second method: the CPU interpreter runs it with real arithmetic and holds it to the float64
// reference, tests/real_backend/cpu/interpreter*_test.cpp) must issue the same number of
// collectives of every kind per rank and step, over the same communicators, for the same
// purpose. A collective the cost-only lowering leaves out is time the simulator never charges;
// one the program does not need is one it should not price either.
#include "lowering/program.hpp"
#include "sim/schedule.hpp"
#include "strategies/lower.hpp"
#include "strategies/plan.hpp"
#include "workload/catalog.hpp"

#include <doctest/doctest.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace strategies_lower_parity_test {

using namespace mop;
using strategy::Plan;

namespace {

// The tiny model with at least `layers` layers (deeper copies repeat the dense/MoE pattern, as
// the equivalence matrix builds them for pipelines).
workload::ModelSpec spec(const std::string& id, int layers) {
  workload::ModelSpec m = workload::load_model(id);
  while (layers > m.num_layers())
    m.layers.push_back(m.layers[m.layers.size() % 2]);
  return m;
}

struct Case {
  std::string what;
  std::string model;
  int layers = 0;
  int seq = 16;
  Plan plan;
};

Plan plan(int world, int global_batch, const std::function<void(Plan&)>& edit) {
  Plan p;
  p.world = world;
  p.global_batch = global_batch;
  edit(p);
  strategy::complete_plan(p);
  return p;
}

// The cases of the equivalence matrix.
std::vector<Case> matrix() {
  using strategy::CpKind;
  using strategy::LayerKind;
  using strategy::OptimizerOverlap;
  using strategy::PipelineSchedule;
  using strategy::Placement;
  using strategy::Recompute;
  std::vector<Case> cases;
  for (const char* id : {"tiny-dense", "tiny-moe"}) {
    cases.push_back({fmt::format("{} one rank", id), id, 0, 16, plan(1, 2, [](Plan&) {})});
    for (int zero = 0; zero <= 3; ++zero)
      cases.push_back(
          {fmt::format("{} DP 2 ZeRO-{}", id, zero), id, 0, 16, plan(2, 4, [&](Plan& p) {
             for (auto& s : p.state)
               s.zero = zero;
           })});
    cases.push_back({fmt::format("{} TP 2 with SP", id), id, 0, 16, plan(2, 2, [](Plan& p) {
                       p.attention.tp = 2;
                       p.dense.tp = 2;
                       p.embed.tp = 2;
                     })});
  }
  cases.push_back({"HSDP 2 x 2", "tiny-moe", 0, 16, plan(4, 4, [](Plan& p) {
                     for (auto& s : p.state) {
                       s.zero = 3;
                       s.shard_group = 2;
                     }
                   })});
  cases.push_back(
      {"ring CP 2", "tiny-moe", 0, 16, plan(2, 2, [](Plan& p) { p.attention.cp = 2; })});
  cases.push_back(
      {"ring CP 4", "tiny-moe", 0, 16, plan(4, 2, [](Plan& p) { p.attention.cp = 4; })});
  cases.push_back({"Ulysses CP 2", "tiny-dense", 0, 16, plan(2, 2, [](Plan& p) {
                     p.attention.cp = 2;
                     p.attention.cp_kind = CpKind::ulysses;
                   })});
  cases.push_back({"EP 2", "tiny-moe", 0, 16, plan(2, 2, [](Plan& p) { p.moe.ep = 2; })});
  cases.push_back({"EP 4", "tiny-moe", 0, 16, plan(4, 4, [](Plan& p) { p.moe.ep = 4; })});
  cases.push_back({"EP 2 x ETP 2", "tiny-moe", 0, 16, plan(4, 4, [](Plan& p) {
                     p.moe.ep = 2;
                     p.moe.etp = 2;
                   })});
  for (auto s :
       {PipelineSchedule::gpipe, PipelineSchedule::one_f_one_b, PipelineSchedule::zero_bubble})
    cases.push_back({fmt::format("PP 2 schedule {}", static_cast<int>(s)), "tiny-moe", 4, 16,
                     plan(2, 4, [&](Plan& p) {
                       p.pp = 2;
                       p.schedule = s;
                     })});
  cases.push_back({"PP 2 interleaved vp 2", "tiny-moe", 4, 16, plan(2, 4, [](Plan& p) {
                     p.pp = 2;
                     p.vp = 2;
                     p.schedule = PipelineSchedule::interleaved_1f1b;
                   })});
  for (auto rc : {Recompute::selective, Recompute::full})
    cases.push_back({fmt::format("recompute {} with TP 2", static_cast<int>(rc)), "tiny-moe", 0, 16,
                     plan(2, 4, [&](Plan& p) {
                       p.attention.tp = 2;
                       p.dense.tp = 2;
                       for (auto& r : p.recompute)
                         r = rc;
                     })});
  cases.push_back(
      {"offload with attention recompute and EP 2", "tiny-moe", 0, 16, plan(2, 4, [](Plan& p) {
         p.moe.ep = 2;
         p.activation_offload = 0.5;
         p.recompute[static_cast<int>(LayerKind::attention)] = Recompute::full;
       })});
  for (auto mode : {OptimizerOverlap::after_backward, OptimizerOverlap::stream_backward,
                    OptimizerOverlap::stream_forward})
    cases.push_back({fmt::format("host optimizer overlap {}", static_cast<int>(mode)), "tiny-moe",
                     0, 16, plan(2, 4, [&](Plan& p) {
                       p.optimizer_on_host = true;
                       p.optimizer = Placement::host;
                       p.overlap = mode;
                       for (auto& s : p.state)
                         s.zero = 2;
                     })});
  cases.push_back({"gradient accumulation over 8 micro-batches", "tiny-dense", 0, 16,
                   plan(2, 16, [](Plan& p) { p.micro_batch = 1; })});
  cases.push_back({"tied embeddings across stages", "tiny-dense", 4, 16, plan(4, 4, [](Plan& p) {
                     p.pp = 2;
                     p.embed.tp = 2;
                     for (auto& s : p.state)
                       s.zero = 3;
                   })});
  for (int zero : {1, 3})
    cases.push_back({fmt::format("tied embeddings across stages, ZeRO-{} over DP 2", zero),
                     "tiny-dense", 4, 16, plan(4, 4, [&](Plan& p) {
                       p.pp = 2;
                       for (auto& s : p.state)
                         s.zero = zero;
                     })});
  cases.push_back({"mixture on 8 ranks", "tiny-moe", 4, 32, plan(8, 4, [](Plan& p) {
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
                       r = Recompute::full;
                     p.activation_offload = 0.5;
                     p.optimizer_on_host = true;
                     p.optimizer = Placement::host;
                     p.overlap = OptimizerOverlap::stream_forward;
                   })});
  cases.push_back({"float case: TP 2, EP 2", "tiny-moe", 0, 32, plan(4, 4, [](Plan& q) {
                     q.attention.tp = 2;
                     q.dense.tp = 2;
                     q.moe.ep = 2;
                   })});
  return cases;
}

// A collective's key: its kind, what it is for, and the size of its communicator (ranks, and
// how many share a node). The two lowerings name their communicators apart (the cost-only
// lowering prices the dense MLP's SP collectives over the attention TP group, which the
// matrix's plans make the same ranks).
std::string key(const sim::Schedule& s, const sim::Op& op) {
  std::string group = "no group";
  if (op.group >= 0) {
    const sim::Group& g = s.groups[static_cast<std::size_t>(op.group)];
    group = fmt::format("{} ranks ({} per node)", g.ranks, g.ranks_per_node);
  }
  return fmt::format("{} {} over {}", sim::op_kind_name(op.kind), sim::category_name(op.category),
                     group);
}

struct Count {
  std::map<std::string, double> n;                       // per key, per rank and step
  std::map<std::string, std::vector<std::string>> names; // the ops of each key (stage 0 first)
};

// Collectives per rank per step in a Schedule: every class's ops times its multiplicity, over
// the world.
Count collectives(const sim::Schedule& s, int world) {
  Count c;
  for (const auto& rc : s.classes)
    for (const auto& op : rc.ops)
      if (sim::is_collective(op.kind)) {
        c.n[key(s, op)] += rc.multiplicity;
        c.names[key(s, op)].push_back(op.name);
      }
  for (auto& [kind, v] : c.n)
    v /= world;
  return c;
}

Count priced(const Case& c, const workload::ModelSpec& m) {
  strategy::LoweringContext ctx;
  ctx.model = &m;
  ctx.seq = c.seq;
  ctx.gpus_per_node = 8;
  return collectives(strategy::lower(c.plan, ctx), c.plan.world);
}

Count programmed(const Case& c, const workload::ModelSpec& m) {
  return collectives(lowering::lower_program(c.plan, {&m, c.seq, 8}), c.plan.world);
}

// Where the program follows the frameworks and the cost-only lowering does not (both go when
// the cost-only lowering does): under a pipeline, FSDP2 parameters stay gathered from the first
// forward to the last backward (torchtitan turns reshard_after_forward off with pp > 1, and the
// pipeline stage reshards only after the last backward), so the program gathers a ZeRO-3 bucket
// once per step where the cost-only lowering gathers it per micro-batch and pass; under
// selective recompute the program re-gathers each block's sequence-parallel norm output before
// the backward instead of keeping it (Megatron-LM keeps the local shard and gathers it again).
bool known_difference(const Case& c, const std::string& k) {
  bool zero3 = false;
  for (const strategy::StatePolicy& st : c.plan.state)
    zero3 = zero3 || st.zero >= 3;
  const bool zero3_pipeline = c.plan.pp > 1 && zero3;
  // FSDP2 under torch's pipelining: the program gathers a stage's parameters once per step and
  // reduces its gradients once, after the last backward (the sequence-parallel norms' TP sums
  // with them); the cost-only lowering does both per micro-batch.
  if (zero3_pipeline &&
      (k.starts_with("all_gather dp_comm") || k.starts_with("reduce_scatter dp_comm") ||
       k.starts_with("all_reduce tp_comm")))
    return true;
  return c.plan.recompute[static_cast<int>(strategy::LayerKind::attention)] ==
             strategy::Recompute::selective &&
         k.starts_with("all_gather tp_comm");
}

} // namespace

TEST_CASE("the cost-only lowering prices the collectives the program issues, kind by kind" *
          doctest::test_suite("independent")) {
  for (const Case& c : matrix()) {
    CAPTURE(c.what);
    const workload::ModelSpec m = spec(c.model, c.layers);
    const auto want = programmed(c, m);
    const auto got = priced(c, m);
    std::map<std::string, double> all = want.n;
    all.insert(got.n.begin(), got.n.end());
    for (const auto& entry : all) {
      const std::string& k = entry.first;
      CAPTURE(k);
      if (known_difference(c, k))
        continue;
      const double e = want.n.count(k) ? want.n.at(k) : 0.0;
      const double s = got.n.count(k) ? got.n.at(k) : 0.0;
      if (e != s) {
        auto list = [](const Count& counted, const std::string& of) {
          return counted.names.count(of) ? fmt::format("{}", fmt::join(counted.names.at(of), ", "))
                                         : std::string();
        };
        MESSAGE(fmt::format("{}: {} program {} [{}] priced {} [{}]", c.what, k, e, list(want, k), s,
                            list(got, k)));
      }
      CHECK(s == e); // whole counts over the same world: exact
    }
  }
}

} // namespace strategies_lower_parity_test
