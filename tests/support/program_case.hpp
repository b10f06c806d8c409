#pragma once
// The program IR's equivalence check, shared by the interpreter's tests: lower a plan for a tiny
// model with the program lowering, run it on the CPU interpreter, and hold together
// (a) the loss, gradients and updated parameters with the single-rank float64 reference,
// (b) the ops each rank ran (kind, communicator, bytes of the buffers it used) with the ops of
//     its rank class in the Schedule, and
// (c) each rank's peak live bytes with the simulator's memory tracker replaying its class's
//     allocations in program order (no allocator allowance: the interpreter allocates exactly
//     the Schedule's tensors).
#include "lowering/passes.hpp"
#include "lowering/program.hpp"
#include "real_backend/cpu/interpreter.hpp"
#include "sim/memory_tracker.hpp"
#include "strategies/plan.hpp"
#include "tests/support/approx.hpp"
#include "workload/catalog.hpp"

#include <doctest/doctest.h>
#include <functional>
#include <string>

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
// (as the executor's equivalence matrix builds them for pipelines).
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

inline double program_order_peak(const sim::RankClass& rc) {
  sim::MemoryTracker tracker(rc, false);
  double t = 0;
  for (const sim::Op& op : rc.ops) {
    tracker.allocate(op.allocs, t);
    tracker.free(op.frees, t + 0.5);
    t += 1;
  }
  return tracker.finish().peak_hbm_bytes;
}

inline void expect_held_together(const Case& k, int steps = 2) {
  real::RunOptions o;
  o.steps = steps;
  o.check = true;
  o.trace = true;
  const auto data = real::DataSource::synthetic(k.config.vocab, 7);
  const real::RunResult<double> r = real::interpret<double>(
      k.schedule, k.config, data, real::initial_state<double>(k.config, 11), o);
  // (a)
  CHECK(r.max_loss_rel_diff < 1e-12);
  CHECK(r.max_grad_rel_diff < 1e-9);
  CHECK(r.max_param_rel_diff < 1e-9);
  // (b): per kind, and op by op.
  for (const auto& [kind, count] : r.scheduled) {
    CAPTURE(kind);
    CHECK(r.ops.at(kind).count == count);
  }
  CHECK(r.ops.size() == r.scheduled.size());
  for (int rank = 0; rank < k.schedule.world; ++rank) {
    CAPTURE(rank);
    const sim::RankClass& rc = class_of(k.schedule, rank);
    std::vector<real::ExecutedOp> want;
    for (int step = 0; step < steps; ++step)
      for (const sim::Op& op : rc.ops) {
        double bytes = 0;
        if (op.kernel == sim::Kernel::collective)
          bytes = op.bytes;
        else if (op.kernel != sim::Kernel::tokens)
          for (const auto* list : {&op.inputs, &op.outputs})
            for (int t : *list)
              bytes += lowering::tensor_bytes(rc.tensors[static_cast<std::size_t>(t)]);
        want.push_back(real::ExecutedOp{real::op_count_key(op), op.group, bytes});
      }
    REQUIRE(r.trace[static_cast<std::size_t>(rank)].size() == want.size());
    CHECK(r.trace[static_cast<std::size_t>(rank)] == want);
    // (c)
    CHECK(r.peak_bytes[static_cast<std::size_t>(rank)] == rel(program_order_peak(rc)));
  }
}

} // namespace mop::test
