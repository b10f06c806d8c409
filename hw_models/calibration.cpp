#include "hw_models/calibration.hpp"

#include "common/error.hpp"
#include "common/limits.hpp"

#include <algorithm>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <initializer_list>
#include <tuple>

namespace mop::hw {
namespace {

const Json& list_of(const JsonFields& top, const std::string& key) {
  const Json& v = top.at(key);
  if (!v.is_array())
    top.fail(key, "a list of measured points");
  return v;
}

int groups_field(const JsonFields& e) {
  const std::int64_t g = e.positive_int_or("groups", 1);
  if (g > 1'000'000)
    e.fail("groups", "a positive integer below 1,000,000");
  return static_cast<int>(g);
}

std::string entry_origin(const std::string& origin, const char* table, std::size_t i) {
  return fmt::format("{}, {}[{}]", origin, table, i);
}

// Two points with the same key and size measure the same thing twice: ambiguous.
template <class T, class Key>
void reject_duplicates(std::vector<T>& points, Key key, const std::string& origin,
                       const char* table) {
  std::sort(points.begin(), points.end(), [&](const T& a, const T& b) { return key(a) < key(b); });
  for (std::size_t i = 1; i < points.size(); ++i)
    if (key(points[i - 1]) == key(points[i]))
      throw InputError(
          fmt::format("{}: two '{}' entries measure the same shape; keep one.", origin, table));
}

// The measured neighbours of x among the points that match a key: the largest x at or below it
// and the smallest at or above it.
template <class T> struct Bracket {
  const T* lo = nullptr;
  const T* hi = nullptr;
};

template <class T, class Match, class X>
Bracket<T> bracket(const std::vector<T>& points, Match match, X x_of, double x) {
  Bracket<T> b;
  for (const T& p : points) {
    if (!match(p))
      continue;
    const double px = x_of(p);
    if (px <= x && (b.lo == nullptr || px > x_of(*b.lo)))
      b.lo = &p;
    if (px >= x && (b.hi == nullptr || px < x_of(*b.hi)))
      b.hi = &p;
  }
  return b;
}

double lerp(double x0, double y0, double x1, double y1, double x) {
  if (x1 == x0)
    return y0;
  return y0 + (y1 - y0) * (x - x0) / (x1 - x0);
}

} // namespace

bool Calibration::empty() const {
  return gemm.empty() && attention.empty() && collectives.empty() && host_adam.empty() &&
         !hbm_bytes_per_s && !h2d_bytes_per_s && !d2h_bytes_per_s && !pcie_duplex_factor &&
         !nvlink_copy_bytes_per_s && !host_memory_bytes_per_s && !kernel_launch_s &&
         !host_launch_s && !overheads.cuda_context_bytes &&
         !overheads.nccl_buffer_bytes_per_communicator &&
         !overheads.nvls_buffer_bytes_per_communicator && !overheads.alltoall_buffer_bytes &&
         !overheads.allocator_fragmentation;
}

Calibration calibration_from_json(const Json& json, const std::string& origin) {
  const JsonFields top(json, origin);
  reject_unknown_keys(json,
                      {"schema", "description", "cluster", "device", "gemm", "attention",
                       "collectives", "host_adam", "bandwidths", "launch", "overheads"},
                      origin);
  if (top.has("schema") && top.string("schema") != "mop-calibration-1")
    top.fail("schema", "\"mop-calibration-1\"");
  Calibration c;
  c.origin = origin;

  if (top.has("gemm")) {
    const Json& list = list_of(top, "gemm");
    for (std::size_t i = 0; i < list.size(); ++i) {
      const std::string o = entry_origin(origin, "gemm", i);
      const JsonFields e(list[i], o);
      reject_unknown_keys(list[i], {"dtype", "groups", "m", "n", "k", "time_s"}, o);
      GemmPoint p;
      try {
        p.dtype = parse_dtype(e.string("dtype"));
      } catch (const InputError&) {
        e.fail("dtype", "one of \"bf16\", \"fp8\", \"fp32\"");
      }
      p.groups = groups_field(e);
      p.m = e.positive_number("m");
      p.n = e.positive_number("n");
      p.k = e.positive_number("k");
      p.time_s = e.positive_number("time_s");
      c.gemm.push_back(p);
    }
    reject_duplicates(
        c.gemm, [](const GemmPoint& p) { return std::tuple(p.dtype, p.groups, p.n, p.k, p.m); },
        origin, "gemm");
  }

  if (top.has("attention")) {
    const Json& list = list_of(top, "attention");
    for (std::size_t i = 0; i < list.size(); ++i) {
      const std::string o = entry_origin(origin, "attention", i);
      const JsonFields e(list[i], o);
      reject_unknown_keys(list[i],
                          {"pass", "batch", "heads", "kv_heads", "q_len", "kv_len", "qk_head_dim",
                           "v_head_dim", "causal", "window", "time_s"},
                          o);
      AttentionPoint p;
      const std::string pass = e.string("pass");
      if (pass != "fwd" && pass != "bwd")
        e.fail("pass", "\"fwd\" or \"bwd\"");
      p.backward = pass == "bwd";
      AttentionShape& s = p.shape;
      s.batch = e.positive_number("batch");
      s.heads = e.positive_number("heads");
      s.kv_heads = e.positive_number_or("kv_heads", s.heads);
      s.q_len = e.positive_number("q_len");
      s.kv_len = e.positive_number("kv_len");
      s.qk_head_dim = e.positive_number("qk_head_dim");
      s.v_head_dim = e.positive_number_or("v_head_dim", s.qk_head_dim);
      s.causal = e.required_bool("causal");
      s.window = e.non_negative_number_or("window", 0);
      p.time_s = e.positive_number("time_s");
      attention_flops(s, p.backward); // validates the shape with the same sentences
      c.attention.push_back(p);
    }
    reject_duplicates(
        c.attention,
        [](const AttentionPoint& p) {
          const AttentionShape& s = p.shape;
          return std::tuple(p.backward, s.qk_head_dim, s.v_head_dim, s.causal, s.window, s.kv_len,
                            s.q_len, s.batch, s.heads, s.kv_heads);
        },
        origin, "attention");
  }

  if (top.has("collectives")) {
    const Json& list = list_of(top, "collectives");
    for (std::size_t i = 0; i < list.size(); ++i) {
      const std::string o = entry_origin(origin, "collectives", i);
      const JsonFields e(list[i], o);
      reject_unknown_keys(list[i], {"op", "ranks_per_node", "nodes", "bytes", "time_s"}, o);
      CollectivePoint p;
      try {
        p.op = parse_collective_op(e.string("op"));
      } catch (const InputError&) {
        e.fail("op", "one of \"all_gather\", \"reduce_scatter\", \"all_reduce\", "
                     "\"all_to_all\", \"send_recv\"");
      }
      // Bounded so that ranks_per_node x nodes (an int) is at most limits::max_gpus.
      p.group.ranks_per_node = static_cast<int>(e.int_in("ranks_per_node", 1, limits::max_gpus));
      p.group.nodes = static_cast<int>(e.int_in("nodes", 1, limits::max_gpus));
      if (std::int64_t{p.group.ranks_per_node} * p.group.nodes > limits::max_gpus)
        e.fail("nodes", fmt::format("at most {} with {} ranks per node (mop's ceiling is {} GPUs)",
                                    limits::max_gpus / p.group.ranks_per_node,
                                    p.group.ranks_per_node, limits::max_gpus));
      p.bytes = e.positive_number("bytes");
      p.time_s = e.positive_number("time_s");
      c.collectives.push_back(p);
    }
    reject_duplicates(
        c.collectives,
        [](const CollectivePoint& p) {
          return std::tuple(p.op, p.group.ranks_per_node, p.group.nodes, p.bytes);
        },
        origin, "collectives");
  }

  if (top.has("host_adam")) {
    const Json& list = list_of(top, "host_adam");
    for (std::size_t i = 0; i < list.size(); ++i) {
      const std::string o = entry_origin(origin, "host_adam", i);
      const JsonFields e(list[i], o);
      reject_unknown_keys(list[i], {"cores", "params_per_s"}, o);
      c.host_adam.push_back({e.count("cores"), e.positive_number("params_per_s")});
    }
    reject_duplicates(
        c.host_adam, [](const HostAdamPoint& p) { return p.cores; }, origin, "host_adam");
  }

  if (top.has("bandwidths")) {
    const Json& b = top.at("bandwidths");
    const std::string o = fmt::format("{}, section 'bandwidths'", origin);
    const JsonFields f(b, o);
    reject_unknown_keys(b,
                        {"hbm_bytes_per_s", "h2d_bytes_per_s", "d2h_bytes_per_s",
                         "pcie_duplex_factor", "nvlink_copy_bytes_per_s",
                         "host_memory_bytes_per_s"},
                        o);
    auto optional = [&](const char* key) -> std::optional<double> {
      return f.has(key) ? std::optional<double>(f.positive_number(key)) : std::nullopt;
    };
    c.hbm_bytes_per_s = optional("hbm_bytes_per_s");
    c.h2d_bytes_per_s = optional("h2d_bytes_per_s");
    c.d2h_bytes_per_s = optional("d2h_bytes_per_s");
    c.pcie_duplex_factor = optional("pcie_duplex_factor");
    if (c.pcie_duplex_factor && (*c.pcie_duplex_factor < 1 || *c.pcie_duplex_factor > 2))
      f.fail("pcie_duplex_factor", "between 1 and 2");
    c.nvlink_copy_bytes_per_s = optional("nvlink_copy_bytes_per_s");
    c.host_memory_bytes_per_s = optional("host_memory_bytes_per_s");
  }
  if (top.has("launch")) {
    const Json& b = top.at("launch");
    const std::string o = fmt::format("{}, section 'launch'", origin);
    const JsonFields f(b, o);
    reject_unknown_keys(b, {"kernel_s", "host_s"}, o);
    if (f.has("kernel_s"))
      c.kernel_launch_s = f.positive_number("kernel_s");
    if (f.has("host_s"))
      c.host_launch_s = f.positive_number("host_s");
  }
  if (top.has("device")) {
    if (!top.at("device").is_object())
      top.fail("device", "an object (the GPU and library versions it was measured with)");
    c.device = top.at("device");
  }

  if (top.has("overheads"))
    c.overheads =
        read_memory_overheads(top.at("overheads"), fmt::format("{}, section 'overheads'", origin));
  return c;
}

Json calibration_to_json(const Calibration& c, const std::string& description,
                         const std::string& cluster) {
  Json j = Json::object();
  j["schema"] = "mop-calibration-1";
  if (!description.empty())
    j["description"] = description;
  if (!cluster.empty())
    j["cluster"] = cluster;
  if (!c.device.empty())
    j["device"] = c.device;
  if (!c.gemm.empty()) {
    Json list = Json::array();
    for (const GemmPoint& p : c.gemm) {
      Json e{{"dtype", std::string(dtype_name(p.dtype))},
             {"m", p.m},
             {"n", p.n},
             {"k", p.k},
             {"time_s", p.time_s}};
      if (p.groups != 1)
        e["groups"] = p.groups;
      list.push_back(e);
    }
    j["gemm"] = list;
  }
  if (!c.attention.empty()) {
    Json list = Json::array();
    for (const AttentionPoint& p : c.attention) {
      const AttentionShape& s = p.shape;
      list.push_back({{"pass", p.backward ? "bwd" : "fwd"},
                      {"batch", s.batch},
                      {"heads", s.heads},
                      {"kv_heads", s.kv_heads},
                      {"q_len", s.q_len},
                      {"kv_len", s.kv_len},
                      {"qk_head_dim", s.qk_head_dim},
                      {"v_head_dim", s.v_head_dim},
                      {"causal", s.causal},
                      {"window", s.window},
                      {"time_s", p.time_s}});
    }
    j["attention"] = list;
  }
  if (!c.collectives.empty()) {
    Json list = Json::array();
    for (const CollectivePoint& p : c.collectives)
      list.push_back({{"op", std::string(collective_op_name(p.op))},
                      {"ranks_per_node", p.group.ranks_per_node},
                      {"nodes", p.group.nodes},
                      {"bytes", p.bytes},
                      {"time_s", p.time_s}});
    j["collectives"] = list;
  }
  if (!c.host_adam.empty()) {
    Json list = Json::array();
    for (const HostAdamPoint& p : c.host_adam)
      list.push_back({{"cores", p.cores}, {"params_per_s", p.params_per_s}});
    j["host_adam"] = list;
  }
  Json bw = Json::object();
  auto put = [](Json& o, const char* key, const std::optional<double>& v) {
    if (v)
      o[key] = *v;
  };
  put(bw, "hbm_bytes_per_s", c.hbm_bytes_per_s);
  put(bw, "h2d_bytes_per_s", c.h2d_bytes_per_s);
  put(bw, "d2h_bytes_per_s", c.d2h_bytes_per_s);
  put(bw, "pcie_duplex_factor", c.pcie_duplex_factor);
  put(bw, "nvlink_copy_bytes_per_s", c.nvlink_copy_bytes_per_s);
  put(bw, "host_memory_bytes_per_s", c.host_memory_bytes_per_s);
  if (!bw.empty())
    j["bandwidths"] = bw;
  Json launch = Json::object();
  put(launch, "kernel_s", c.kernel_launch_s);
  put(launch, "host_s", c.host_launch_s);
  if (!launch.empty())
    j["launch"] = launch;
  Json over = Json::object();
  put(over, "cuda_context_bytes", c.overheads.cuda_context_bytes);
  put(over, "nccl_buffer_bytes_per_communicator", c.overheads.nccl_buffer_bytes_per_communicator);
  put(over, "nvls_buffer_bytes_per_communicator", c.overheads.nvls_buffer_bytes_per_communicator);
  put(over, "alltoall_buffer_bytes", c.overheads.alltoall_buffer_bytes);
  put(over, "allocator_fragmentation", c.overheads.allocator_fragmentation);
  if (!over.empty())
    j["overheads"] = over;
  return j;
}

ClusterSpec calibrated_cluster(ClusterSpec cluster, const Calibration& calibration) {
  cluster.overheads = memory_overheads(cluster, calibration);
  if (calibration.kernel_launch_s)
    cluster.gpu.kernel_launch_s = *calibration.kernel_launch_s;
  return cluster;
}

Calibration load_calibration(const std::string& path) {
  return calibration_from_json(read_json_file(path), path);
}

std::optional<double> calibrated_gemm_time_s(const Calibration& c, Dtype dtype, int groups,
                                             double m, double n, double k) {
  if (c.gemm.empty())
    return std::nullopt;
  const double q[3] = {m, n, k};
  // Along m (n, k fixed), then k (m, n fixed: a weight gradient's k is the tokens), then n.
  for (const int along : {0, 2, 1}) {
    auto dim = [](const GemmPoint& p, int d) { return d == 0 ? p.m : (d == 1 ? p.n : p.k); };
    const auto b = bracket(
        c.gemm,
        [&](const GemmPoint& p) {
          if (p.dtype != dtype || p.groups != groups)
            return false;
          for (int d = 0; d < 3; ++d)
            if (d != along && dim(p, d) != q[d])
              return false;
          return true;
        },
        [&](const GemmPoint& p) { return dim(p, along); }, q[along]);
    if (b.lo == nullptr || b.hi == nullptr)
      continue;
    if (b.lo == b.hi)
      return b.lo->time_s;
    // Interpolate the achieved FLOP/s: time then grows with the size as a GEMM's does.
    auto rate = [](const GemmPoint& p) { return 2.0 * p.groups * p.m * p.n * p.k / p.time_s; };
    return 2.0 * groups * m * n * k /
           lerp(dim(*b.lo, along), rate(*b.lo), dim(*b.hi, along), rate(*b.hi), q[along]);
  }
  return std::nullopt;
}

std::optional<double> calibrated_attention_time_s(const Calibration& c, bool backward,
                                                  const AttentionShape& s) {
  if (c.attention.empty())
    return std::nullopt;
  const auto b = bracket(
      c.attention,
      [&](const AttentionPoint& p) {
        const AttentionShape& q = p.shape;
        return p.backward == backward && q.qk_head_dim == s.qk_head_dim &&
               q.v_head_dim == s.v_head_dim && q.causal == s.causal && q.window == s.window;
      },
      [](const AttentionPoint& p) { return p.shape.kv_len; }, s.kv_len);
  if (b.lo == nullptr || b.hi == nullptr)
    return std::nullopt;
  const double flops = attention_flops(s, backward);
  auto rate = [&](const AttentionPoint& p) {
    return attention_flops(p.shape, backward) / p.time_s;
  };
  if (b.lo == b.hi) {
    const AttentionShape& q = b.lo->shape;
    if (q.batch == s.batch && q.heads == s.heads && q.q_len == s.q_len)
      return b.lo->time_s;
    return flops / rate(*b.lo);
  }
  return flops / lerp(b.lo->shape.kv_len, rate(*b.lo), b.hi->shape.kv_len, rate(*b.hi), s.kv_len);
}

std::optional<double> calibrated_collective_time_s(const Calibration& c, CollectiveOp op,
                                                   GroupShape group, double bytes) {
  if (c.collectives.empty())
    return std::nullopt;
  const auto b = bracket(
      c.collectives,
      [&](const CollectivePoint& p) {
        return p.op == op && p.group.ranks_per_node == group.ranks_per_node &&
               p.group.nodes == group.nodes;
      },
      [](const CollectivePoint& p) { return p.bytes; }, bytes);
  if (b.lo == nullptr || b.hi == nullptr)
    return std::nullopt;
  // A collective's time is affine in its size (latency + size / bandwidth): interpolate time.
  return lerp(b.lo->bytes, b.lo->time_s, b.hi->bytes, b.hi->time_s, bytes);
}

std::optional<double> calibrated_host_adam_params_per_s(const Calibration& c, int cores) {
  if (c.host_adam.empty())
    return std::nullopt;
  const double x = cores;
  const auto b = bracket(
      c.host_adam, [](const HostAdamPoint&) { return true; },
      [](const HostAdamPoint& p) { return static_cast<double>(p.cores); }, x);
  if (b.lo == nullptr || b.hi == nullptr)
    return std::nullopt;
  return lerp(b.lo->cores, b.lo->params_per_s, b.hi->cores, b.hi->params_per_s, x);
}

} // namespace mop::hw
