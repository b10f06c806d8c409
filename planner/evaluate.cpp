#include "planner/evaluate.hpp"

#include "common/error.hpp"
#include "lowering/program.hpp"
#include "sim/engine.hpp"
#include "strategies/pipeline.hpp"

#include <algorithm>
#include <cmath>

namespace mop::planner {

using strategy::LoweringContext;
using strategy::PipelineSchedule;
using strategy::Plan;

namespace {

Plan with_micro_batches(Plan p, int micro) {
  p.global_batch = micro * p.micro_batch * p.attention.dp;
  return p;
}

// The plan's Schedule from the chosen lowering; `program` says which one wrote it.
sim::Schedule lower(const Plan& p, const LoweringContext& c, Lowering lowering, bool& program) {
  program = false;
  if (lowering == Lowering::program) {
    const lowering::ProgramContext pc{c.model, c.seq, c.gpus_per_node, c.gemm_dtype, c.hw};
    bool builds = true;
    try {
      lowering::check_programmable(p, pc);
    } catch (const InputError&) {
      builds = false;
    }
    if (builds) {
      program = true;
      return lowering::lower_program(p, pc);
    }
  }
  return strategy::lower(p, c);
}

// Whether the pipeline's virtual stages differ: in their number of layers, or in their layers'
// kinds (MLP and attention window).
bool uneven_stages(const Plan& p, const workload::ModelSpec& m) {
  if (p.pp <= 1)
    return false;
  const int L = static_cast<int>(m.num_layers());
  const std::vector<int> bounds = strategy::virtual_stage_bounds(p, L);
  auto same = [&](int a, int b) {
    return m.layers[static_cast<std::size_t>(a)].mlp == m.layers[static_cast<std::size_t>(b)].mlp &&
           m.layers[static_cast<std::size_t>(a)].window ==
               m.layers[static_cast<std::size_t>(b)].window;
  };
  const int n = bounds[1] - bounds[0];
  for (std::size_t v = 0; v + 1 < bounds.size(); ++v) {
    if (bounds[v + 1] - bounds[v] != n)
      return true;
    for (int i = 0; i < n; ++i)
      if (!same(bounds[v] + i, i))
        return true;
  }
  return false;
}

} // namespace

StepEvaluation evaluate_step(const Plan& plan, const LoweringContext& ctx,
                             const hw::ClusterSpec& cluster, const hw::Calibration& calibration,
                             int max_simulated, Lowering lowering, Check check) {
  StepEvaluation e;
  sim::EngineOptions checked;
  checked.check_schedule_first = check == Check::schedule;
  e.micro_batches = plan.micro_batches();
  e.tokens_per_step = static_cast<double>(plan.global_batch) * static_cast<double>(ctx.seq);
  const int pp = plan.pp;
  // m2: a multiple of pp and at least 2·pp, so that m1 = m2 - pp·(...) >= pp: both runs have a
  // full pipeline (1F1B's step is linear in m from m = pp on; interleaving needs m % pp == 0).
  int m2 = std::max(max_simulated / pp * pp, 2 * pp);
  const bool extrapolate =
      max_simulated > 0 && plan.schedule != PipelineSchedule::gpipe && e.micro_batches > m2;
  if (!extrapolate) {
    e.schedule = lower(plan, ctx, lowering, e.program);
    e.result = sim::simulate(e.schedule, cluster, calibration, checked);
    e.micro_batches_simulated = e.micro_batches;
    e.step_time_s = e.result.step_time_s;
    e.model_flops_per_step = e.schedule.model_flops_per_step;
    return e;
  }
  int m1 = m2 - pp * std::max(1, m2 / (2 * pp)); // about half, a multiple of pp
  // The shorter runs have the same structure as the checked one: only their times are needed.
  sim::EngineOptions quick;
  quick.check_schedule_first = false;
  quick.record_memory_timeline = false;
  LoweringContext unnamed = ctx;
  unnamed.names = false;
  auto step_at = [&](int micro) {
    bool program = false;
    return sim::simulate(lower(with_micro_batches(plan, micro), unnamed, lowering, program),
                         cluster, calibration, quick);
  };
  // The run at m2 is the one reported (its Schedule, memory and critical path).
  auto reported_at = [&](int micro) {
    e.schedule = lower(with_micro_batches(plan, micro), ctx, lowering, e.program);
    e.result = sim::simulate(e.schedule, cluster, calibration, checked);
  };
  sim::SimResult r1 = step_at(m1);
  reported_at(m2);
  // Uneven stages (a stage with more layers, or other kinds of layers, than another) can settle
  // into their steady state later than the pipeline fills: move the pair up by the same stride
  // until the next stride adds the same time as this one (to a millionth of the step), or run
  // every micro-batch when that comes first.
  if (uneven_stages(plan, *ctx.model)) {
    const int stride = m2 - m1;
    for (;;) {
      const int m3 = m2 + stride;
      if (m3 >= e.micro_batches)
        return evaluate_step(plan, ctx, cluster, calibration, 0, lowering, check);
      const double before = e.result.step_time_s - r1.step_time_s;
      r1 = std::move(e.result);
      reported_at(m3);
      const double after = e.result.step_time_s - r1.step_time_s;
      m1 = m2;
      m2 = m3;
      if (std::fabs(after - before) <= 1e-6 * e.result.step_time_s)
        break;
    }
  }
  e.micro_batches_simulated = m2;
  const double k = static_cast<double>(e.micro_batches - m2) / (m2 - m1);
  auto extend = [k](double at_m2, double at_m1) { return at_m2 + k * (at_m2 - at_m1); };
  sim::Breakdown& b = e.result.breakdown;
  const sim::Breakdown& b1 = r1.breakdown;
  b.compute = extend(b.compute, b1.compute);
  b.recompute = extend(b.recompute, b1.recompute);
  b.exposed_comm = extend(b.exposed_comm, b1.exposed_comm);
  for (int c = 0; c < 10; ++c)
    b.exposed_comm_by_category[c] =
        extend(b.exposed_comm_by_category[c], b1.exposed_comm_by_category[c]);
  b.bubble = extend(b.bubble, b1.bubble);
  b.offload_stall = extend(b.offload_stall, b1.offload_stall);
  b.optimizer = extend(b.optimizer, b1.optimizer);
  e.result.step_time_s = extend(e.result.step_time_s, r1.step_time_s);
  e.result.events += r1.events;
  e.step_time_s = e.result.step_time_s;
  // Every micro-batch does the same arithmetic.
  e.model_flops_per_step =
      e.schedule.model_flops_per_step * static_cast<double>(e.micro_batches) / m2;
  return e;
}

} // namespace mop::planner
