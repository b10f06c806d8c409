// mop fit: the fewest nodes on which a family trains the model at this context length.
#include "cli/commands.hpp"
#include "cli/output.hpp"
#include "cli/plan.hpp"
#include "common/error.hpp"
#include "common/limits.hpp"
#include "common/units.hpp"

#include <fmt/format.h>
#include <iostream>
#include <memory>
#include <unistd.h>

namespace mop::cli {
namespace {

struct FitOptions : PlanOptions {
  std::string family = "all";
  int max_nodes = 1024;
  int threads = 2;
};

// Node counts tried in order: every count up to 16, then the common cluster sizes.
std::vector<int> node_counts(int max_nodes) {
  std::vector<int> v;
  for (int n = 1; n <= 16; ++n)
    v.push_back(n);
  for (int n : {20, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048})
    v.push_back(n);
  std::erase_if(v, [&](int n) { return n > max_nodes; });
  return v;
}

} // namespace

void add_fit_command(CLI::App& app) {
  auto opt = std::make_shared<FitOptions>();
  CLI::App* cmd =
      app.add_subcommand("fit", "The fewest nodes on which a plan fits\n\nExample:\n"
                                "  mop fit --model kimi-k2 --cluster h200 --seq 1M --family mop");
  add_plan_options(cmd, *opt, false);
  cmd->add_option("--family", opt->family, "fsdp2, megatron, ulysses-zero3, mop or all")
      ->capture_default_str();
  cmd->add_option("--max-nodes", opt->max_nodes, "give up beyond this many nodes")
      ->capture_default_str();
  cmd->add_option("--threads", opt->threads, "threads for the search")->capture_default_str();
  cmd->callback([opt] {
    if (opt->max_nodes <= 0)
      throw InputError("--max-nodes must be positive.");
    check_threads(opt->threads);
    PlanOptions first = *opt;
    first.nodes = 1;
    PlanInputs in = resolve_inputs(first);
    // Node counts past the GPU ceiling are not tried: "does not fit up to there" is the answer.
    const std::int64_t most = limits::max_gpus / in.cluster.node.gpus_per_node;
    for (int nodes : node_counts(opt->max_nodes)) {
      if (nodes > most)
        break;
      in.nodes = nodes;
      const planner::SearchResult s =
          run_search(in, opt->family, 1, opt->threads, ::isatty(2) != 0);
      if (s.results.empty())
        continue;
      const auto& r = s.results[0];
      if (opt->json) {
        Json j = ranked_json(r);
        j["nodes"] = nodes;
        j["gpus"] = nodes * in.cluster.node.gpus_per_node;
        print_json(j);
      } else {
        std::cout << fmt::format("{} nodes of {} ({} GPUs): {}: {}\n  {:.1f} tokens/s/GPU, MFU "
                                 "{:.1f} %, peak HBM {}, host {} per node\n",
                                 nodes, in.cluster.name, nodes * in.cluster.node.gpus_per_node,
                                 r.plan.family, strategy::summary(r.plan), r.tokens_per_s_per_gpu,
                                 100 * r.mfu, format_bytes(r.peak_hbm_bytes),
                                 format_bytes(r.peak_host_bytes));
      }
      return;
    }
    // Not fitting is a result (CLI.md): exit 0, nodes null.
    const std::string why =
        fmt::format("no {}plan fits {} at {} tokens on up to {} nodes of {}.",
                    opt->family == "all" ? "" : opt->family + " ", opt->model, opt->seq,
                    std::min<std::int64_t>(opt->max_nodes, most), opt->cluster);
    if (opt->json)
      print_json(Json{{"nodes", nullptr}, {"plan", nullptr}, {"fits", false}, {"why", why}});
    else
      std::cout << why << "\n";
  });
}

} // namespace mop::cli
