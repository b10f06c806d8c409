#pragma once
// The program IR's equivalence check, shared by the interpreter's tests: lower a plan for a tiny
// model with the program lowering, run it on the CPU interpreter, and hold together
// (a) the loss, gradients and updated parameters with the single-rank float64 reference,
// (b) the ops each rank ran (kind, communicator, bytes of the buffers it used) with the ops of
//     its rank class in the Schedule, and
// (c) each rank's peak live bytes with the simulator's memory tracker replaying its class's
//     allocations in program order (no allocator allowance: the interpreter allocates exactly
//     the Schedule's tensors).
// Routing-dependent sizes (sim::RuntimeRows, MoE): the interpreter records the rows each such
// tensor had in each step (RunResult::runtime_rows). (b) compares kind and communicator op by
// op exactly; bytes exactly for static ops, and for an op with runtime-rows operands the
// Schedule's operands re-sized to the rows recorded, plus, summed over the world, the
// Schedule's expected bytes: equal where rows are a sum of counts (routing moves rows between
// ranks, it creates none), no more than the executed where padded to the ETP group's largest.
// (c) replays each step's allocations with the runtime-rows tensors at the recorded rows (the
// Schedule's Tensor::bytes for them is the reserved buffer, the expected rows times the plan's
// imbalance) and compares the largest peak of the steps.
#include "lowering/passes.hpp"
#include "lowering/program.hpp"
#include "real_backend/cpu/interpreter.hpp"
#include "sim/memory_tracker.hpp"
#include "strategies/plan.hpp"
#include "tests/support/approx.hpp"
#include "workload/catalog.hpp"

#include <algorithm>
#include <doctest/doctest.h>
#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <utility>

namespace mop::test {

struct Case {
  workload::ModelSpec spec;
  real::TinyConfig config;
  strategy::Plan plan;
  sim::Schedule schedule;
};

inline Case make_case(const workload::ModelSpec& spec, int world, int global_batch, int seq,
                      const std::function<void(strategy::Plan&)>& edit) {
  Case k;
  k.spec = spec;
  k.config = real::tiny_config(k.spec);
  k.plan.world = world;
  k.plan.global_batch = global_batch;
  edit(k.plan);
  strategy::complete_plan(k.plan);
  k.schedule = lowering::lower_program(k.plan, {&k.spec, seq, 8});
  sim::check_schedule(k.schedule);
  return k;
}

inline Case make_case(const std::string& id, int world, int global_batch, int seq,
                      const std::function<void(strategy::Plan&)>& edit) {
  return make_case(workload::load_model(id), world, global_batch, seq, edit);
}

// A catalog model with at least `layers` decoder layers: deeper copies repeat its layer pattern
// (as the equivalence matrix builds them for pipelines).
inline workload::ModelSpec deeper(const std::string& id, int layers) {
  workload::ModelSpec m = workload::load_model(id);
  while (layers > m.num_layers())
    m.layers.push_back(m.layers[m.layers.size() % 2]);
  return m;
}

// The rank class a rank runs: its pipeline stage.
inline const sim::RankClass& class_of(const sim::Schedule& s, int rank) {
  const int stage = s.mesh.view("attention").coord(rank, "pp");
  for (const sim::RankClass& rc : s.classes)
    if (rc.stage == stage)
      return rc;
  FAIL("no class for rank " << rank);
  return s.classes[0];
}

// The bytes of tensor t at `rows` rows (its shape's otherwise).
inline double bytes_at(const sim::Tensor& t, std::int64_t rows) {
  sim::Tensor copy = t;
  if (rows >= 0)
    copy.shape[0] = rows;
  return lowering::tensor_bytes(copy);
}

// What an op reads and writes (a collective: moves, nccl-tests' size), its tensors sized by
// `rows` (runtime rows; -1 or an empty list: as the Schedule's shapes say).
inline double op_bytes(const sim::RankClass& rc, const sim::Op& op,
                       const std::vector<std::int64_t>& rows) {
  auto b = [&](int t) {
    const auto k = static_cast<std::size_t>(t);
    return bytes_at(rc.tensors[k], rows.empty() ? -1 : rows[k]);
  };
  double bytes = 0;
  if (op.kernel == sim::Kernel::collective) {
    if (op.kind == sim::OpKind::all_gather)
      for (int t : op.outputs)
        bytes += b(t);
    else
      for (std::size_t i = 0;
           i + static_cast<std::size_t>(rc.attrs_of(op).count_inputs) < op.inputs.size(); ++i)
        bytes += b(op.inputs[i]);
  } else if (op.kernel != sim::Kernel::tokens) {
    for (const auto* list : {&op.inputs, &op.outputs})
      for (int t : *list)
        bytes += b(t);
  }
  return bytes;
}

// 0: static operands only; 1: runtime rows, all sums of counts; 2: some padded; 3: some expert
// copies held against a reserve (rebalancing: the world's copies are not the expected ones).
inline int runtime_kind(const sim::RankClass& rc, const sim::Op& op) {
  int kind = 0;
  for (const auto* list : {&op.inputs, &op.outputs})
    for (int t : *list) {
      const sim::RuntimeRows& r = rc.tensors[static_cast<std::size_t>(t)].rows;
      if (r.counts >= 0)
        kind = std::max(kind, r.reserve ? 3 : (r.padded ? 2 : 1));
    }
  return kind;
}

// A class's memory with its ops run one after another in program order, op i at time i (so the
// peak's time is the index of the op that reaches it).
inline sim::ClassMemory program_order_memory(const sim::RankClass& rc) {
  sim::MemoryTracker tracker(rc, false);
  double t = 0;
  for (const sim::Op& op : rc.ops) {
    tracker.allocate(op.allocs, t);
    tracker.free(op.frees, t + 0.5);
    t += 1;
  }
  return tracker.finish();
}

inline double program_order_peak(const sim::RankClass& rc) {
  return program_order_memory(rc).peak_hbm_bytes;
}

// Loss, gradients and parameters as the single-rank reference's (float64), and every kind of op
// run as many times as the Schedule says.
inline void expect_reference_and_counts(const real::RunResult<double>& r) {
  CHECK(r.max_loss_rel_diff < 1e-12);
  CHECK(r.max_grad_rel_diff < 1e-9);
  CHECK(r.max_param_rel_diff < 1e-9);
  for (const auto& entry : r.scheduled) {
    const auto& kind = entry.first; // a named copy: clang 14 cannot capture a binding
    CAPTURE(kind);
    CHECK(r.ops.at(kind).count == entry.second);
  }
}

// The start of "interpreter: expert parallelism with skewed routing": a router that scores only
// expert 0 (all other logits exactly 0, ties to the lower index), so every token goes to experts
// {0, 1} or {1, 2} and the first expert rank gets almost every row.
inline real::TrainState<double> skewed_router_start(const Case& k) {
  auto start = real::initial_state<double>(k.config, 11);
  const auto layout = real::param_layout(k.config);
  const int router = real::find_param(layout, real::ParamRole::router, 1);
  REQUIRE(router >= 0);
  auto& w = start.params[static_cast<std::size_t>(router)];
  for (std::size_t i = 0; i < w.size(); ++i)
    w[i] = i % static_cast<std::size_t>(k.config.experts) == 0 ? 0.5 : 0.0;
  return start;
}

inline void expect_held_together(const Case& k, int steps = 2) {
  real::RunOptions o;
  o.steps = steps;
  o.check = true;
  o.trace = true;
  const auto data = real::DataSource::synthetic(k.config.vocab, 7);
  const real::RunResult<double> r = real::interpret<double>(
      k.schedule, k.config, data, real::initial_state<double>(k.config, 11), o);
  // (a), and (b) per kind
  expect_reference_and_counts(r);
  // (b) op by op
  CHECK(r.ops.size() == r.scheduled.size());
  // (b) for runtime-rows ops, over the world: [class, step, op] executed and expected bytes.
  std::map<std::tuple<const sim::RankClass*, int, std::size_t>, std::pair<double, double>> routed;
  for (int rank = 0; rank < k.schedule.world; ++rank) {
    CAPTURE(rank);
    const auto rk = static_cast<std::size_t>(rank);
    const sim::RankClass& rc = class_of(k.schedule, rank);
    const auto& rows = r.runtime_rows[rk];
    REQUIRE(rows.size() == static_cast<std::size_t>(steps));
    std::vector<real::ExecutedOp> want;
    // An update deferred into the next step's forward is skipped in the first step and runs
    // once more after the last.
    for (int step = 0; step < steps; ++step)
      for (std::size_t i = 0; i < rc.ops.size(); ++i) {
        const sim::Op& op = rc.ops[i];
        if (rc.attrs_of(op).deferred && step == 0)
          continue;
        double bytes = 0;
        if (runtime_kind(rc, op) == 0) {
          bytes = op.kernel == sim::Kernel::collective ? op.bytes : op_bytes(rc, op, {});
        } else {
          bytes = op_bytes(rc, op, rows[static_cast<std::size_t>(step)]);
          auto& sums = routed[{&rc, step, i}];
          sums.first += bytes;
          sums.second += op_bytes(rc, op, {});
        }
        want.push_back(real::ExecutedOp{real::op_count_key(op), op.group, bytes});
      }
    for (const sim::Op& op : rc.ops) // the deferred updates run once more after the last step
      if (rc.attrs_of(op).deferred)
        want.push_back(real::ExecutedOp{
            real::op_count_key(op), op.group,
            op.kernel == sim::Kernel::collective ? op.bytes : op_bytes(rc, op, {})});
    REQUIRE(r.trace[rk].size() == want.size());
    CHECK(r.trace[rk] == want);
    // (c)
    double peak = 0;
    for (int step = 0; step < steps; ++step) {
      sim::RankClass sized = rc;
      for (std::size_t t = 0; t < sized.tensors.size(); ++t)
        if (sized.tensors[t].rows.counts >= 0)
          sized.tensors[t].bytes =
              bytes_at(sized.tensors[t], rows[static_cast<std::size_t>(step)][t]);
      peak = std::max(peak, program_order_peak(sized));
    }
    CHECK(r.peak_bytes[rk] == rel(peak));
  }
  for (const auto& [at, sums] : routed) {
    const sim::RankClass& rc = *std::get<0>(at);
    const sim::Op& op = rc.ops[std::get<2>(at)];
    CAPTURE(op.name);
    if (runtime_kind(rc, op) == 1)
      CHECK(sums.first == rel(sums.second));
    else if (runtime_kind(rc, op) == 2)
      CHECK(sums.first >= sums.second);
  }
}

} // namespace mop::test
