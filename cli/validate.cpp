// mop validate: predicted against published measurements, row by row, with the error.
#include "cli/commands.hpp"
#include "cli/output.hpp"
#include "common/error.hpp"
#include "sim/engine.hpp"
#include "validation/compare.hpp"

#include <algorithm>
#include <cmath>
#include <fmt/format.h>
#include <iostream>
#include <map>
#include <memory>
#include <regex>

namespace mop::cli {
namespace {

Json number_or_null(double v) {
  return std::isnan(v) ? Json(nullptr) : Json(v);
}

std::string pct(double v) {
  return std::isnan(v) ? "-" : fmt::format("{:.1f} %", 100 * v);
}

// Where one row's predicted step goes: its plan, the critical path's breakdown, and the busiest
// op types of the rank class that ends last (busy time per micro-batch simulated, layer and
// micro-batch numbers folded: "attn.q_proj.fwd" sums every layer's).
void explain_row(const validation::Row& row, planner::Lowering lowering,
                 const hw::Calibration& calibration) {
  const validation::Translation t = validation::translate(row);
  std::cout << fmt::format("{}: {}\n", row.id, row.model_name);
  if (!t.plan) {
    std::cout << "  not predicted: " << t.reason << "\n\n";
    return;
  }
  const planner::StepEvaluation e = validation::evaluate_row(row, t, lowering, calibration);
  const sim::Breakdown& b = e.result.breakdown;
  std::cout << fmt::format("  plan {} on {} x {}\n", strategy::summary(*t.plan), t.nodes,
                           t.cluster_id);
  std::cout << fmt::format("  step {:.4g} s: compute {:.4g} (recompute {:.4g}), exposed "
                           "communication {:.4g}, bubble {:.4g}, offload stall {:.4g}, optimizer "
                           "{:.4g}\n",
                           e.step_time_s, b.compute, b.recompute, b.exposed_comm, b.bubble,
                           b.offload_stall, b.optimizer);
  if (e.result.classes.empty())
    return;
  std::size_t last = 0;
  for (std::size_t c = 1; c < e.result.classes.size(); ++c)
    if (e.result.classes[c].end_s > e.result.classes[last].end_s)
      last = c;
  const sim::RankClass& rc = e.schedule.classes[last];
  const std::vector<sim::OpTiming>& timing = e.result.classes[last].ops;
  static const std::regex numbered(R"((^|\.)(L|mb|s|v|stage|chunk)?[0-9]+(?=\.|$))");
  std::map<std::string, std::pair<double, int>> by_type;
  double busy = 0;
  for (std::size_t i = 0; i < rc.ops.size() && i < timing.size(); ++i) {
    const double d = timing[i].end_s - timing[i].start_s;
    if (d <= 0)
      continue;
    std::string type = std::regex_replace(rc.ops[i].name, numbered, "$1#");
    auto& [sum, count] = by_type[fmt::format("{:<10} {}", sim::category_name(rc.ops[i].category),
                                             type)];
    sum += d;
    ++count;
    busy += d;
  }
  std::vector<std::pair<std::string, std::pair<double, int>>> sorted(by_type.begin(),
                                                                      by_type.end());
  std::sort(sorted.begin(), sorted.end(),
            [](const auto& x, const auto& y) { return x.second.first > y.second.first; });
  const double per_mb = 1.0 / std::max(1, e.micro_batches_simulated);
  double launches = 0;
  for (const sim::Op& op : rc.ops)
    if (sim::launches_kernels(op))
      launches += op.kernels;
  std::cout << fmt::format("  host: {:.0f} kernels per micro-batch, {:.3f} ms to issue at {:.1f} us "
                           "each\n",
                           launches * per_mb, 1e3 * launches * per_mb * e.schedule.host_issue_s,
                           1e6 * e.schedule.host_issue_s);
  TextTable ops{{"op (rank class " + std::to_string(last) + ")", "ops", "ms per micro-batch",
                 "share"},
                {},
                {false, true, true, true}};
  for (std::size_t i = 0; i < sorted.size() && i < 25; ++i)
    ops.rows.push_back({sorted[i].first, std::to_string(sorted[i].second.second),
                        fmt::format("{:.3f}", 1e3 * sorted[i].second.first * per_mb),
                        fmt::format("{:.1f} %", 100 * sorted[i].second.first / busy)});
  std::cout << ops.render() << "\n";
}

} // namespace

void add_validate_command(CLI::App& app) {
  struct Options {
    std::vector<std::string> datasets;
    bool json = false;
    std::string lowering = "cost";
    std::string calibration;
    std::vector<std::string> only;
  };
  auto opt = std::make_shared<Options>();
  CLI::App* cmd = app.add_subcommand(
      "validate", "Predictions against published measurements: every row, its error, MAPE\n\n"
                  "Example:\n  mop validate\n  mop validate --dataset my-runs.jsonl --json");
  cmd->add_option("--dataset", opt->datasets,
                  "JSON Lines files of the schema in validation/data/README.md (default: the "
                  "project's own dataset)");
  add_output_options(cmd, opt->json);
  cmd->add_option(
         "--lowering", opt->lowering,
         "which lowering writes the simulated schedules: cost (the cost-only lowering) "
         "or program (the executable program, where it builds the plan; docs/SIMULATOR.md)")
      ->check(CLI::IsMember({"cost", "program"}))
      ->capture_default_str();
  cmd->add_option("--calibration", opt->calibration, "calibration JSON from mop calibrate");
  cmd->add_option("--row", opt->only,
                  "validate only the rows of this id (repeatable), and show where each one's "
                  "predicted step goes: its plan, breakdown and busiest op types");
  cmd->callback([opt] {
    std::vector<validation::Row> rows;
    const std::vector<std::string> files =
        opt->datasets.empty() ? std::vector<std::string>{validation::default_dataset_path()}
                              : opt->datasets;
    for (const std::string& f : files) {
      std::vector<validation::Row> r = validation::read_dataset(f);
      rows.insert(rows.end(), r.begin(), r.end());
    }
    if (!opt->only.empty()) {
      for (const std::string& id : opt->only)
        if (std::none_of(rows.begin(), rows.end(),
                         [&](const validation::Row& r) { return r.id == id; }))
          throw mop::InputError(fmt::format("no row of the dataset has the id '{}'.", id));
      std::erase_if(rows, [&](const validation::Row& r) {
        return std::find(opt->only.begin(), opt->only.end(), r.id) == opt->only.end();
      });
    }
    const hw::Calibration calibration =
        opt->calibration.empty() ? hw::Calibration{} : hw::load_calibration(opt->calibration);
    const validation::Report rep = validation::validate(
        rows,
        opt->lowering == "program" ? planner::Lowering::program : planner::Lowering::cost_only,
        calibration);
    if (opt->json) {
      Json points = Json::array();
      for (const auto& p : rep.points) {
        Json j{{"id", p.id},
               {"metric", p.metric},
               {"measured", p.measured},
               {"predicted", p.predicted ? Json(*p.predicted) : Json(nullptr)},
               {"rel_error", p.predicted ? Json(p.rel_error) : Json(nullptr)},
               {"moe", p.moe}};
        if (!p.predicted)
          j["reason"] = p.reason;
        points.push_back(std::move(j));
      }
      Json scores = Json::array();
      for (const auto& s : rep.scores) {
        Json j{{"id", s.id},
               {"derived_from", s.derived_from.empty() ? Json(nullptr) : Json(s.derived_from)},
               {"measured", s.measured ? Json(*s.measured) : Json(nullptr)},
               {"predicted", s.predicted ? Json(*s.predicted) : Json(nullptr)},
               {"rel_error", s.predicted ? Json(s.rel_error) : Json(nullptr)},
               {"moe", s.row.moe},
               {"framework", s.row.framework},
               {"gpu", s.row.gpu},
               {"seq_len", s.row.seq}};
        if (!s.predicted)
          j["reason"] = s.reason;
        scores.push_back(std::move(j));
      }
      Json groups = Json::object();
      for (const auto& g : rep.groups)
        groups[g.key] = Json{{"points", g.points}, {"mape", number_or_null(g.mape)}};
      print_json(Json{{"points", points},
                      {"scores", scores},
                      {"groups", groups},
                      {"mape_time", number_or_null(rep.mape_time)},
                      {"mape_memory", number_or_null(rep.mape_memory)},
                      {"mape_time_dense", number_or_null(rep.mape_time_dense)},
                      {"mape_time_moe", number_or_null(rep.mape_time_moe)},
                      {"mape_memory_dense", number_or_null(rep.mape_memory_dense)},
                      {"mape_memory_moe", number_or_null(rep.mape_memory_moe)},
                      {"rows", rep.rows},
                      {"rows_predicted", rep.rows_predicted},
                      {"rows_predicted_by_program", rep.rows_predicted_by_program}});
      return;
    }
    // Time, scored in tokens/s per GPU (one line per row), then peak memory.
    TextTable t{{"row", "tokens/s per GPU from", "measured", "predicted", "error"},
                {},
                {false, false, true, true, true}};
    for (const auto& s : rep.scores)
      t.rows.push_back({s.id, s.derived_from.empty() ? "-" : s.derived_from,
                        s.measured ? fmt::format("{:.4g}", *s.measured) : "-",
                        s.predicted ? fmt::format("{:.4g}", *s.predicted) : "-",
                        s.predicted ? fmt::format("{:+.1f} %", 100 * s.rel_error) : s.reason});
    std::cout << t.render() << "\n";
    if (!opt->only.empty())
      for (const validation::Row& row : rows)
        explain_row(row,
                    opt->lowering == "program" ? planner::Lowering::program
                                               : planner::Lowering::cost_only,
                    calibration);
    TextTable m{{"row", "peak memory GiB", "predicted", "error"}, {}, {false, true, true, true}};
    for (const auto& p : rep.points)
      if (!p.time_like)
        m.rows.push_back({p.id, fmt::format("{:.4g}", p.measured),
                          p.predicted ? fmt::format("{:.4g}", *p.predicted) : "-",
                          p.predicted ? fmt::format("{:+.1f} %", 100 * p.rel_error) : p.reason});
    std::cout << m.render() << "\n";
    TextTable g{{"group", "points", "MAPE"}, {}, {false, true, true}};
    for (const auto& x : rep.groups)
      g.rows.push_back({x.key, std::to_string(x.points), pct(x.mape)});
    std::cout << g.render() << "\n";
    std::cout << fmt::format("{} rows, {} predicted. MAPE: time (tokens/s per GPU) {} (dense {}, "
                             "MoE {}); peak memory {} (dense {}, MoE {})\n",
                             rep.rows, rep.rows_predicted, pct(rep.mape_time),
                             pct(rep.mape_time_dense), pct(rep.mape_time_moe), pct(rep.mape_memory),
                             pct(rep.mape_memory_dense), pct(rep.mape_memory_moe));
  });
}

} // namespace mop::cli
