// mop validate: predicted against published measurements, row by row, with the error.
#include "cli/commands.hpp"
#include "cli/output.hpp"
#include "validation/compare.hpp"

#include <cmath>
#include <fmt/format.h>
#include <iostream>
#include <memory>

namespace mop::cli {
namespace {

Json number_or_null(double v) {
  return std::isnan(v) ? Json(nullptr) : Json(v);
}

std::string pct(double v) {
  return std::isnan(v) ? "-" : fmt::format("{:.1f} %", 100 * v);
}

} // namespace

void add_validate_command(CLI::App& app) {
  struct Options {
    std::vector<std::string> datasets;
    bool json = false;
    std::string lowering = "cost";
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
  cmd->callback([opt] {
    std::vector<validation::Row> rows;
    const std::vector<std::string> files =
        opt->datasets.empty() ? std::vector<std::string>{validation::default_dataset_path()}
                              : opt->datasets;
    for (const std::string& f : files) {
      std::vector<validation::Row> r = validation::read_dataset(f);
      rows.insert(rows.end(), r.begin(), r.end());
    }
    const validation::Report rep =
        validation::validate(rows, opt->lowering == "program" ? planner::Lowering::program
                                                              : planner::Lowering::cost_only);
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
      print_json(Json{{"points", points},
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
    TextTable t{
        {"row", "metric", "measured", "predicted", "error"}, {}, {false, false, true, true, true}};
    for (const auto& p : rep.points)
      t.rows.push_back({p.id, p.metric, fmt::format("{:.4g}", p.measured),
                        p.predicted ? fmt::format("{:.4g}", *p.predicted) : "-",
                        p.predicted ? fmt::format("{:+.1f} %", 100 * p.rel_error) : p.reason});
    std::cout << t.render() << "\n";
    std::cout << fmt::format("{} rows, {} predicted. MAPE: time-like {} (dense {}, MoE {}); peak "
                             "memory {} (dense {}, MoE {})\n",
                             rep.rows, rep.rows_predicted, pct(rep.mape_time),
                             pct(rep.mape_time_dense), pct(rep.mape_time_moe), pct(rep.mape_memory),
                             pct(rep.mape_memory_dense), pct(rep.mape_memory_moe));
  });
}

} // namespace mop::cli
