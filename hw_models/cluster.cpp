#include "hw_models/cluster.hpp"

#include "common/embedded.hpp"
#include "common/error.hpp"

#include <algorithm>
#include <filesystem>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <initializer_list>

namespace mop::hw {
namespace {

constexpr std::initializer_list<const char*> kGpuFields = {"name",
                                                           "arch",
                                                           "hbm_bytes",
                                                           "hbm_bandwidth",
                                                           "hbm_bandwidth_achievable",
                                                           "peak_flops_bf16",
                                                           "peak_flops_fp8",
                                                           "peak_flops_fp32",
                                                           "sm_count",
                                                           "gemm_efficiency_bf16",
                                                           "gemm_efficiency_fp8",
                                                           "gemm_efficiency_fp32",
                                                           "kernel_launch_s",
                                                           "attention_sustained",
                                                           "attention_fwd",
                                                           "attention_bwd",
                                                           "attention_kernels"};
constexpr std::initializer_list<const char*> kNodeFields = {"gpus_per_node",
                                                            "nvlink_bandwidth",
                                                            "nvlink_nccl_bandwidth",
                                                            "nvlink_copy_bandwidth",
                                                            "nvls",
                                                            "nvls_efficiency",
                                                            "pcie_bandwidth",
                                                            "pcie_h2d_bandwidth",
                                                            "pcie_d2h_bandwidth",
                                                            "pcie_duplex_factor",
                                                            "pcie_duplex_h2d_share",
                                                            "nic_shares_pcie_switch",
                                                            "host_cores",
                                                            "cpu_vendor",
                                                            "host_memory_bytes",
                                                            "host_memory_bandwidth",
                                                            "host_memory_bandwidth_achievable",
                                                            "nics",
                                                            "nic_line_rate",
                                                            "nic_bandwidth",
                                                            "ep_rdma_bandwidth",
                                                            "ep_nvlink_bandwidth",
                                                            "ep_nvlink_intranode_bandwidth"};
constexpr std::initializer_list<const char*> kFabricFields = {"kind", "topology", "latency_s"};
constexpr std::initializer_list<const char*> kHostOptimizerFields = {
    "adam_params_per_s", "adam_bytes_per_param", "torch_adam_slowdown"};
constexpr std::initializer_list<const char*> kOverheadFields = {
    "cuda_context_bytes", "nccl_buffer_bytes_per_communicator",
    "nvls_buffer_bytes_per_communicator", "alltoall_buffer_bytes", "allocator_fragmentation"};
constexpr std::initializer_list<const char*> kTopFields = {
    "name", "description", "gpu", "node", "fabric", "host_optimizer", "overheads", "sources"};
// hardware.md §0: the kind of every figure.
constexpr std::initializer_list<const char*> kTags = {"DS", "MEAS", "MAINT", "CODE", "DERIVED"};

bool contains(std::initializer_list<const char*> list, std::string_view key) {
  return std::any_of(list.begin(), list.end(), [&](const char* k) { return key == k; });
}

// A required object member of the top level ("gpu", "node", "fabric").
const Json& section(const JsonFields& top, const std::string& key) {
  const Json& v = top.at(key);
  if (!v.is_object())
    top.fail(key, "an object");
  return v;
}

std::string section_origin(const std::string& origin, const std::string& key) {
  return fmt::format("{}, section '{}'", origin, key);
}

double fraction(const JsonFields& f, const std::string& key) {
  const double v = f.positive_number(key);
  if (v > 1)
    f.fail(key, "a fraction in (0, 1]");
  return v;
}

std::vector<AttentionEfficiency> attention_curves(const JsonFields& gpu, const std::string& key) {
  const Json& list = gpu.at(key);
  if (!list.is_array() || list.empty())
    gpu.fail(key, "a non-empty list of {head_dim, efficiency_max, half_efficiency_kv_len}");
  std::vector<AttentionEfficiency> out;
  for (std::size_t i = 0; i < list.size(); ++i) {
    const std::string origin = fmt::format("{}, {}[{}]", gpu.origin(), key, i);
    const JsonFields e(list[i], origin);
    reject_unknown_keys(list[i],
                        {"head_dim", "efficiency_max", "half_efficiency_kv_len", "points"},
                        origin);
    AttentionEfficiency curve{e.positive_number("head_dim"), fraction(e, "efficiency_max"),
                              e.positive_number("half_efficiency_kv_len"), {}};
    if (e.has("points")) {
      const Json& points = list[i].at("points");
      if (!points.is_array() || points.size() < 2)
        e.fail("points", "a list of two or more {seq_len, tflops, causal}");
      for (std::size_t j = 0; j < points.size(); ++j) {
        const std::string at = fmt::format("{}, points[{}]", origin, j);
        const JsonFields p(points[j], at);
        reject_unknown_keys(points[j], {"seq_len", "tflops", "causal"}, at);
        curve.points.push_back({p.positive_number("seq_len"), p.positive_number("tflops"),
                                p.required_bool("causal")});
        if (j > 0 && curve.points[j].seq_len <= curve.points[j - 1].seq_len)
          p.fail("seq_len", "longer than the point before it");
        if (curve.points[j].causal != curve.points.front().causal)
          p.fail("causal", "the same for every point of a curve");
      }
    }
    out.push_back(std::move(curve));
  }
  std::sort(out.begin(), out.end(),
            [](const auto& a, const auto& b) { return a.head_dim < b.head_dim; });
  return out;
}

GpuSpec read_gpu(const Json& object, const std::string& origin) {
  const JsonFields f(object, origin);
  reject_unknown_keys(object, kGpuFields, origin);
  GpuSpec g;
  g.name = f.string("name");
  const std::string arch = f.string("arch");
  if (arch == "ampere")
    g.arch = GpuArch::ampere;
  else if (arch == "hopper")
    g.arch = GpuArch::hopper;
  else if (arch == "blackwell")
    g.arch = GpuArch::blackwell;
  else
    f.fail("arch", "\"ampere\", \"hopper\" or \"blackwell\"");
  g.hbm_bytes = f.positive_number("hbm_bytes");
  g.hbm_bandwidth = f.positive_number("hbm_bandwidth");
  g.hbm_bandwidth_achievable = f.positive_number("hbm_bandwidth_achievable");
  g.peak_flops_bf16 = f.positive_number("peak_flops_bf16");
  // 0 says the GPU has no FP8 tensor cores (Ampere); its FP8 efficiency is then 0 as well.
  g.peak_flops_fp8 = f.non_negative_number("peak_flops_fp8");
  g.peak_flops_fp32 = f.positive_number("peak_flops_fp32");
  g.sm_count = f.count("sm_count");
  g.gemm_efficiency_bf16 = fraction(f, "gemm_efficiency_bf16");
  if (g.peak_flops_fp8 > 0)
    g.gemm_efficiency_fp8 = fraction(f, "gemm_efficiency_fp8");
  else if (f.non_negative_number("gemm_efficiency_fp8") != 0)
    f.fail("gemm_efficiency_fp8", "0 when peak_flops_fp8 is 0 (no FP8 tensor cores)");
  g.gemm_efficiency_fp32 = fraction(f, "gemm_efficiency_fp32");
  g.kernel_launch_s = f.non_negative_number("kernel_launch_s");
  g.attention_sustained = f.has("attention_sustained") ? fraction(f, "attention_sustained") : 1.0;
  g.attention_fwd = attention_curves(f, "attention_fwd");
  g.attention_bwd = attention_curves(f, "attention_bwd");
  if (f.has("attention_kernels")) {
    const Json& kernels = f.at("attention_kernels");
    const std::string where = f.origin() + ", attention_kernels";
    if (!kernels.is_object())
      f.fail("attention_kernels", "an object of kernel names (flash2, cudnn) to their curves");
    reject_unknown_keys(kernels, {"flash2", "cudnn"}, where);
    for (const auto& [name, curves] : kernels.items()) {
      const JsonFields k(curves, where + "." + name);
      reject_unknown_keys(curves, {"attention_fwd", "attention_bwd"}, k.origin());
      auto& fwd = name == "flash2" ? g.flash2_fwd : g.cudnn_fwd;
      auto& bwd = name == "flash2" ? g.flash2_bwd : g.cudnn_bwd;
      fwd = attention_curves(k, "attention_fwd");
      bwd = attention_curves(k, "attention_bwd");
    }
  }
  if (g.hbm_bandwidth_achievable > g.hbm_bandwidth)
    f.fail("hbm_bandwidth_achievable", "at most hbm_bandwidth (the datasheet ceiling)");
  return g;
}

NodeSpec read_node(const Json& object, const std::string& origin) {
  const JsonFields f(object, origin);
  reject_unknown_keys(object, kNodeFields, origin);
  NodeSpec n;
  n.gpus_per_node = f.count("gpus_per_node");
  n.nvlink_bandwidth = f.positive_number("nvlink_bandwidth");
  n.nvlink_nccl_bandwidth = f.positive_number("nvlink_nccl_bandwidth");
  n.nvlink_copy_bandwidth = f.positive_number("nvlink_copy_bandwidth");
  n.nvls = f.required_bool("nvls");
  // NCCL's nvlsEfficiency is 0 where the switches do no NVLS (tuning.cc: Volta, Ampere).
  n.nvls_efficiency =
      n.nvls ? fraction(f, "nvls_efficiency") : f.non_negative_number("nvls_efficiency");
  if (n.nvls_efficiency > 1)
    f.fail("nvls_efficiency", "a fraction in (0, 1]");
  n.pcie_bandwidth = f.positive_number("pcie_bandwidth");
  n.pcie_h2d_bandwidth = f.positive_number("pcie_h2d_bandwidth");
  n.pcie_d2h_bandwidth = f.positive_number("pcie_d2h_bandwidth");
  n.pcie_duplex_factor = f.positive_number("pcie_duplex_factor");
  if (n.pcie_duplex_factor < 1 || n.pcie_duplex_factor > 2)
    f.fail("pcie_duplex_factor", "between 1 and 2 (both directions' total over one direction)");
  n.pcie_duplex_h2d_share = f.positive_number("pcie_duplex_h2d_share");
  if (n.pcie_duplex_h2d_share >= 1)
    f.fail("pcie_duplex_h2d_share", "a fraction in (0, 1)");
  n.nic_shares_pcie_switch = f.required_bool("nic_shares_pcie_switch");
  n.host_cores = f.count("host_cores");
  const std::string vendor = f.string("cpu_vendor");
  if (vendor == "intel")
    n.cpu_vendor = CpuVendor::intel;
  else if (vendor == "amd")
    n.cpu_vendor = CpuVendor::amd;
  else
    f.fail("cpu_vendor", "\"intel\" or \"amd\"");
  n.host_memory_bytes = f.positive_number("host_memory_bytes");
  n.host_memory_bandwidth = f.positive_number("host_memory_bandwidth");
  n.host_memory_bandwidth_achievable = f.positive_number("host_memory_bandwidth_achievable");
  n.nics = f.count("nics");
  n.nic_line_rate = f.positive_number("nic_line_rate");
  n.nic_bandwidth = f.positive_number("nic_bandwidth");
  for (const char* key : {"nvlink_nccl_bandwidth", "nvlink_copy_bandwidth"})
    if (f.positive_number(key) > n.nvlink_bandwidth)
      f.fail(key, "at most nvlink_bandwidth (the line rate)");
  for (const char* key : {"pcie_h2d_bandwidth", "pcie_d2h_bandwidth"})
    if (f.positive_number(key) > n.pcie_bandwidth)
      f.fail(key, "at most pcie_bandwidth (the datasheet ceiling)");
  if (n.nic_bandwidth > n.nic_line_rate)
    f.fail("nic_bandwidth", "at most nic_line_rate");
  n.ep_rdma_bandwidth = f.positive_number_or("ep_rdma_bandwidth", n.nic_bandwidth);
  n.ep_nvlink_bandwidth = f.positive_number_or("ep_nvlink_bandwidth", n.nvlink_nccl_bandwidth);
  n.ep_nvlink_intranode_bandwidth =
      f.positive_number_or("ep_nvlink_intranode_bandwidth", n.nvlink_nccl_bandwidth);
  if (n.host_memory_bandwidth_achievable > n.host_memory_bandwidth)
    f.fail("host_memory_bandwidth_achievable", "at most host_memory_bandwidth");
  return n;
}

FabricSpec read_fabric(const Json& object, const std::string& origin) {
  const JsonFields f(object, origin);
  reject_unknown_keys(object, kFabricFields, origin);
  FabricSpec fab;
  fab.kind = f.string("kind");
  fab.topology = f.string("topology");
  if (fab.topology != "rail-optimized")
    f.fail("topology", "\"rail-optimized\" (the only fabric the collective model knows)");
  fab.latency_s = f.non_negative_number("latency_s");
  return fab;
}

HostOptimizerSpec read_host_optimizer(const Json& object, const std::string& origin) {
  const JsonFields f(object, origin);
  reject_unknown_keys(object, kHostOptimizerFields, origin);
  HostOptimizerSpec h;
  h.adam_params_per_s = f.positive_number_or("adam_params_per_s", h.adam_params_per_s);
  h.adam_bytes_per_param = f.positive_number_or("adam_bytes_per_param", h.adam_bytes_per_param);
  h.torch_adam_slowdown = f.positive_number_or("torch_adam_slowdown", h.torch_adam_slowdown);
  return h;
}

bool known_field(const std::string& dotted) {
  const auto dot = dotted.find('.');
  if (dot == std::string::npos)
    return dotted == "name" || dotted == "description";
  const std::string sec = dotted.substr(0, dot), key = dotted.substr(dot + 1);
  if (sec == "gpu")
    return contains(kGpuFields, key);
  if (sec == "node")
    return contains(kNodeFields, key);
  if (sec == "fabric")
    return contains(kFabricFields, key);
  if (sec == "host_optimizer")
    return contains(kHostOptimizerFields, key);
  if (sec == "overheads")
    return contains(kOverheadFields, key);
  return false;
}

std::vector<std::pair<std::string, std::string>> read_sources(const Json& object,
                                                              const std::string& origin) {
  std::vector<std::pair<std::string, std::string>> out;
  if (!object.is_object())
    throw InputError(fmt::format("{}: field 'sources' must be an object mapping a figure "
                                 "(\"gpu.hbm_bytes\") to \"TAG: where it comes from\".",
                                 origin));
  for (const auto& [key, value] : object.items()) {
    if (!known_field(key))
      throw InputError(fmt::format("{}: sources names '{}', which is not a field of the cluster "
                                   "file (write \"section.field\", e.g. \"gpu.hbm_bytes\").",
                                   origin, quote_for_message(key)));
    const std::string text = value.is_string() ? value.get<std::string>() : "";
    const auto colon = text.find(':');
    const std::string tag = colon == std::string::npos ? "" : text.substr(0, colon);
    if (!contains(kTags, tag))
      throw InputError(fmt::format("{}: source of '{}' must start with a tag, one of DS, MEAS, "
                                   "MAINT, CODE, DERIVED, and a colon (got {}).",
                                   origin, key, JsonFields::quote_value(value)));
    out.emplace_back(key, text);
  }
  return out;
}

} // namespace

std::vector<std::string> cluster_ids() {
  return embedded_names("clusters");
}

ClusterSpec cluster_from_json(const Json& json, const std::string& origin,
                              const std::string& default_name) {
  const JsonFields top(json, origin);
  reject_unknown_keys(json, kTopFields, origin);
  ClusterSpec c;
  c.name = top.string_or("name", default_name);
  c.description = top.string_or("description", "");
  c.gpu = read_gpu(section(top, "gpu"), section_origin(origin, "gpu"));
  c.node = read_node(section(top, "node"), section_origin(origin, "node"));
  c.fabric = read_fabric(section(top, "fabric"), section_origin(origin, "fabric"));
  if (top.has("host_optimizer"))
    c.host_optimizer = read_host_optimizer(section(top, "host_optimizer"),
                                           section_origin(origin, "host_optimizer"));
  if (top.has("overheads"))
    c.overheads =
        apply_overrides(c.overheads, read_memory_overheads(section(top, "overheads"),
                                                           section_origin(origin, "overheads")));
  if (top.has("sources"))
    c.sources = read_sources(top.at("sources"), origin);
  if (c.node.nics % c.node.gpus_per_node != 0 && c.node.gpus_per_node % c.node.nics != 0)
    throw InputError(fmt::format("{}, section 'node': field 'nics' ({}) must divide or be a "
                                 "multiple of gpus_per_node ({}) on a rail-optimized fabric.",
                                 origin, c.node.nics, c.node.gpus_per_node));
  return c;
}

ClusterSpec load_cluster(const std::string& name_or_path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const bool looks_like_path = name_or_path.find('/') != std::string::npos ||
                               name_or_path.ends_with(".json") || fs::exists(name_or_path, ec);
  if (!looks_like_path) {
    if (auto text = embedded_text("clusters", name_or_path)) {
      const std::string origin = fmt::format("built-in cluster '{}'", name_or_path);
      return cluster_from_json(parse_json(*text, origin), origin, name_or_path);
    }
    throw InputError(fmt::format("'{}' is neither a built-in node type nor a cluster JSON path; "
                                 "built-in: {}.",
                                 name_or_path, fmt::join(cluster_ids(), ", ")));
  }
  const Json json = read_json_file(name_or_path);
  return cluster_from_json(json, name_or_path, fs::path(name_or_path).stem().string());
}

std::string_view gpu_arch_name(GpuArch arch) {
  switch (arch) {
  case GpuArch::ampere:
    return "ampere";
  case GpuArch::hopper:
    return "hopper";
  case GpuArch::blackwell:
    return "blackwell";
  }
  return "hopper";
}

std::string_view cpu_vendor_name(CpuVendor vendor) {
  return vendor == CpuVendor::amd ? "amd" : "intel";
}

namespace {

Json curves_json(const std::vector<AttentionEfficiency>& curves);

// The other kernels' curves, those the GPU has.
Json attention_kernels_json(const GpuSpec& g) {
  Json out = Json::object();
  if (!g.flash2_fwd.empty())
    out["flash2"] = Json{{"attention_fwd", curves_json(g.flash2_fwd)},
                         {"attention_bwd", curves_json(g.flash2_bwd)}};
  if (!g.cudnn_fwd.empty())
    out["cudnn"] = Json{{"attention_fwd", curves_json(g.cudnn_fwd)},
                        {"attention_bwd", curves_json(g.cudnn_bwd)}};
  return out;
}

Json curves_json(const std::vector<AttentionEfficiency>& curves) {
  Json out = Json::array();
  for (const auto& c : curves) {
    Json curve{{"head_dim", c.head_dim},
               {"efficiency_max", c.efficiency_max},
               {"half_efficiency_kv_len", c.half_efficiency_kv_len}};
    if (!c.points.empty()) {
      Json points = Json::array();
      for (const auto& p : c.points)
        points.push_back(Json{{"seq_len", p.seq_len}, {"tflops", p.tflops}, {"causal", p.causal}});
      curve["points"] = std::move(points);
    }
    out.push_back(std::move(curve));
  }
  return out;
}

} // namespace

Json cluster_to_json(const ClusterSpec& c) {
  const GpuSpec& g = c.gpu;
  const NodeSpec& n = c.node;
  Json sources = Json::object();
  for (const auto& [k, v] : c.sources)
    sources[k] = v;
  return Json{
      {"name", c.name},
      {"description", c.description},
      {"gpu", Json{{"name", g.name},
                   {"arch", gpu_arch_name(g.arch)},
                   {"hbm_bytes", g.hbm_bytes},
                   {"hbm_bandwidth", g.hbm_bandwidth},
                   {"hbm_bandwidth_achievable", g.hbm_bandwidth_achievable},
                   {"peak_flops_bf16", g.peak_flops_bf16},
                   {"peak_flops_fp8", g.peak_flops_fp8},
                   {"peak_flops_fp32", g.peak_flops_fp32},
                   {"sm_count", g.sm_count},
                   {"gemm_efficiency_bf16", g.gemm_efficiency_bf16},
                   {"gemm_efficiency_fp8", g.gemm_efficiency_fp8},
                   {"gemm_efficiency_fp32", g.gemm_efficiency_fp32},
                   {"kernel_launch_s", g.kernel_launch_s},
                   {"attention_sustained", g.attention_sustained},
                   {"attention_fwd", curves_json(g.attention_fwd)},
                   {"attention_bwd", curves_json(g.attention_bwd)},
                   {"attention_kernels", attention_kernels_json(g)}}},
      {"node", Json{{"gpus_per_node", n.gpus_per_node},
                    {"nvlink_bandwidth", n.nvlink_bandwidth},
                    {"nvlink_nccl_bandwidth", n.nvlink_nccl_bandwidth},
                    {"nvlink_copy_bandwidth", n.nvlink_copy_bandwidth},
                    {"nvls", n.nvls},
                    {"nvls_efficiency", n.nvls_efficiency},
                    {"pcie_bandwidth", n.pcie_bandwidth},
                    {"pcie_h2d_bandwidth", n.pcie_h2d_bandwidth},
                    {"pcie_d2h_bandwidth", n.pcie_d2h_bandwidth},
                    {"pcie_duplex_factor", n.pcie_duplex_factor},
                    {"pcie_duplex_h2d_share", n.pcie_duplex_h2d_share},
                    {"nic_shares_pcie_switch", n.nic_shares_pcie_switch},
                    {"host_cores", n.host_cores},
                    {"cpu_vendor", cpu_vendor_name(n.cpu_vendor)},
                    {"host_memory_bytes", n.host_memory_bytes},
                    {"host_memory_bandwidth", n.host_memory_bandwidth},
                    {"host_memory_bandwidth_achievable", n.host_memory_bandwidth_achievable},
                    {"nics", n.nics},
                    {"nic_line_rate", n.nic_line_rate},
                    {"nic_bandwidth", n.nic_bandwidth},
                    {"ep_rdma_bandwidth", n.ep_rdma_bandwidth},
                    {"ep_nvlink_bandwidth", n.ep_nvlink_bandwidth},
                    {"ep_nvlink_intranode_bandwidth", n.ep_nvlink_intranode_bandwidth}}},
      {"fabric", Json{{"kind", c.fabric.kind},
                      {"topology", c.fabric.topology},
                      {"latency_s", c.fabric.latency_s}}},
      {"host_optimizer", Json{{"adam_params_per_s", c.host_optimizer.adam_params_per_s},
                              {"adam_bytes_per_param", c.host_optimizer.adam_bytes_per_param},
                              {"torch_adam_slowdown", c.host_optimizer.torch_adam_slowdown}}},
      {"overheads",
       Json{{"cuda_context_bytes", c.overheads.cuda_context_bytes},
            {"nccl_buffer_bytes_per_communicator", c.overheads.nccl_buffer_bytes_per_communicator},
            {"nvls_buffer_bytes_per_communicator", c.overheads.nvls_buffer_bytes_per_communicator},
            {"alltoall_buffer_bytes", c.overheads.alltoall_buffer_bytes},
            {"allocator_fragmentation", c.overheads.allocator_fragmentation}}},
      {"sources", sources}};
}

std::string source_of(const ClusterSpec& cluster, const std::string& field) {
  for (const auto& [k, v] : cluster.sources)
    if (k == field)
      return v;
  return "";
}

} // namespace mop::hw
