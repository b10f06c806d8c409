// mop sweep: the best plan of each family at each sequence length.
#include "cli/commands.hpp"
#include "cli/output.hpp"
#include "cli/plan.hpp"
#include "common/error.hpp"
#include "common/units.hpp"

#include <fmt/format.h>
#include <iostream>
#include <memory>
#include <sstream>
#include <unistd.h>

namespace mop::cli {
namespace {

std::vector<std::string> split(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty())
      out.push_back(item);
  return out;
}

struct SweepOptions : PlanOptions {
  std::string family = "fsdp2,mop";
  bool csv = false;
  int threads = 2;
};

} // namespace

void add_sweep_command(CLI::App& app) {
  auto opt = std::make_shared<SweepOptions>();
  CLI::App* cmd = app.add_subcommand(
      "sweep", "The best plan of each family at each sequence length\n\nExample:\n"
               "  mop sweep --model kimi-k2 --cluster h200 --nodes 12 --seq 4K,64K,128K,1M "
               "--family fsdp2,mop");
  add_plan_options(cmd, *opt, false);
  cmd->add_option("--family", opt->family,
                  "comma-separated families (fsdp2, megatron, "
                  "ulysses-zero3, mop)")
      ->capture_default_str();
  cmd->add_flag("--csv", opt->csv, std::string("print CSV (= --format csv)"))
      ->excludes("--format")
      ->excludes("--json");
  cmd->add_option("--threads", opt->threads, "threads for the search")->capture_default_str();
  cmd->callback([opt] {
    if (opt->csv)
      use_csv();
    const std::vector<std::string> seqs = split(opt->seq);
    const std::vector<std::string> families = split(opt->family);
    if (seqs.empty() || families.empty())
      throw InputError("--seq and --family need at least one value each.");
    check_threads(opt->threads);
    Json rows = Json::array();
    TextTable t{{"seq", "family", "fits", "tokens/s/GPU", "MFU", "peak HBM", "plan"},
                {},
                {true, false, false, true, true, true, false}};
    for (const std::string& seq : seqs) {
      PlanOptions one = *opt;
      one.seq = seq;
      const PlanInputs in = resolve_inputs(one);
      for (const std::string& family : families) {
        const planner::SearchResult s = run_search(in, family, 1, opt->threads, ::isatty(2) != 0);
        Json row{{"seq", in.seq}, {"family", family}, {"fits", !s.results.empty()}};
        if (!s.results.empty()) {
          const auto& r = s.results[0];
          row["tokens_per_s_per_gpu"] = r.tokens_per_s_per_gpu;
          row["mfu"] = r.mfu;
          row["step_time_s"] = r.eval.step_time_s;
          row["peak_hbm_bytes"] = r.peak_hbm_bytes;
          row["peak_host_bytes"] = r.peak_host_bytes;
          row["plan"] = strategy::to_json(r.plan);
          row["summary"] = strategy::summary(r.plan);
          t.rows.push_back({std::to_string(in.seq), family, "yes",
                            fmt::format("{:.1f}", r.tokens_per_s_per_gpu),
                            fmt::format("{:.1f} %", 100 * r.mfu), format_bytes(r.peak_hbm_bytes),
                            strategy::summary(r.plan)});
        } else {
          row["tokens_per_s_per_gpu"] = 0;
          row["peak_hbm_bytes"] = s.closest ? s.closest_memory.peak_hbm_bytes : 0.0;
          const std::string why = s.closest                  ? s.closest_memory.first_to_run_out
                                  : s.no_plan_reason.empty() ? std::string("no valid plan")
                                                             : "no valid plan: " + s.no_plan_reason;
          row["why"] = why;
          t.rows.push_back({std::to_string(in.seq), family, "no", "-", "-",
                            s.closest ? format_bytes(s.closest_memory.peak_hbm_bytes) : "-", why});
        }
        rows.push_back(std::move(row));
      }
    }
    if (opt->json || opt->csv) {
      print_json(Json{{"rows", rows}});
    } else {
      std::cout << t.render();
    }
  });
}

} // namespace mop::cli
