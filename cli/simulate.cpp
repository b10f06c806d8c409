// mop simulate: lower the plan to a Schedule, play it on the hardware model, report the step.
#include "cli/commands.hpp"
#include "cli/memory.hpp"
#include "cli/output.hpp"
#include "common/error.hpp"
#include "common/file_io.hpp"
#include "common/units.hpp"
#include "hw_models/calibration.hpp"
#include "planner/evaluate.hpp"
#include "sim/engine.hpp"
#include "traces/chrome_trace.hpp"

#include <algorithm>
#include <cmath>
#include <fmt/format.h>
#include <iostream>
#include <memory>

namespace mop::cli {
namespace {

struct SimulateOptions : PlanOptions {
  std::string trace;
  bool full = false;
  std::string lowering = "cost";
  int routing_seeds = 1;
};

// Step times over routing seeds: nearest-rank percentiles.
struct SeedSpread {
  std::vector<double> steps; // in seed order
  double percentile(double q) const {
    std::vector<double> v = steps;
    std::sort(v.begin(), v.end());
    const auto rank = static_cast<std::size_t>(std::ceil(q * static_cast<double>(v.size())));
    return v[std::max<std::size_t>(rank, 1) - 1];
  }
};

// The simulated classes that end last and peak highest (each a rank: uneven routing gives
// every expert-parallel rank its own class).
Json simulated_routing(const PlanInputs& in, const strategy::Plan& p,
                       const planner::StepEvaluation& e, const SeedSpread& spread) {
  Json j = routing_json(in, p);
  // The ranks meet at every dispatch and combine, so they end together: the one the others
  // wait for is the one whose routed work (expert GEMMs and activations) takes longest.
  const auto& classes = e.result.classes;
  std::vector<double> routed(classes.size(), 0.0);
  for (std::size_t i = 0; i < classes.size(); ++i) {
    const auto& ops = e.schedule.classes[i].ops;
    for (std::size_t k = 0; k < ops.size(); ++k)
      if (ops[k].routed == sim::Routed::rows)
        routed[i] += classes[i].ops[k].end_s - classes[i].ops[k].start_s;
  }
  std::size_t slowest = 0, highest = 0;
  for (std::size_t i = 1; i < classes.size(); ++i) {
    if (routed[i] > routed[slowest])
      slowest = i;
    if (classes[i].memory.peak_hbm_bytes > classes[highest].memory.peak_hbm_bytes)
      highest = i;
  }
  j["slowest_routed_s"] = routed[slowest];
  j["slowest_class"] = e.schedule.classes[slowest].name;
  j["highest_peak_class"] = e.schedule.classes[highest].name;
  j["highest_peak_hbm_bytes"] = classes[highest].memory.peak_hbm_bytes;
  if (spread.steps.size() > 1)
    j["step_time_s"] = Json{{"seeds", spread.steps.size()},
                            {"p50", spread.percentile(0.5)},
                            {"p95", spread.percentile(0.95)},
                            {"max", spread.percentile(1.0)},
                            {"each", spread.steps}};
  return j;
}

struct Report {
  double step_time_s = 0;
  double tokens_per_s_per_gpu = 0;
  double tflops_per_gpu = 0;
  double mfu = 0;
  double peak_hbm_bytes = 0; // the event engine's tracker, plus the fragmentation allowance
  double peak_host_bytes = 0;
  sim::SimResult result;
};

Report report_of(const planner::StepEvaluation& e, const PlanInputs& in,
                 const strategy::MemoryHardware& hw) {
  Report rep;
  const sim::SimResult& r = e.result;
  rep.step_time_s = e.step_time_s;
  const double gpus = static_cast<double>(e.schedule.world);
  rep.tokens_per_s_per_gpu = e.tokens_per_step / e.step_time_s / gpus;
  rep.tflops_per_gpu = e.model_flops_per_step / e.step_time_s / gpus / 1e12;
  rep.mfu = rep.tflops_per_gpu * 1e12 / in.cluster.gpu.peak_flops_bf16;
  for (const sim::ClassResult& c : r.classes) {
    const double dynamic = c.memory.at_peak[static_cast<int>(sim::MemoryKind::activations)] +
                           c.memory.at_peak[static_cast<int>(sim::MemoryKind::comm_buffers)];
    rep.peak_hbm_bytes =
        std::max(rep.peak_hbm_bytes, c.memory.peak_hbm_bytes + hw.fragmentation * dynamic);
    rep.peak_host_bytes = std::max(rep.peak_host_bytes, c.memory.peak_host_bytes);
  }
  rep.peak_host_bytes = rep.peak_host_bytes * hw.gpus_per_node + hw.host_reserved_bytes;
  rep.result = r;
  return rep;
}

Json simulate_json(const strategy::ResolvedPlan& plan, const planner::StepEvaluation& e,
                   const Report& rep, const strategy::MemoryHardware& hw) {
  const sim::Schedule& s = e.schedule;
  Json j = memory_json(plan); // every key of `mop memory` (the analytic model)
  j["analytic_peak_hbm_bytes"] = j["peak_hbm_bytes"];
  j["peak_hbm_bytes"] = rep.peak_hbm_bytes;
  j["peak_host_bytes"] = rep.peak_host_bytes;
  j["fits"] = hw.fits_hbm(rep.peak_hbm_bytes) && rep.peak_host_bytes <= hw.host_bytes;
  j["step_time_s"] = rep.step_time_s;
  j["tokens_per_s_per_gpu"] = rep.tokens_per_s_per_gpu;
  j["mfu"] = rep.mfu;
  j["tflops_per_gpu"] = rep.tflops_per_gpu;
  j["lowering"] = e.program ? "program" : "cost";
  const sim::Breakdown& b = rep.result.breakdown;
  Json by_kind = Json::object();
  for (int c = 0; c < 10; ++c)
    if (b.exposed_comm_by_category[c] > 0)
      by_kind[sim::category_name(static_cast<sim::Category>(c))] = b.exposed_comm_by_category[c];
  j["breakdown_s"] = Json{{"compute", b.compute},
                          {"recompute", b.recompute},
                          {"exposed_comm", b.exposed_comm},
                          {"exposed_comm_by_kind", by_kind},
                          {"bubble", b.bubble},
                          {"offload_stall", b.offload_stall},
                          {"optimizer", b.optimizer}};
  Json classes = Json::array();
  for (std::size_t i = 0; i < s.classes.size(); ++i) {
    const auto& m = rep.result.classes[i].memory;
    classes.push_back(Json{{"name", s.classes[i].name},
                           {"ranks", s.classes[i].multiplicity},
                           {"ops", s.classes[i].ops.size()},
                           {"end_s", rep.result.classes[i].end_s},
                           {"peak_hbm_bytes", m.peak_hbm_bytes},
                           {"peak_time_s", m.peak_time_s},
                           {"largest_at_peak", m.largest_at_peak}});
  }
  j["simulated_classes"] = classes;
  j["tokens_per_step"] = e.tokens_per_step;
  j["micro_batches"] = e.micro_batches;
  j["micro_batches_simulated"] = e.micro_batches_simulated;
  j["events"] = rep.result.events;
  return j;
}

void print_text(const strategy::ResolvedPlan& plan, const planner::StepEvaluation& e,
                const Report& rep, const PlanInputs& in, const strategy::MemoryHardware& hw,
                const SeedSpread& spread) {
  std::cout << fmt::format(
      "{} on {} x {} ({} GPUs), seq {}, global batch {} ({} tokens, {} "
      "micro-batches{})\n",
      in.model.name, in.nodes, in.cluster.name, e.schedule.world, in.seq, plan.plan.global_batch,
      e.tokens_per_step, e.micro_batches,
      e.micro_batches_simulated < e.micro_batches
          ? fmt::format(", {} simulated and extrapolated", e.micro_batches_simulated)
          : "");
  std::cout << fmt::format("plan ({}): {}\n", plan.plan.family, strategy::summary(plan.plan));
  // The attention kernel the prediction assumes (the family's framework default,
  // docs/HARDWARE.md "Attention kernels").
  for (const sim::RankClass& rc : e.schedule.classes) {
    const auto op = std::find_if(rc.ops.begin(), rc.ops.end(), [](const sim::Op& o) {
      return o.kind == sim::OpKind::attention_fwd;
    });
    if (op != rc.ops.end()) {
      std::cout << fmt::format("attention kernel: {}\n",
                               sim::attention_kernel_name(op->attention.kernel));
      break;
    }
  }
  std::cout << routing_text(in, plan.plan) << "\n";
  std::cout << fmt::format("step time       {}\n", format_seconds(rep.step_time_s));
  if (spread.steps.size() > 1)
    std::cout << fmt::format("  over {} routing seeds: p50 {}, p95 {}, max {}\n",
                             spread.steps.size(), format_seconds(spread.percentile(0.5)),
                             format_seconds(spread.percentile(0.95)),
                             format_seconds(spread.percentile(1.0)));
  std::cout << fmt::format("tokens/s/GPU    {:.1f}\n", rep.tokens_per_s_per_gpu);
  std::cout << fmt::format("TFLOPS/GPU      {:.1f} (MFU {:.1f} %)\n", rep.tflops_per_gpu,
                           100 * rep.mfu);
  const sim::Breakdown& b = rep.result.breakdown;
  TextTable t{{"critical path", "time", "share"}, {}, {false, true, true}};
  auto row = [&](const std::string& name, double v) {
    t.rows.push_back({name, format_seconds(v), fmt::format("{:.1f} %", 100 * v / rep.step_time_s)});
  };
  row("compute", b.compute);
  if (b.recompute > 0)
    row("  of which recompute", b.recompute);
  row("exposed communication", b.exposed_comm);
  for (int c = 0; c < 10; ++c)
    if (b.exposed_comm_by_category[c] > 0)
      row(fmt::format("  {}", sim::category_name(static_cast<sim::Category>(c))),
          b.exposed_comm_by_category[c]);
  row("pipeline bubble", b.bubble);
  row("offload stall", b.offload_stall);
  row("optimizer", b.optimizer);
  std::cout << "\n" << t.render();
  if (in.uneven) {
    const Json r = simulated_routing(in, plan.plan, e, spread);
    std::cout << fmt::format("\nslowest rank: {} ({} of expert work); highest HBM peak: {} "
                             "({})\n",
                             r["slowest_class"].get<std::string>(),
                             format_seconds(r["slowest_routed_s"].get<double>()),
                             r["highest_peak_class"].get<std::string>(),
                             format_bytes(r["highest_peak_hbm_bytes"].get<double>()));
  }
  std::cout << fmt::format(
      "\npeak HBM {} of {} per GPU; host {} of {} per node: {}\n", format_bytes(rep.peak_hbm_bytes),
      format_bytes(hw.hbm_bytes), format_bytes(rep.peak_host_bytes), format_bytes(hw.host_bytes),
      hw.fits_hbm(rep.peak_hbm_bytes) && rep.peak_host_bytes <= hw.host_bytes ? "fits"
                                                                              : "does not fit");
}

} // namespace

void add_simulate_command(CLI::App& app) {
  auto opt = std::make_shared<SimulateOptions>();
  CLI::App* cmd = app.add_subcommand(
      "simulate",
      "Play a plan's schedule on the hardware model: step time, throughput, MFU, where the time "
      "goes, memory over time\n\nExample:\n"
      "  mop simulate --model kimi-k2 --cluster h200 --nodes 12 --seq 1M --plan mop --trace "
      "t.json");
  add_plan_options(cmd, *opt);
  cmd->add_option("--trace", opt->trace,
                  "write a Chrome/Perfetto trace (open it in ui.perfetto.dev)");
  cmd->add_flag("--full", opt->full,
                std::string("simulate every micro-batch instead of extrapolating the steady "
                            "state from two shorter runs"));
  cmd->add_option("--lowering", opt->lowering,
                  "which lowering writes the simulated schedule: cost (the cost-only lowering) or "
                  "program (the executable program mop run interprets, where it builds the plan; "
                  "docs/SIMULATOR.md)")
      ->check(CLI::IsMember({"cost", "program"}))
      ->capture_default_str();
  cmd->add_option("--routing-seeds", opt->routing_seeds,
                  "simulate the routing drawn from this many seeds (from --routing-seed on) and "
                  "report the step time's p50, p95 and max")
      ->capture_default_str()
      ->group("Expert routing (uneven: every expert-parallel rank simulated)");
  cmd->callback([opt] {
    if (!opt->trace.empty())
      check_output_path(opt->trace); // refused before minutes of simulation, not after
    if (opt->routing_seeds < 1 || opt->routing_seeds > 1000)
      throw InputError(fmt::format("--routing-seeds must be between 1 and 1000 (got {}).",
                                   opt->routing_seeds));
    const PlanInputs in = resolve_inputs(*opt);
    if (in.uneven && opt->lowering == "program")
      throw InputError("--lowering program simulates balanced routing only; uneven --routing "
                       "is simulated on the cost-only lowering (leave out --lowering).");
    const strategy::PlanContext ctx = in.context();
    const strategy::ResolvedPlan plan = resolve_command_plan(*opt, in);
    const Json notes = report_not_represented(in);
    const hw::Calibration cal =
        opt->calibration.empty() ? hw::Calibration{} : hw::load_calibration(opt->calibration);
    const planner::StepEvaluation e = planner::evaluate_step(
        plan.plan, strategy::lowering_context(ctx), in.cluster, cal, opt->full ? 0 : 16,
        opt->lowering == "program" ? planner::Lowering::program : planner::Lowering::cost_only);
    SeedSpread spread;
    spread.steps.push_back(e.step_time_s);
    if (in.uneven && opt->routing_seeds > 1) {
      PlanInputs other = in;
      for (int k = 1; k < opt->routing_seeds; ++k) {
        other.reseed_routing(in.routing.seed + static_cast<std::uint64_t>(k));
        spread.steps.push_back(planner::evaluate_step(plan.plan,
                                                      strategy::lowering_context(other.context()),
                                                      in.cluster, cal, opt->full ? 0 : 16,
                                                      planner::Lowering::cost_only,
                                                      planner::Check::skip)
                                   .step_time_s);
      }
    }
    const sim::Schedule& s = e.schedule;
    const Report rep = report_of(e, in, ctx.hw);
    if (!opt->trace.empty()) {
      trace::TraceOptions to;
      to.title = fmt::format("{} {} seq {} on {} x {}", in.model.name, strategy::summary(plan.plan),
                             in.seq, in.nodes, in.cluster.name);
      trace::write_chrome_trace(opt->trace, s, rep.result, to);
    }
    if (opt->json) {
      Json j = simulate_json(plan, e, rep, ctx.hw);
      if (in.uneven)
        j["routing"] = simulated_routing(in, plan.plan, e, spread);
      if (in.run)
        j["not_represented"] = notes;
      print_json(j);
    } else
      print_text(plan, e, rep, in, ctx.hw, spread);
  });
}

} // namespace mop::cli
