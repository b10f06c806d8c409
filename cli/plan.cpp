// mop plan: search every valid plan of the chosen families; the fastest that fit, best first.
#include "cli/plan.hpp"
#include "cli/commands.hpp"
#include "cli/output.hpp"
#include "common/error.hpp"
#include "common/limits.hpp"
#include "common/units.hpp"
#include "planner/search.hpp"
#include "strategies/frameworks.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <fmt/format.h>
#include <iostream>
#include <memory>
#include <unistd.h>

namespace mop::cli {
namespace {

std::atomic<bool> g_interrupted{false};
extern "C" void on_interrupt(int) {
  g_interrupted.store(true);
}

struct PlanCommandOptions : PlanOptions {
  std::string family = "all";
  std::string emit; // megatron, deepspeed; empty: none
  int top = 5;
  int threads = 2;
};

// A plan's summary line with its predicted numbers.
std::string numbers(const planner::RankedPlan& r) {
  return fmt::format("step {}, {:.1f} tokens/s/GPU, MFU {:.1f} %, HBM {}{}",
                     format_seconds(r.eval.step_time_s), r.tokens_per_s_per_gpu, 100 * r.mfu,
                     format_bytes(r.peak_hbm_bytes), r.fits ? "" : " (does not fit)");
}

// The configuration --from named, ranked beside the search's best.
struct Imported {
  planner::RankedPlan ranked;
  Json notes;
};

Imported rank_imported(const PlanInputs& in) {
  const strategy::PlanContext ctx = in.context();
  const strategy::ResolvedPlan r = strategy::resolve_given_plan(in.run->plan, ctx, in.run_origin);
  return {planner::rank_plan(r.plan, ctx, in.cluster, hw::Calibration{}),
          report_not_represented(in)};
}

// --emit: the best plan as the framework's launch configuration or, when the framework cannot
// run it, why, and the best plan it can run (the search again, over what it expresses).
struct Emitted {
  strategy::Framework framework = strategy::Framework::megatron;
  std::vector<std::string> best_cannot;    // why the best plan is not expressible
  std::optional<planner::RankedPlan> plan; // the plan written (the best, or the nearest)
  std::string text;
};

Emitted emit(const PlanCommandOptions& opt, const PlanInputs& in, const planner::SearchResult& s) {
  Emitted e;
  e.framework = strategy::parse_framework(opt.emit);
  if (s.results.empty())
    return e;
  // Into the user's own configuration when --from named one of this framework.
  const std::string* base = in.run && in.run->framework == e.framework ? &in.run->text : nullptr;
  auto write = [&](const strategy::Plan& p) {
    return strategy::write_framework_config(e.framework, p, in.model, in.seq,
                                            in.cluster.node.gpus_per_node, in.precision, base);
  };
  const strategy::FrameworkConfig best = write(s.results[0].plan);
  if (best.cannot_express.empty()) {
    e.plan = s.results[0];
    e.text = best.text;
    return e;
  }
  e.best_cannot = best.cannot_express;
  const planner::SearchResult nearest =
      run_search(in, opt.family, 1, opt.threads, false,
                 [&](const strategy::Plan& p) { return write(p).cannot_express.empty(); });
  if (!nearest.results.empty()) {
    e.plan = nearest.results[0];
    e.text = write(nearest.results[0].plan).text;
  }
  return e;
}

std::vector<std::string> families_of(const std::string& family) {
  if (family == "all")
    return {};
  const auto& names = strategy::family_names();
  if (std::find(names.begin(), names.end(), family) == names.end())
    throw InputError(fmt::format("--family must be one of fsdp2, megatron, ulysses-zero3, mop or "
                                 "all (got '{}').",
                                 family));
  return {family};
}

// What runs out first when nothing fits, and the nearest fix.
std::string nothing_fits(const planner::SearchResult& s, const PlanInputs& in) {
  if (!s.closest)
    return s.no_plan_reason.empty()
               ? "no valid plan exists for this model, sequence length and cluster."
               : fmt::format("no valid plan exists for this model, sequence length and "
                             "cluster: {}",
                             s.no_plan_reason);
  const strategy::MemoryReport& m = s.closest_memory;
  const double over = m.fits_hbm ? m.peak_host_bytes / m.host_capacity_bytes
                                 : m.peak_hbm_bytes / m.hbm_capacity_bytes;
  // In double: a plan hundreds of times too large must not wrap an int.
  const double needed = std::max(std::ceil(over * in.nodes), in.nodes + 1.0);
  const std::int64_t most = limits::max_gpus / in.cluster.node.gpus_per_node;
  const std::string nodes = needed > static_cast<double>(most) ? fmt::format("more than {}", most)
                                                               : fmt::format("{:.0f}", needed);
  return fmt::format("nothing fits; closest: {}. {}. Nearest fixes: about {} nodes instead of {}, "
                     "more offload to the host, or a shorter context.",
                     strategy::summary(*s.closest), m.first_to_run_out, nodes, in.nodes);
}

} // namespace

Json ranked_json(const planner::RankedPlan& r) {
  const sim::Breakdown& b = r.eval.result.breakdown;
  return Json{{"plan", strategy::to_json(r.plan)},
              {"summary", strategy::summary(r.plan)},
              {"fits", r.fits},
              {"step_time_s", r.eval.step_time_s},
              {"tokens_per_s_per_gpu", r.tokens_per_s_per_gpu},
              {"mfu", r.mfu},
              {"tflops_per_gpu", r.tflops_per_gpu},
              {"peak_hbm_bytes", r.peak_hbm_bytes},
              {"peak_host_bytes", r.peak_host_bytes},
              {"global_batch", r.plan.global_batch},
              {"breakdown_s", Json{{"compute", b.compute},
                                   {"exposed_comm", b.exposed_comm},
                                   {"bubble", b.bubble},
                                   {"offload_stall", b.offload_stall},
                                   {"optimizer", b.optimizer}}}};
}

planner::SearchResult run_search(const PlanInputs& in, const std::string& family, int top,
                                 int threads, bool show_progress,
                                 std::function<bool(const strategy::Plan&)> filter) {
  planner::SearchOptions so;
  so.filter = std::move(filter);
  so.max_simulations = in.max_simulations;
  so.families = families_of(family);
  so.top = top;
  so.threads = threads;
  so.stop = &g_interrupted;
  if (show_progress)
    so.progress = [](std::int64_t done, std::int64_t total) {
      std::fprintf(stderr, "\rsimulating candidates: %lld of at most %lld",
                   static_cast<long long>(done), static_cast<long long>(total));
      std::fflush(stderr);
    };
  g_interrupted.store(false);
  auto previous = std::signal(SIGINT, on_interrupt);
  planner::SearchResult r = planner::search_plans(in.context(), in.cluster, hw::Calibration{}, so);
  std::signal(SIGINT, previous);
  if (show_progress)
    std::fputs("\r\033[K", stderr);
  return r;
}

void add_plan_command(CLI::App& app) {
  auto opt = std::make_shared<PlanCommandOptions>();
  CLI::App* cmd = app.add_subcommand(
      "plan", "Search every valid plan of the chosen families: the fastest that fit, best "
              "first\n\nExample:\n  mop plan --model kimi-k2 --cluster h200 --nodes 12 --seq 1M");
  add_plan_options(cmd, *opt, false);
  cmd->add_option("--family", opt->family, "fsdp2, megatron, ulysses-zero3, mop or all")
      ->capture_default_str();
  cmd->add_option("--top", opt->top, "how many plans to show")->capture_default_str();
  cmd->add_option("--threads", opt->threads, "threads for the search")->capture_default_str();
  cmd->add_option("--emit", opt->emit,
                  "print the best plan as a launch configuration: megatron (arguments), "
                  "torchtitan (overrides) or deepspeed (ds.json); when the framework cannot run "
                  "it, why, and the best plan "
                  "it can")
      ->check(CLI::IsMember({"megatron", "torchtitan", "deepspeed"}));
  cmd->callback([opt] {
    if (opt->top <= 0)
      throw InputError(fmt::format("--top must be positive (got {}).", opt->top));
    check_threads(opt->threads);
    const PlanInputs in = resolve_inputs(*opt);
    const bool progress = ::isatty(2) != 0; // stderr: also with --json
    const planner::SearchResult s = run_search(in, opt->family, opt->top, opt->threads, progress);
    // Flags no plan can take are a bad request, not a result.
    if (s.candidates_evaluated == 0 && !in.overrides.empty())
      throw InputError(fmt::format("no {}plan for {} at {} tokens on {} GPUs has {}: {}",
                                   opt->family == "all" ? "" : opt->family + " ", in.model.name,
                                   in.seq, in.nodes * in.cluster.node.gpus_per_node,
                                   strategy::describe(in.overrides), s.no_plan_reason));
    const std::optional<Imported> imported =
        in.run ? std::optional<Imported>(rank_imported(in)) : std::nullopt;
    const std::optional<Emitted> emitted =
        opt->emit.empty() ? std::nullopt : std::optional<Emitted>(emit(*opt, in, s));
    if (opt->json) {
      Json results = Json::array();
      for (const auto& r : s.results)
        results.push_back(ranked_json(r));
      Json j{{"candidates_evaluated", s.candidates_evaluated},
             {"candidates_fitting_memory", s.fit_memory},
             {"candidates_simulated", s.simulated},
             {"exhaustive", s.exhaustive},
             {"interrupted", s.stopped},
             {"results", results}};
      if (s.results.empty())
        j["nothing_fits"] = nothing_fits(s, in);
      if (imported) {
        j["imported"] = ranked_json(imported->ranked);
        j["imported"]["origin"] = in.run_origin;
        j["imported"]["not_represented"] = imported->notes;
      }
      if (emitted) {
        Json em{{"framework", strategy::name(emitted->framework)},
                {"best_cannot_express", emitted->best_cannot},
                {"config", emitted->plan ? Json(emitted->text) : Json()}};
        if (emitted->plan)
          em["plan"] = ranked_json(*emitted->plan);
        j["emit"] = em;
      }
      print_json(j);
      return;
    }
    std::cout << fmt::format("{} on {} x {} ({} GPUs), seq {}: {} plans considered, {} fit the "
                             "analytic memory model, {} simulated{}{}\n\n",
                             in.model.name, in.nodes, in.cluster.name,
                             in.nodes * in.cluster.node.gpus_per_node, in.seq,
                             s.candidates_evaluated, s.fit_memory, s.simulated,
                             s.exhaustive ? " (the rest are provably slower)"
                             : s.stopped  ? ""
                                          : " (simulation budget reached)",
                             s.stopped ? "; interrupted: best so far" : "");
    if (s.results.empty()) {
      std::cout << nothing_fits(s, in) << "\n";
      return;
    }
    TextTable t{{"#", "plan", "batch", "step", "tokens/s/GPU", "MFU", "HBM", "host/node"},
                {},
                {true, false, true, true, true, true, true, true}};
    for (std::size_t i = 0; i < s.results.size(); ++i) {
      const auto& r = s.results[i];
      t.rows.push_back(
          {std::to_string(i + 1), fmt::format("{}: {}", r.plan.family, strategy::summary(r.plan)),
           std::to_string(r.plan.global_batch), format_seconds(r.eval.step_time_s),
           fmt::format("{:.1f}", r.tokens_per_s_per_gpu), fmt::format("{:.1f} %", 100 * r.mfu),
           format_bytes(r.peak_hbm_bytes), format_bytes(r.peak_host_bytes)});
    }
    std::cout << t.render();
    std::cout << "(batch: sequences per step; plans: docs/PLANS.md \"Reading a summary\")\n";
    if (s.results.size() > 1)
      std::cout << "\n" << planner::why_best(s.results[0], s.results[1]) << "\n";
    if (imported) {
      const planner::RankedPlan& r = imported->ranked;
      std::cout << fmt::format("\nyour configuration ({}): {}\n  {}\n", in.run_origin,
                               strategy::summary(r.plan), numbers(r));
      if (r.fits)
        std::cout << fmt::format(
            "  the best plan above is {:.1f} % faster per token\n",
            100 * (s.results[0].tokens_per_s_per_gpu / r.tokens_per_s_per_gpu - 1));
    }
    if (emitted) {
      const char* fw = emitted->framework == strategy::Framework::megatron     ? "Megatron-LM"
                       : emitted->framework == strategy::Framework::torchtitan ? "torchtitan"
                                                                               : "DeepSpeed";
      std::cout << "\n";
      if (!emitted->best_cannot.empty()) {
        std::cout << fmt::format("{} cannot run the best plan:\n", fw);
        for (const std::string& why : emitted->best_cannot)
          std::cout << fmt::format("  - {}\n", why);
        if (emitted->plan)
          std::cout << fmt::format(
              "the best plan it can run: {}: {}\n  {} ({:.1f} % slower per "
              "token)\n\n",
              emitted->plan->plan.family, strategy::summary(emitted->plan->plan),
              numbers(*emitted->plan),
              100 * (s.results[0].tokens_per_s_per_gpu / emitted->plan->tokens_per_s_per_gpu - 1));
        else
          std::cout << fmt::format("and no plan it can run fits.\n");
      }
      std::cout << emitted->text;
    }
  });
}

} // namespace mop::cli
