// mop hw list | show | collective: the hardware specs and the collective cost model.
#include "cli/commands.hpp"
#include "cli/output.hpp"
#include "common/error.hpp"
#include "common/limits.hpp"
#include "common/units.hpp"
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "hw_models/collective.hpp"

#include <cmath>
#include <fmt/format.h>
#include <iostream>
#include <memory>

namespace mop::cli {
namespace {

std::string format_bandwidth(double bytes_per_s) {
  if (bytes_per_s >= 1e12)
    return fmt::format("{:.2f} TB/s", bytes_per_s / 1e12);
  return fmt::format("{:.1f} GB/s", bytes_per_s / 1e9);
}

// A figure as a reader wants it, chosen by the unit its name carries.
std::string format_figure(const std::string& key, const Json& v) {
  if (v.is_boolean())
    return v.get<bool>() ? "yes" : "no";
  if (v.is_string())
    return v.get<std::string>();
  if (!v.is_number())
    return v.dump();
  const double x = v.get<double>();
  if (key.ends_with("_bytes") || key.ends_with("_bytes_per_communicator"))
    return fmt::format("{} ({:.4g} GB)", format_bytes(x), x / 1e9);
  if (key.find("bandwidth") != std::string::npos || key.ends_with("line_rate"))
    return format_bandwidth(x);
  if (key.starts_with("peak_flops"))
    return fmt::format("{:.0f} TFLOPS", x / 1e12);
  if (key.ends_with("params_per_s"))
    return fmt::format("{:.3g} params/s", x);
  if (key.ends_with("_s"))
    return fmt::format("{:g} us", x * 1e6);
  return fmt::format("{:g}", x);
}

void run_hw_list(bool json) {
  Json out = Json::array();
  TextTable table{{"id", "GPU", "GPUs/node", "HBM", "HBM BW", "BF16 dense", "NVLink/dir", "NICs"},
                  {},
                  {false, false, true, true, true, true, true, false}};
  for (const std::string& id : hw::cluster_ids()) {
    const hw::ClusterSpec c = hw::load_cluster(id);
    table.rows.push_back(
        {id, c.gpu.name, std::to_string(c.node.gpus_per_node), format_bytes(c.gpu.hbm_bytes),
         format_bandwidth(c.gpu.hbm_bandwidth),
         fmt::format("{:.0f} TFLOPS", c.gpu.peak_flops_bf16 / 1e12),
         format_bandwidth(c.node.nvlink_bandwidth),
         fmt::format("{} × {:.0f} Gb/s", c.node.nics, c.node.nic_line_rate * 8 / 1e9)});
    out.push_back(Json{{"id", id},
                       {"description", c.description},
                       {"gpu", Json{{"name", c.gpu.name},
                                    {"hbm_bytes", c.gpu.hbm_bytes},
                                    {"hbm_bandwidth", c.gpu.hbm_bandwidth},
                                    {"peak_flops_bf16", c.gpu.peak_flops_bf16}}},
                       {"node", Json{{"gpus_per_node", c.node.gpus_per_node},
                                     {"host_memory_bytes", c.node.host_memory_bytes}}}});
  }
  if (json)
    print_json(Json{{"clusters", out}});
  else
    std::cout << table.render();
}

void run_show(const std::string& name, bool json) {
  const hw::ClusterSpec c = hw::load_cluster(name);
  const Json j = hw::cluster_to_json(c);
  if (json) {
    print_json(j);
    return;
  }
  std::cout << fmt::format("{}: {}\n\n", c.name, c.description);
  // The tag says what kind of number it is (hardware.md §0); the full sources follow the table.
  auto tag_of = [&](const std::string& field) {
    const std::string source = hw::source_of(c, field);
    return source.substr(0, source.find(':'));
  };
  TextTable t{{"figure", "value", "tag"}, {}, {false, true, false}};
  std::vector<std::string> cited;
  // An attention curve list: one row per head dimension.
  auto curve_rows = [&](const std::string& label, const Json& curves, const std::string& field) {
    for (const Json& curve : curves)
      t.rows.push_back({fmt::format("{} (d={})", label, curve["head_dim"].get<double>()),
                        fmt::format("eta_max {:.3f}, half at {:.0f} keys",
                                    curve["efficiency_max"].get<double>(),
                                    curve["half_efficiency_kv_len"].get<double>()),
                        tag_of(field)});
  };
  for (const char* section : {"gpu", "node", "fabric", "host_optimizer", "overheads"}) {
    for (const auto& [key, value] : j[section].items()) {
      const std::string field = fmt::format("{}.{}", section, key);
      if (!hw::source_of(c, field).empty())
        cited.push_back(field);
      if (value.is_array()) {
        curve_rows(field, value, field);
        continue;
      }
      if (value.is_object()) { // the curves of each named attention kernel
        for (const auto& [kernel, curves] : value.items())
          for (const auto& [pass, list] : curves.items())
            if (list.is_array())
              curve_rows(fmt::format("{}.{}.{}", field, kernel, pass), list, field);
        continue;
      }
      t.rows.push_back({field, format_figure(key, value), tag_of(field)});
    }
  }
  std::cout << t.render();
  if (!cited.empty()) {
    std::cout << "\nsources:\n";
    for (const std::string& field : cited)
      std::cout << fmt::format("  {}: {}\n", field, hw::source_of(c, field));
  }
}

struct CollectiveOptions {
  std::string cluster;
  std::string op;
  std::string bytes;
  std::string min_bytes;
  int ranks = 0;
  int ranks_per_node = 0;
  std::string algorithm = "any";
  std::string calibration;
  bool json = false;
};

Json cost_json(const hw::CollectiveCost& cost, double bytes) {
  return Json{{"bytes", bytes},
              {"time_s", cost.time_s},
              {"algbw", cost.algbw},
              {"busbw", cost.busbw},
              {"algorithm", cost.algorithm},
              {"protocol", cost.protocol},
              {"latency_s", cost.latency_s}};
}

std::string algorithm_label(const hw::CollectiveCost& cost) {
  return cost.protocol.empty() ? cost.algorithm : cost.algorithm + "/" + cost.protocol;
}

void run_collective(const CollectiveOptions& o) {
  const hw::ClusterSpec c = hw::load_cluster(o.cluster);
  const hw::CollectiveOp op = hw::parse_collective_op(o.op);
  const hw::CollectiveAlgorithm algorithm = hw::parse_collective_algorithm(o.algorithm);
  const double bytes = static_cast<double>(parse_count(o.bytes, "--bytes"));
  if (o.ranks > limits::max_gpus)
    throw InputError(
        fmt::format("--ranks {} is above mop's ceiling of {} GPUs.", o.ranks, limits::max_gpus));
  const hw::GroupShape group = hw::group_of(c, o.ranks, o.ranks_per_node);
  const hw::Calibration calibration =
      o.calibration.empty() ? hw::Calibration{} : hw::load_calibration(o.calibration);
  std::vector<double> sizes;
  if (!o.min_bytes.empty()) {
    const double min_bytes = static_cast<double>(parse_count(o.min_bytes, "--min-bytes"));
    if (min_bytes > bytes)
      throw InputError(fmt::format("--min-bytes {} is larger than --bytes {}; a sweep runs from "
                                   "--min-bytes up to --bytes, doubling.",
                                   o.min_bytes, o.bytes));
    // Doubling from min_bytes: at most 64 steps between two 64-bit sizes.
    for (int i = 0; i < 64 && std::ldexp(min_bytes, i) < bytes; ++i)
      sizes.push_back(std::ldexp(min_bytes, i));
  }
  sizes.push_back(bytes);
  const hw::CollectiveCost main = hw::collective_cost(c, calibration, op, bytes, group, algorithm);
  const std::vector<hw::CollectiveCost> candidates = hw::collective_candidates(c, op, bytes, group);

  if (o.json) {
    Json out = cost_json(main, bytes);
    out["cluster"] = c.name;
    out["op"] = hw::collective_op_name(op);
    out["ranks"] = group.ranks();
    out["ranks_per_node"] = group.ranks_per_node;
    out["nodes"] = group.nodes;
    out["busbw_factor"] = hw::busbw_factor(op, group.ranks());
    Json cands = Json::array();
    for (const auto& cand : candidates)
      cands.push_back(cost_json(cand, bytes));
    out["candidates"] = cands;
    if (sizes.size() > 1) {
      Json rows = Json::array();
      for (double s : sizes)
        rows.push_back(cost_json(hw::collective_cost(c, calibration, op, s, group, algorithm), s));
      out["rows"] = rows;
    }
    print_json(out);
    return;
  }
  std::cout << fmt::format("# {} on {}: {} ranks ({} per node × {} node{}), nccl-tests "
                           "definitions: algbw = size / time, busbw = algbw × {:.4g}\n",
                           hw::collective_op_name(op), c.name, group.ranks(), group.ranks_per_node,
                           group.nodes, group.nodes == 1 ? "" : "s",
                           hw::busbw_factor(op, group.ranks()));
  TextTable t{{"size (B)", "time (us)", "algbw (GB/s)", "busbw (GB/s)", "algorithm"},
              {},
              {true, true, true, true, false}};
  for (double s : sizes) {
    const hw::CollectiveCost cost = hw::collective_cost(c, calibration, op, s, group, algorithm);
    t.rows.push_back({fmt::format("{:.0f}", s), fmt::format("{:.2f}", cost.time_s * 1e6),
                      fmt::format("{:.2f}", cost.algbw / 1e9),
                      fmt::format("{:.2f}", cost.busbw / 1e9), algorithm_label(cost)});
  }
  std::cout << t.render();
  if (!candidates.empty()) {
    TextTable ct{{fmt::format("at {:.0f} B, considered", bytes), "latency (us)", "time (us)",
                  "busbw (GB/s)"},
                 {},
                 {false, true, true, true}};
    for (const auto& cand : candidates)
      ct.rows.push_back({algorithm_label(cand), fmt::format("{:.2f}", cand.latency_s * 1e6),
                         fmt::format("{:.2f}", cand.time_s * 1e6),
                         fmt::format("{:.2f}", cand.busbw / 1e9)});
    std::cout << "\n" << ct.render();
  }
}

} // namespace

void add_hw_command(CLI::App& app) {
  CLI::App* hw =
      app.add_subcommand("hw", "Hardware specs and cost models: node types, collectives");
  hw->require_subcommand(1);

  auto json = std::make_shared<bool>(false);
  CLI::App* list =
      hw->add_subcommand("list", "List the built-in node types\n\nExample:\n  mop hw list");
  add_output_options(list, *json);
  list->callback([json] { run_hw_list(*json); });

  auto show_name = std::make_shared<std::string>();
  CLI::App* show = hw->add_subcommand(
      "show", "Every figure of a node type with its source and tag (DS, MEAS, MAINT, CODE, "
              "DERIVED)\n\nExample:\n  mop hw show h200\n  mop hw show my-cluster.json --json");
  show->add_option("cluster", *show_name, "built-in node type (mop hw list) or a cluster JSON path")
      ->required();
  add_output_options(show, *json);
  show->callback([show_name, json] { run_show(*show_name, *json); });

  auto opt = std::make_shared<CollectiveOptions>();
  CLI::App* coll = hw->add_subcommand(
      "collective",
      "Predicted time, algbw and busbw of one NCCL collective (nccl-tests definitions)\n\n"
      "Example:\n  mop hw collective --cluster h200 --op all_reduce --bytes 1G --ranks 8\n"
      "  mop hw collective --cluster h100 --op all_gather --bytes 1G --min-bytes 1K --ranks 32");
  coll->add_option("--cluster", opt->cluster, "built-in node type or a cluster JSON path")
      ->required();
  coll->add_option("--op", opt->op,
                   "all_gather, reduce_scatter, all_reduce, all_to_all or send_recv")
      ->required();
  coll->add_option("--bytes", opt->bytes,
                   "nccl-tests size: the whole buffer per rank (all_gather/reduce_scatter: the "
                   "gathered total); 1K = 1024")
      ->required();
  coll->add_option("--ranks", opt->ranks, "ranks in the group")->required();
  coll->add_option("--ranks-per-node", opt->ranks_per_node,
                   "ranks on each node (default: min(ranks, GPUs per node))");
  coll->add_option(
      "--min-bytes", opt->min_bytes,
      "also print sizes from this one up to --bytes, doubling (nccl-tests -b/-e -f 2)");
  coll->add_option("--algo", opt->algorithm,
                   "force one algorithm as NCCL_ALGO does: Ring, Tree, NVLS, NVLSTree, PAT, P2P "
                   "(default: the fastest, as NCCL's tuner picks)")
      ->capture_default_str();
  coll->add_option("--calibration", opt->calibration,
                   "a calibration JSON whose measured collectives override the model");
  add_output_options(coll, opt->json);
  coll->callback([opt] { run_collective(*opt); });
}

} // namespace mop::cli
