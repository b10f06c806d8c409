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
#include <optional>
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
    // --nodes, when given, is an upper bound on the node count.
    const bool nodes_given = opt->nodes_option != nullptr && opt->nodes_option->count() > 0;
    const int max_nodes = nodes_given ? std::min(opt->max_nodes, opt->nodes) : opt->max_nodes;
    PlanOptions first = *opt;
    first.nodes = 1;
    PlanInputs in = resolve_inputs(first);
    // Node counts past the GPU ceiling are not tried: "does not fit up to there" is the answer.
    const std::int64_t most = limits::max_gpus / in.cluster.node.gpus_per_node;
    std::optional<std::pair<int, planner::RankedPlan>> fewest, cheapest;
    for (int nodes : node_counts(max_nodes)) {
      if (nodes > most)
        break;
      // Past the fewest, the cheapest per token is looked for up to 4x the fewest (or --nodes).
      if (fewest && !nodes_given && nodes > 4 * fewest->first)
        break;
      in.nodes = nodes;
      const planner::SearchResult s =
          run_search(in, opt->family, 1, opt->threads, ::isatty(2) != 0);
      if (s.results.empty())
        continue;
      if (!fewest)
        fewest.emplace(nodes, s.results[0]);
      if (!cheapest || s.results[0].tokens_per_s_per_gpu > cheapest->second.tokens_per_s_per_gpu)
        cheapest.emplace(nodes, s.results[0]);
    }
    if (fewest) {
      const int per_node = in.cluster.node.gpus_per_node;
      if (opt->json) {
        Json j = ranked_json(fewest->second);
        j["nodes"] = fewest->first;
        j["gpus"] = fewest->first * per_node;
        Json c = ranked_json(cheapest->second);
        c["nodes"] = cheapest->first;
        c["gpus"] = cheapest->first * per_node;
        j["cheapest_per_token"] = c;
        print_json(j);
      } else {
        auto line = [&](const std::pair<int, planner::RankedPlan>& f) {
          const planner::RankedPlan& r = f.second;
          return fmt::format("{} nodes of {} ({} GPUs): {}: {}\n  {:.1f} tokens/s/GPU, MFU "
                             "{:.1f} %, peak HBM {}, host {} per node\n",
                             f.first, in.cluster.name, f.first * per_node, r.plan.family,
                             strategy::summary(r.plan), r.tokens_per_s_per_gpu, 100 * r.mfu,
                             format_bytes(r.peak_hbm_bytes), format_bytes(r.peak_host_bytes));
        };
        std::cout << "fewest nodes: " << line(*fewest);
        std::cout << fmt::format("cheapest per token (most tokens/s per GPU, up to {} nodes): {}",
                                 nodes_given ? max_nodes : 4 * fewest->first, line(*cheapest));
      }
      return;
    }
    // Not fitting is a result (CLI.md): exit 0, nodes null.
    const std::string why =
        fmt::format("no {}plan fits {} at {} tokens on up to {} nodes of {}.",
                    opt->family == "all" ? "" : opt->family + " ", opt->model, opt->seq,
                    std::min<std::int64_t>(max_nodes, most), opt->cluster);
    if (opt->json)
      print_json(Json{{"nodes", nullptr}, {"plan", nullptr}, {"fits", false}, {"why", why}});
    else
      std::cout << why << "\n";
  });
}

} // namespace mop::cli
