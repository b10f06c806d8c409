#include "planner/evaluate.hpp"

#include "common/error.hpp"
#include "lowering/program.hpp"
#include "sim/engine.hpp"
#include "strategies/pipeline.hpp"

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

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
    lowering::ProgramContext pc{c.model, c.seq, c.gpus_per_node, c.gemm_dtype, c.hw};
    pc.attention_kernel = strategy::attention_kernel(p, c);
    bool builds = true;
    try {
      lowering::check_programmable(p, pc);
    } catch (const InputError&) {
      builds = false;
    }
    if (builds) {
      program = true;
      sim::Schedule s = lowering::lower_program(p, pc);
      s.host_issue_s = strategy::host_issue_s(p, c); // the same framework's host
      return s;
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

// One period of a pipeline's steady state, found inside one run: per micro-batch, the time it
// adds and what the critical class spends it on.
struct Period {
  double seconds = 0;
  sim::Breakdown breakdown;
};

// Micro-batches `first` .. `last` (labels of the ops) are in the steady state when every stream
// of every class ends each one's ops the same time after the previous one's: the pipeline
// repeats itself, no stream (a data-parallel stream falling behind, a stage still filling)
// drifts against another. Then each further micro-batch adds one period. Times must agree to a
// billionth of the step.
std::optional<Period> steady_period(const sim::Schedule& s, const sim::SimResult& r, int first,
                                    int last) {
  const int n = last - first + 1;
  if (n < 4 || r.critical_path.empty())
    return std::nullopt;
  const double tolerance = 1e-9 * r.step_time_s;
  double period = -1;
  std::vector<double> critical_ends; // the critical class's first stream with ops in the window
  const int critical = r.critical_path.back().rank_class;
  for (std::size_t c = 0; c < s.classes.size(); ++c) {
    const sim::RankClass& rc = s.classes[c];
    const std::vector<sim::OpTiming>& times = r.classes[c].ops;
    std::vector<double> ends(rc.streams.size() * static_cast<std::size_t>(n), -1.0);
    for (std::size_t i = 0; i < rc.ops.size(); ++i) {
      const int mb = rc.ops[i].micro_batch;
      if (mb < first || mb > last)
        continue;
      double& e = ends[static_cast<std::size_t>(rc.ops[i].stream) * static_cast<std::size_t>(n) +
                       static_cast<std::size_t>(mb - first)];
      e = std::max(e, times[i].end_s);
    }
    for (std::size_t st = 0; st < rc.streams.size(); ++st) {
      const double* e = &ends[st * static_cast<std::size_t>(n)];
      const bool any = std::any_of(e, e + n, [](double x) { return x >= 0; });
      if (!any)
        continue;
      if (std::any_of(e, e + n, [](double x) { return x < 0; }))
        return std::nullopt; // some micro-batches use this stream, others not
      if (period < 0)
        period = (e[n - 1] - e[0]) / (n - 1);
      for (int i = 0; i + 1 < n; ++i)
        if (std::fabs(e[i + 1] - e[i] - period) > tolerance)
          return std::nullopt;
      if (static_cast<int>(c) == critical && critical_ends.empty())
        critical_ends.assign(e, e + n);
    }
  }
  if (period <= 0 || critical_ends.empty())
    return std::nullopt;
  Period p;
  p.seconds = period;
  const auto k = static_cast<std::size_t>(critical);
  p.breakdown = sim::breakdown_between(s.classes[k], r.classes[k].ops, critical_ends.front(),
                                       critical_ends.back());
  const double per = 1.0 / (n - 1);
  sim::each_part(p.breakdown, p.breakdown, [per](double& x, double) { x *= per; });
  return p;
}

} // namespace

StepEvaluation evaluate_step(const Plan& plan, const LoweringContext& ctx,
                             const hw::ClusterSpec& cluster, const hw::Calibration& calibration,
                             int max_simulated, Lowering lowering, Check check,
                             bool memory_by_layer) {
  StepEvaluation e;
  sim::EngineOptions checked;
  checked.check_schedule_first = check == Check::schedule;
  checked.memory_by_layer = memory_by_layer;
  e.micro_batches = plan.micro_batches();
  e.tokens_per_step = static_cast<double>(plan.global_batch) * static_cast<double>(ctx.seq);
  const int pp = plan.pp;
  // The run reported (its Schedule, memory and critical path): the folded one, or the larger
  // of the two extrapolated.
  auto reported_at = [&](int micro) {
    e.schedule = lower(with_micro_batches(plan, micro), ctx, lowering, e.program);
    e.result = sim::simulate(e.schedule, cluster, calibration, checked);
  };
  // One run, folded: when the run's middle micro-batches repeat (steady_period), price that
  // period once. 1F1B (and zero-bubble) stages run their micro-batches' forwards in the steady
  // state from micro-batch pp on and their backwards until pp before the end, so a run of
  // 2·pp + 4 has four steady micro-batches in the middle; interleaved schedules need whole
  // rounds of pp micro-batches and take the two runs below.
  if (max_simulated > 0 && plan.schedule != PipelineSchedule::gpipe &&
      plan.schedule != PipelineSchedule::interleaved_1f1b) {
    const int m_run = 2 * pp + 4;
    if (e.micro_batches > m_run) {
      reported_at(m_run);
      if (const std::optional<Period> period =
              steady_period(e.schedule, e.result, pp, m_run - pp - 1)) {
        const double k = e.micro_batches - m_run;
        sim::each_part(e.result.breakdown, period->breakdown,
                  [k](double& x, double per_micro) { x += k * per_micro; });
        e.result.step_time_s += k * period->seconds;
        e.step_time_s = e.result.step_time_s;
        e.micro_batches_simulated = m_run;
        e.model_flops_per_step =
            e.schedule.model_flops_per_step * static_cast<double>(e.micro_batches) / m_run;
        return e;
      }
    }
  }
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
        return evaluate_step(plan, ctx, cluster, calibration, 0, lowering, check,
                             memory_by_layer);
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
  auto extend = [k](double& at_m2, double at_m1) { at_m2 += k * (at_m2 - at_m1); };
  sim::each_part(e.result.breakdown, r1.breakdown, extend);
  extend(e.result.step_time_s, r1.step_time_s);
  e.result.events += r1.events;
  e.step_time_s = e.result.step_time_s;
  // Every micro-batch does the same arithmetic.
  e.model_flops_per_step =
      e.schedule.model_flops_per_step * static_cast<double>(e.micro_batches) / m2;
  return e;
}

} // namespace mop::planner
