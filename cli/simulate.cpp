// mop simulate: lower the plan to a Schedule, play it on the hardware model, report the step.
#include "cli/commands.hpp"
#include "cli/memory.hpp"
#include "cli/output.hpp"
#include "common/file_io.hpp"
#include "common/units.hpp"
#include "hw_models/calibration.hpp"
#include "planner/evaluate.hpp"
#include "sim/engine.hpp"
#include "traces/chrome_trace.hpp"

#include <fmt/format.h>
#include <iostream>
#include <memory>

namespace mop::cli {
namespace {

struct SimulateOptions : PlanOptions {
  std::string trace;
  bool full = false;
  std::string lowering = "cost";
};

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
                const Report& rep, const PlanInputs& in, const strategy::MemoryHardware& hw) {
  std::cout << fmt::format(
      "{} on {} x {} ({} GPUs), seq {}, global batch {} ({} tokens, {} "
      "micro-batches{})\n",
      in.model.name, in.nodes, in.cluster.name, e.schedule.world, in.seq, plan.plan.global_batch,
      e.tokens_per_step, e.micro_batches,
      e.micro_batches_simulated < e.micro_batches
          ? fmt::format(", {} simulated and extrapolated", e.micro_batches_simulated)
          : "");
  std::cout << fmt::format("plan ({}): {}\n\n", plan.plan.family, strategy::summary(plan.plan));
  std::cout << fmt::format("step time       {}\n", format_seconds(rep.step_time_s));
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
  cmd->callback([opt] {
    if (!opt->trace.empty())
      check_output_path(opt->trace); // refused before minutes of simulation, not after
    const PlanInputs in = resolve_inputs(*opt);
    const strategy::PlanContext ctx = in.context();
    const strategy::ResolvedPlan plan = resolve_command_plan(*opt, in);
    const Json notes = report_not_represented(in);
    const hw::Calibration cal =
        opt->calibration.empty() ? hw::Calibration{} : hw::load_calibration(opt->calibration);
    const planner::StepEvaluation e = planner::evaluate_step(
        plan.plan, strategy::lowering_context(ctx), in.cluster, cal, opt->full ? 0 : 16,
        opt->lowering == "program" ? planner::Lowering::program : planner::Lowering::cost_only);
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
      if (in.run)
        j["not_represented"] = notes;
      print_json(j);
    } else
      print_text(plan, e, rep, in, ctx.hw);
  });
}

} // namespace mop::cli
