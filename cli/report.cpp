// mop report: one self-contained HTML page about a plan (no script, no network: inline SVG).
#include "cli/commands.hpp"
#include "cli/context.hpp"
#include "cli/output.hpp"
#include "cli/plan.hpp"
#include "common/error.hpp"
#include "common/file_io.hpp"
#include "common/units.hpp"
#include "hw_models/calibration.hpp"
#include "planner/evaluate.hpp"
#include "strategies/frameworks.hpp"

#include <algorithm>
#include <fmt/format.h>
#include <memory>
#include <sstream>

namespace mop::cli {
namespace {

struct ReportOptions : PlanOptions {
  std::string sweep = "4K,32K,128K,1M";
  std::string html; // -o: required
  int threads = 2;
};

std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
    case '&':
      out += "&amp;";
      break;
    case '<':
      out += "&lt;";
      break;
    case '>':
      out += "&gt;";
      break;
    case '"':
      out += "&quot;";
      break;
    default:
      out += c;
    }
  }
  return out;
}

// The colour of each part of the step and of each kind of memory (one palette for the page).
const char* colour_of(sim::Category c) {
  switch (c) {
  case sim::Category::forward:
    return "#4e79a7";
  case sim::Category::backward:
    return "#59a14f";
  case sim::Category::recompute:
    return "#8cd17d";
  case sim::Category::tp_comm:
    return "#f28e2b";
  case sim::Category::cp_comm:
    return "#e15759";
  case sim::Category::ep_comm:
    return "#b07aa1";
  case sim::Category::dp_comm:
    return "#ff9da7";
  case sim::Category::pp_comm:
    return "#9c755f";
  case sim::Category::offload:
    return "#76b7b2";
  case sim::Category::optimizer:
    return "#edc948";
  }
  return "#bab0ac";
}

// A horizontal stacked bar of labelled parts, as SVG, `width` pixels for `total`.
std::string stacked_bar(const std::vector<std::tuple<std::string, double, std::string>>& parts,
                        double total, double capacity, const std::string& unit_text) {
  const double width = 720, height = 22;
  std::string svg =
      fmt::format(R"(<svg width="{}" height="{}" role="img">)", width + 4, height + 4);
  const double scale = width / std::max({total, capacity, 1e-30});
  double x = 0;
  for (const auto& [label, value, colour] : parts) {
    if (value <= 0)
      continue;
    svg += fmt::format(R"(<rect x="{:.1f}" y="2" width="{:.1f}" height="{}" fill="{}"><title>{}: )"
                       R"({}</title></rect>)",
                       x, value * scale, height, colour, escape(label),
                       escape(unit_text.empty() ? format_bytes(value) : format_seconds(value)));
    x += value * scale;
  }
  if (capacity > 0)
    svg += fmt::format(R"(<line x1="{0:.1f}" x2="{0:.1f}" y1="0" y2="{1}" stroke="#000" )"
                       R"(stroke-width="2"/>)",
                       capacity * scale, height + 4);
  return svg + "</svg>";
}

std::string legend(const std::vector<std::pair<std::string, std::string>>& items) {
  std::string s = R"(<div class="legend">)";
  for (const auto& [label, colour] : items)
    s += fmt::format(R"(<span><i style="background:{}"></i>{}</span>)", colour, escape(label));
  return s + "</div>";
}

// The critical class's streams over the simulated run: per stream, per pixel column, the
// category that ran longest there (so that a long run of short ops stays visible).
std::string timeline(const planner::StepEvaluation& e) {
  const sim::Schedule& s = e.schedule;
  const sim::SimResult& r = e.result;
  if (s.classes.empty() || r.classes.empty())
    return "<p>No timeline.</p>";
  const std::size_t k =
      r.critical_path.empty() ? 0 : static_cast<std::size_t>(r.critical_path.back().rank_class);
  const sim::RankClass& rc = s.classes[k];
  const std::vector<sim::OpTiming>& t = r.classes[k].ops;
  double end = 0;
  for (const sim::OpTiming& o : t)
    end = std::max(end, o.end_s);
  if (end <= 0)
    return "<p>No timeline.</p>";
  constexpr int kColumns = 900;
  constexpr int kCategories = 10;
  const int streams = static_cast<int>(rc.streams.size());
  std::vector<double> busy(static_cast<std::size_t>(streams) * kColumns * kCategories, 0.0);
  for (std::size_t i = 0; i < rc.ops.size() && i < t.size(); ++i) {
    const double a = t[i].start_s / end * kColumns, b = t[i].end_s / end * kColumns;
    const int cat = static_cast<int>(rc.ops[i].category);
    for (int c = std::max(0, static_cast<int>(a)); c < kColumns && c < b; ++c) {
      const double overlap = std::min(b, c + 1.0) - std::max(a, static_cast<double>(c));
      busy[(static_cast<std::size_t>(rc.ops[i].stream) * kColumns + static_cast<std::size_t>(c)) *
               kCategories +
           static_cast<std::size_t>(cat)] += overlap;
    }
  }
  const int row = 16, label_width = 110;
  std::string svg = fmt::format(R"(<svg width="{}" height="{}" role="img">)",
                                label_width + kColumns + 4, streams * row + 20);
  for (int st = 0; st < streams; ++st) {
    svg += fmt::format(R"(<text x="0" y="{}" font-size="11">{}</text>)", st * row + 12,
                       escape(rc.streams[static_cast<std::size_t>(st)]));
    int run_start = 0, run_cat = -1;
    auto flush = [&](int until) {
      if (run_cat >= 0)
        svg += fmt::format(R"(<rect x="{}" y="{}" width="{}" height="{}" fill="{}"/>)",
                           label_width + run_start, st * row + 2, until - run_start, row - 4,
                           colour_of(static_cast<sim::Category>(run_cat)));
    };
    for (int c = 0; c < kColumns; ++c) {
      const double* cell =
          &busy[(static_cast<std::size_t>(st) * kColumns + static_cast<std::size_t>(c)) *
                kCategories];
      int best = -1;
      double most = 0.05; // a column less than 5 % busy stays empty
      for (int cat = 0; cat < kCategories; ++cat)
        if (cell[cat] > most) {
          most = cell[cat];
          best = cat;
        }
      if (best != run_cat) {
        flush(c);
        run_start = c;
        run_cat = best;
      }
    }
    flush(kColumns);
  }
  svg += fmt::format(R"(<text x="{}" y="{}" font-size="11">0</text>)", label_width,
                     streams * row + 16);
  svg += fmt::format(R"(<text x="{}" y="{}" font-size="11" text-anchor="end">{}</text>)",
                     label_width + kColumns, streams * row + 16, escape(format_seconds(end)));
  return svg + "</svg>";
}

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ','))
    if (!item.empty())
      out.push_back(item);
  return out;
}

} // namespace

void add_report_command(CLI::App& app) {
  auto opt = std::make_shared<ReportOptions>();
  CLI::App* cmd = app.add_subcommand(
      "report", "One self-contained HTML page about a plan: key figures, memory per rank class, "
                "where the time goes, the context sweep, a timeline strip, the launch block\n\n"
                "Example:\n  mop report --model kimi-k2 --cluster h200 --nodes 12 --seq 1M "
                "-o kimi.html");
  add_plan_options(cmd, *opt);
  cmd->add_option("--sweep", opt->sweep, "context lengths for the sweep (comma-separated), or none")
      ->capture_default_str();
  cmd->add_option("--threads", opt->threads, "threads for the sweep's searches")
      ->capture_default_str();
  cmd->callback([opt] {
    check_threads(opt->threads);
    const PlanInputs in = resolve_inputs(*opt);
    const strategy::PlanContext ctx = in.context();
    const strategy::ResolvedPlan plan = resolve_command_plan(*opt, in);
    const Json notes = report_not_represented(in);
    const hw::Calibration cal =
        opt->calibration.empty() ? hw::Calibration{} : hw::load_calibration(opt->calibration);
    const planner::StepEvaluation e =
        planner::evaluate_step(plan.plan, strategy::lowering_context(ctx), in.cluster, cal, 16);
    const double gpus = static_cast<double>(plan.plan.world);
    const double tokens_per_s = e.tokens_per_step / e.step_time_s / gpus;
    const double tflops = e.model_flops_per_step / e.step_time_s / gpus / 1e12;
    const double mfu = tflops * 1e12 / in.cluster.gpu.peak_flops_bf16;
    const strategy::MemoryReport& mem = plan.memory;

    std::string h;
    h += "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">";
    h += fmt::format("<title>mop report: {} on {} x {}</title>", escape(in.model.name), in.nodes,
                     escape(in.cluster.name));
    h += "<style>body{font:14px/1.4 sans-serif;margin:24px;max-width:1100px;color:#222}"
         "h1{font-size:22px}h2{font-size:17px;margin-top:28px}table{border-collapse:collapse}"
         "td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:right}"
         "td:first-child,th:first-child{text-align:left}.figures span{display:inline-block;"
         "margin-right:28px}.figures b{display:block;font-size:22px}.legend span{margin-right:"
         "14px;font-size:12px}.legend i{display:inline-block;width:10px;height:10px;"
         "margin-right:4px}pre{background:#f5f5f5;padding:10px;overflow-x:auto;font-size:12px}"
         "</style></head><body>";
    h += fmt::format("<h1>{} on {} nodes of {} ({} GPUs), {} tokens of context</h1>",
                     escape(in.model.display_name.empty() ? in.model.name : in.model.display_name),
                     in.nodes, escape(in.cluster.name), plan.plan.world, in.seq);
    h += fmt::format("<p>Plan ({}): <code>{}</code></p>", escape(plan.plan.family),
                     escape(strategy::summary(plan.plan)));
    for (const Json& n : notes)
      h += fmt::format("<p>Not modelled: {}.</p>", escape(n.get<std::string>()));
    h += "<div class=\"figures\">";
    auto figure = [&](const std::string& what, const std::string& value) {
      h += fmt::format("<span><b>{}</b>{}</span>", escape(value), escape(what));
    };
    figure("step time", format_seconds(e.step_time_s));
    figure("tokens/s per GPU", fmt::format("{:.1f}", tokens_per_s));
    figure("MFU", fmt::format("{:.1f} %", 100 * mfu));
    figure("peak HBM per GPU", format_bytes(mem.peak_hbm_bytes));
    figure("host memory per node", format_bytes(mem.peak_host_bytes));
    figure("fits", mem.fits() ? "yes" : "no");
    h += "</div>";
    if (!mem.fits())
      h += fmt::format("<p><b>Does not fit:</b> {}</p>", escape(mem.first_to_run_out));

    // Memory per rank class against HBM.
    h += fmt::format("<h2>Memory per rank class (HBM {} per GPU: the black line)</h2>",
                     escape(format_bytes(mem.hbm_capacity_bytes)));
    const std::vector<std::pair<std::string, std::string>> kinds = {
        {"weights", "#4e79a7"},     {"gradients", "#59a14f"}, {"optimizer", "#edc948"},
        {"activations", "#e15759"}, {"buffers", "#b07aa1"},   {"other", "#bab0ac"}};
    h += legend(kinds);
    h += "<table>";
    for (const strategy::RankClassMemory& c : mem.classes) {
      const strategy::MemoryBreakdown& b = c.hbm;
      const std::vector<std::tuple<std::string, double, std::string>> parts = {
          {"weights", b.weights, kinds[0].second},
          {"gradients", b.grads, kinds[1].second},
          {"optimizer", b.optimizer, kinds[2].second},
          {"activations", b.activations, kinds[3].second},
          {"buffers", b.comm_buffers, kinds[4].second},
          {"other", b.other, kinds[5].second}};
      h += fmt::format("<tr><td>{} ({} ranks)</td><td>{}</td><td>{}</td></tr>", escape(c.name),
                       c.ranks, escape(format_bytes(c.peak_hbm_bytes)),
                       stacked_bar(parts, c.peak_hbm_bytes, mem.hbm_capacity_bytes, ""));
    }
    h += "</table>";

    // Where the time goes.
    const sim::Breakdown& b = e.result.breakdown;
    h += "<h2>Where the time goes (the critical rank class's step)</h2>";
    std::vector<std::tuple<std::string, double, std::string>> parts = {
        {"compute", b.compute - b.recompute, colour_of(sim::Category::forward)},
        {"recompute", b.recompute, colour_of(sim::Category::recompute)}};
    std::vector<std::pair<std::string, std::string>> time_legend = {
        {"compute", colour_of(sim::Category::forward)},
        {"recompute", colour_of(sim::Category::recompute)}};
    for (int c = 0; c < 10; ++c)
      if (b.exposed_comm_by_category[c] > 0) {
        const auto cat = static_cast<sim::Category>(c);
        parts.emplace_back(fmt::format("exposed {}", sim::category_name(cat)),
                           b.exposed_comm_by_category[c], colour_of(cat));
        time_legend.emplace_back(fmt::format("exposed {}", sim::category_name(cat)),
                                 colour_of(cat));
      }
    parts.emplace_back("pipeline bubble", b.bubble, "#d3d3d3");
    parts.emplace_back("offload stall", b.offload_stall, colour_of(sim::Category::offload));
    parts.emplace_back("optimizer", b.optimizer, colour_of(sim::Category::optimizer));
    time_legend.emplace_back("pipeline bubble", "#d3d3d3");
    time_legend.emplace_back("offload stall", colour_of(sim::Category::offload));
    time_legend.emplace_back("optimizer", colour_of(sim::Category::optimizer));
    h += legend(time_legend);
    h += stacked_bar(parts, e.step_time_s, 0, "s");
    h += "<table><tr><th>part</th><th>time</th><th>share</th></tr>";
    for (const auto& [label, value, colour] : parts)
      if (value > 0)
        h += fmt::format("<tr><td>{}</td><td>{}</td><td>{:.1f} %</td></tr>", escape(label),
                         escape(format_seconds(value)), 100 * value / e.step_time_s);
    h += "</table>";

    // Timeline.
    h += fmt::format("<h2>Timeline of the critical rank class ({} of {} micro-batches "
                     "simulated{})</h2>",
                     e.micro_batches_simulated, e.micro_batches,
                     e.micro_batches_simulated < e.micro_batches
                         ? ", the rest extrapolated from the steady state"
                         : "");
    std::vector<std::pair<std::string, std::string>> cats;
    for (int c = 0; c < 10; ++c)
      cats.emplace_back(sim::category_name(static_cast<sim::Category>(c)),
                        colour_of(static_cast<sim::Category>(c)));
    h += legend(cats);
    h += timeline(e);

    // The context sweep.
    const std::vector<std::string> seqs =
        opt->sweep == "none" ? std::vector<std::string>{} : split_list(opt->sweep);
    if (!seqs.empty()) {
      h += "<h2>Across context lengths: the best plan of each family</h2><table><tr><th>"
           "context</th>";
      const std::vector<std::string>& families = strategy::family_names();
      for (const std::string& f : families)
        h += fmt::format("<th>{} tokens/s/GPU</th>", escape(f));
      h += "</tr>";
      for (const std::string& seq : seqs) {
        PlanOptions one = *opt;
        one.seq = seq;
        one.from.clear();
        one.model = opt->model.empty() ? std::string() : opt->model;
        if (one.model.empty())
          continue; // a model from --from arguments is not a catalog id to reload
        const PlanInputs at = resolve_inputs(one);
        h += fmt::format("<tr><td>{}</td>", escape(seq));
        for (const std::string& f : families) {
          const planner::SearchResult s = run_search(at, f, 1, opt->threads, false);
          h += s.results.empty() ? std::string("<td>does not fit</td>")
                                 : fmt::format("<td title=\"{}\">{:.1f}</td>",
                                               escape(strategy::summary(s.results[0].plan)),
                                               s.results[0].tokens_per_s_per_gpu);
        }
        h += "</tr>";
      }
      h += "</table>";
    }

    // The launch block.
    h += "<h2>Launch</h2>";
    const std::string& family = plan.plan.family;
    std::optional<strategy::Framework> fw;
    if (family == "megatron")
      fw = strategy::Framework::megatron;
    else if (family == "fsdp2")
      fw = strategy::Framework::torchtitan;
    else if (family == "ulysses-zero3")
      fw = strategy::Framework::deepspeed;
    if (fw) {
      const strategy::FrameworkConfig c = strategy::write_framework_config(
          *fw, plan.plan, in.model, in.seq, in.cluster.node.gpus_per_node, in.precision,
          in.run && in.run->framework == *fw ? &in.run->text : nullptr);
      if (c.cannot_express.empty())
        h += fmt::format("<pre>{}</pre>", escape(c.text));
      else
        for (const std::string& why : c.cannot_express)
          h += fmt::format("<p>{} cannot run it: {}.</p>", strategy::name(*fw), escape(why));
    }
    h += fmt::format("<p>The plan as mop reads it back (<code>--plan FILE</code>):</p><pre>{}"
                     "</pre>",
                     escape(strategy::to_json(plan.plan).dump(2)));
    h += "<p>Predicted by mop: the plan's schedule played on the hardware model of the "
         "cluster; memory from the analytic model.</p></body></html>\n";
    std::fwrite(h.data(), 1, h.size(), stdout);
  });
}

} // namespace mop::cli
