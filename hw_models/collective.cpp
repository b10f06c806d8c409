#include "hw_models/collective.hpp"

#include "common/error.hpp"
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <fmt/format.h>
#include <limits>

namespace mop::hw {
namespace {

// NCCL's tuner constants, NVIDIA/nccl src/graph/tuning.cc (NCCL 2.30, commit 5067397), in µs,
// indexed by protocol {LL, LL128, Simple} (hardware.md §3.5).
enum Protocol { LL = 0, LL128 = 1, Simple = 2 };
constexpr std::array<const char*, 3> kProtocolName = {"LL", "LL128", "Simple"};
constexpr std::array<double, 3> kBaseLatTree = {6.8, 14.0, 8.4};
constexpr std::array<double, 3> kBaseLatRing = {6.6, 14.0, 8.4};
constexpr double kBaseLatPat = 8.0;
constexpr std::array<double, 3> kNvlinkLatTree = {0.6, 1.25, 4.0};
constexpr std::array<double, 3> kNvlinkLatRing = {0.6, 1.9, 3.4};
constexpr double kNvlinkLatNvls = 25; // NVLS and NVLSTree, Simple only
constexpr std::array<double, 3> kNetLatTree = {5.0, 8.5, 14};
constexpr std::array<double, 3> kNetLatRing = {2.7, 4.0, 14.0};
constexpr double kNetLatNvlsTree = 20.9;
constexpr double kNetLatPat = 14;
// tuning.cc getNetOverhead: network post overhead per inter-node step on x86, tripled for Simple.
constexpr double kNetOverheadIntel = 1.0, kNetOverheadAmd = 2.0;
// tuning.cc llMaxBws (GB/s = 1e9 B/s): single node by GPU architecture, multi-node by CPU vendor
// and node count (2 nodes, more).
constexpr double kLlMaxHopper = 141.0, kLlMaxBlackwell = 2 * 141.0;
// tuning.cc llMaxBws row "Ampere-N1/AMD-N2/AMD-N4": Ampere on one node (NCCL 2.30, 5067397).
constexpr double kLlMaxAmpere = 87.7;
constexpr std::array<double, 2> kLlMaxIntel = {39.0, 20.4};
constexpr std::array<double, 2> kLlMaxAmd = {22.5, 19.0};
// tuning.cc model refinements: Ring LL halves the bandwidth, LL128 keeps 120/128 of it; Tree
// all-reduce keeps 0.92, LL 1/3.8 of that, LL128 7/9 (one node) or 120/128; PAT 0.75; a tree
// all-reduce moves the buffer up and down, so its algbw is half its bus bandwidth.
constexpr double kRingLlFactor = 0.5, kLl128Factor = 120.0 / 128.0, kTreeFactor = 0.92;
constexpr double kTreeLlFactor = 1 / 3.8, kTreeLl128OneNodeFactor = 7.0 / 9.0, kPatFactor = 0.75;
// tuning.cc treeCorrectionFactor: Tree all-reduce bandwidth by log2(bytes / 64), 64 B … 256 MB.
constexpr std::array<std::array<double, 23>, 3> kTreeCorrection = {{
    {1.0, 1.0, 1.0, 1.0, .9, .8, .7, .7,  .7,  .7,  .6, .5,
     .4,  .4,  .5,  .6,  .7, .8, .9, 1.0, 1.0, 1.0, 1.0},
    {1.0, 1.0, 1.0, 1.0, 1.0, .9, .8, .8, .8, .7,  .6, .6,
     .6,  .6,  .6,  .6,  .8,  .9, .9, .9, .9, 1.0, 1.0},
    {.9, .9, .9, .9, .9, .9, .9, .8, .7, .6, .6, .5, .5, .5, .5, .6, .7, .8, .7, .7, .8, .9, .9},
}};
// NCCL src/enqueue.cc NCCL_P2P_LL_THRESHOLD: point-to-point uses LL up to 16 KiB per peer.
constexpr double kP2pLlThresholdBytes = 16384;
// Message-size efficiency (DERIVED, docs/HARDWARE.md): NCCL pipelines a transfer through a
// FIFO of 8 slots per connection, so x bus bytes take (x + sqrt(x·x0)) / bandwidth, the time of
// an optimally chunked pipeline with a fill cost. x0 = two FIFOs of payload per protocol (NCCL
// src/init.cc defaults: Simple NCCL_BUFFSIZE 4 MiB; LL128 120·640·8 × 8 B, 120 of 128 bytes
// payload; LL 8·512·8 × 16 B lines, half payload). The factor two puts the NVLS all-reduce curve
// of Azure ND H200 v5 (hardware.md §3.2) within ±6 % from 1 MiB to 8 GiB, half of peak near
// 16 MB, and NCCL's Ring/LL → NVLS switch between 1 and 2 MiB, as ml-engineering observed.
constexpr double kPipelineFifos = 2;
constexpr std::array<double, 3> kFifoPayloadBytes = {
    8.0 * 512 * 8 * 16 / 2, 120.0 * 640 * 8 * 8 * 120 / 128, 4.0 * 1024 * 1024};
constexpr double kUs = 1e-6;

struct Topology {
  int ppn = 1, nodes = 1, ranks = 1;
  double nvlink = 0; // NCCL's NVLink bandwidth per GPU per direction
  double nic = 0;    // NIC bandwidth per GPU (rail-optimized: its own NICs)
  double nvls_efficiency = 0;
  bool nvls = false;
  double ll_max = 0;
  double net_overhead_us = 0;
  double fabric_latency_us = 0;
};

Topology topology_of(const ClusterSpec& c, GroupShape g) {
  Topology t;
  t.ppn = g.ranks_per_node;
  t.nodes = g.nodes;
  t.ranks = g.ranks();
  t.nvlink = c.node.nvlink_nccl_bandwidth;
  t.nic = c.node.nic_bandwidth * c.node.nics / c.node.gpus_per_node;
  t.nvls = c.node.nvls;
  t.nvls_efficiency = c.node.nvls_efficiency;
  const bool amd = c.node.cpu_vendor == CpuVendor::amd;
  if (t.nodes == 1)
    t.ll_max = (c.gpu.arch == GpuArch::blackwell ? kLlMaxBlackwell
                : c.gpu.arch == GpuArch::ampere  ? kLlMaxAmpere
                                                 : kLlMaxHopper) *
               1e9;
  else
    t.ll_max = (amd ? kLlMaxAmd : kLlMaxIntel)[t.nodes == 2 ? 0 : 1] * 1e9;
  t.net_overhead_us = amd ? kNetOverheadAmd : kNetOverheadIntel;
  t.fabric_latency_us = c.fabric.latency_s / kUs;
  return t;
}

double log2_floor(int v) {
  return std::floor(std::log2(static_cast<double>(v)));
}

// Time to push `bus_bytes` through a link of `bus_bandwidth` with protocol p's message-size
// efficiency.
double transfer_s(double bus_bytes, double bus_bandwidth, int p) {
  if (bus_bytes <= 0)
    return 0;
  const double x0 = kPipelineFifos * kFifoPayloadBytes[static_cast<std::size_t>(p)];
  return (bus_bytes + std::sqrt(bus_bytes * x0)) / bus_bandwidth;
}

// The inter-node latency of one step: NCCL adds the network's own latency once, twice for Simple
// (the flush), tuning.cc.
double net_step_us(const Topology& t, double constant_us, int p) {
  return constant_us + t.fabric_latency_us * (p == Simple ? 2 : 1);
}

struct Candidate {
  const char* algorithm;
  int protocol;
  double latency_s;
  double time_s;
};

// Calls visit(Candidate) for every algorithm and protocol NCCL would consider for this call.
template <class Visit>
void for_each_candidate(const Topology& t, CollectiveOp op, double bytes, Visit visit) {
  const int n = t.ranks;
  const double f = busbw_factor(op, n);
  const double bus_bytes = bytes * f;
  const bool multi_node = t.nodes > 1;

  if (op == CollectiveOp::all_reduce || op == CollectiveOp::all_gather ||
      op == CollectiveOp::reduce_scatter) {
    const bool ar = op == CollectiveOp::all_reduce;
    // Ring: every rank sends f·S; inter-node, the node's rings share its NICs (one per GPU on a
    // rail-optimized fabric), so the ring's bus bandwidth is the smaller of NVLink and those.
    const double ring_bw = !multi_node  ? t.nvlink
                           : t.ppn == 1 ? t.nic
                                        : std::min(t.nvlink, t.ppn * t.nic);
    const int steps = ar ? 2 * (n - 1) : n - 1;
    const int inter_steps = !multi_node ? 0 : ar ? 2 * (t.nodes - 1) : t.nodes - 1;
    for (int p : {LL, LL128, Simple}) {
      const double bw = p == Simple  ? ring_bw
                        : p == LL128 ? ring_bw * kLl128Factor
                                     : std::min(t.ll_max, ring_bw * kRingLlFactor);
      double intra_us = kNvlinkLatRing[p];
      if (multi_node)
        intra_us = std::max(intra_us, t.net_overhead_us * (p == Simple ? 3 : 1));
      const double inter_us = net_step_us(t, (t.ppn == 1 ? kNetLatTree : kNetLatRing)[p], p);
      const double lat_s =
          (kBaseLatRing[p] + (steps - inter_steps) * intra_us + inter_steps * inter_us) * kUs;
      visit(Candidate{"Ring", p, lat_s, lat_s + transfer_s(bus_bytes, bw, p)});
    }
  }

  if (op == CollectiveOp::all_reduce) {
    // Tree (NCCL's double binary tree across nodes, a chain inside each): on one or two nodes
    // NCCL's model uses the intra-node bandwidth, beyond that the node's NICs.
    const double tree_bw = t.ppn == 1     ? t.nic
                           : t.nodes <= 2 ? t.nvlink
                                          : std::min(t.nvlink, t.ppn * t.nic);
    const int log_size = bytes >= 64 ? static_cast<int>(std::floor(std::log2(bytes / 64))) : -1;
    for (int p : {LL, LL128, Simple}) {
      double bw = tree_bw * kTreeFactor;
      if (p == LL)
        bw = std::min(bw * kTreeLlFactor, t.ll_max);
      if (p == LL128)
        bw *= t.nodes == 1 ? kTreeLl128OneNodeFactor : kLl128Factor;
      double algbw = 0.5 * bw;
      if (log_size >= 0 && log_size < 23)
        algbw *= kTreeCorrection[p][log_size];
      const double inter_us = net_step_us(t, kNetLatTree[p], p);
      const double lat_s = (kBaseLatTree[p] + 2 * ((t.ppn - 1) * kNvlinkLatTree[p] +
                                                   log2_floor(t.nodes) * inter_us)) *
                           kUs;
      visit(Candidate{"Tree", p, lat_s, lat_s + transfer_s(bus_bytes, algbw * f, p)});
    }
  }

  if (t.nvls && t.ppn >= 2 && !multi_node &&
      (op == CollectiveOp::all_reduce || op == CollectiveOp::all_gather ||
       op == CollectiveOp::reduce_scatter)) {
    // NVLS inside one node. All-reduce: each GPU pushes its whole buffer into the switch (which
    // sums) and pulls its reduced 1/n, then pushes that 1/n for the switch to multicast and
    // receives the whole result: S·(n+1)/n per direction, so algbw = η·B·n/(n+1); η is NCCL's
    // nvlsEfficiency. All-gather/reduce-scatter receive (n−1)/n·S: algbw = η·B·n/(n−1).
    const double algbw = op == CollectiveOp::all_reduce
                             ? t.nvls_efficiency * t.nvlink * n / (n + 1.0)
                             : t.nvls_efficiency * t.nvlink * n / (n - 1.0);
    const double lat_s = kNvlinkLatNvls * kUs;
    visit(Candidate{"NVLS", Simple, lat_s, lat_s + transfer_s(bus_bytes, algbw * f, Simple)});
  }

  if (t.nvls && t.ppn >= 2 && multi_node && op == CollectiveOp::all_reduce) {
    // NVLSTree: NVLS reduce-scatter in the node, a double binary tree across nodes on each GPU's
    // 1/ppn slice over its own NIC (two nodes: the slice crosses once each way; more: twice, as
    // an inner tree node sends to its parent and to its children), NVLS multicast back.
    const double intra = t.nvls_efficiency * t.nvlink * t.ppn / (t.ppn + 1.0);
    const double inter = t.ppn * t.nic / (t.nodes == 2 ? 1.0 : 2.0);
    const double algbw = std::min(intra, inter);
    const double lat_s =
        (kNvlinkLatNvls + 2 * log2_floor(t.nodes) * net_step_us(t, kNetLatNvlsTree, Simple)) * kUs;
    visit(Candidate{"NVLSTree", Simple, lat_s, lat_s + transfer_s(bus_bytes, algbw * f, Simple)});
  }

  if (t.ppn == 1 && multi_node &&
      (op == CollectiveOp::all_gather || op == CollectiveOp::reduce_scatter)) {
    // PAT (one GPU per node): logarithmic latency, 0.75 of the NIC bandwidth (tuning.cc).
    const double inter_us = net_step_us(t, kNetLatPat, Simple);
    const double lat_s = (kBaseLatPat + log2_floor(t.nodes) * (inter_us / 3.5) + n * 2.8) * kUs;
    visit(
        Candidate{"PAT", Simple, lat_s, lat_s + transfer_s(bus_bytes, t.nic * kPatFactor, Simple)});
  }

  if (op == CollectiveOp::all_to_all || op == CollectiveOp::send_recv) {
    // Point-to-point (NCCL does not tune it): LL below the per-peer threshold, else Simple; one
    // step of latency on the slowest link the transfer crosses.
    const double per_peer = op == CollectiveOp::all_to_all ? bytes / n : bytes;
    const int p = per_peer <= kP2pLlThresholdBytes ? LL : Simple;
    const double scale = p == LL ? kRingLlFactor : 1.0;
    double intra_bytes = 0, inter_bytes = 0;
    if (op == CollectiveOp::all_to_all) {
      // Each rank keeps 1/n, sends (ppn−1)/n over NVLink and (n−ppn)/n over its NIC (PXN routes
      // traffic to the right rail over NVLink first; the NIC is still the narrow part).
      intra_bytes = bytes * (t.ppn - 1) / n;
      inter_bytes = bytes * (n - t.ppn) / n;
    } else if (multi_node) {
      inter_bytes = bytes; // nccl-tests sendrecv: rank r → r+1; some pairs cross nodes
    } else {
      intra_bytes = bytes;
    }
    const double intra_us = intra_bytes > 0 ? kNvlinkLatRing[p] : 0;
    const double inter_us = inter_bytes > 0 ? net_step_us(t, kNetLatRing[p], p) : 0;
    const double lat_s = (kBaseLatRing[p] + std::max(intra_us, inter_us)) * kUs;
    const double move_s = std::max(transfer_s(intra_bytes, t.nvlink * scale, p),
                                   transfer_s(inter_bytes, t.nic * scale, p));
    visit(Candidate{"P2P", p, lat_s, lat_s + move_s});
  }
}

bool allowed(CollectiveAlgorithm want, const char* name) {
  return want == CollectiveAlgorithm::any || collective_algorithm_name(want) == name;
}

CollectiveCost cost_of(const Candidate& c, CollectiveOp op, double bytes, int ranks) {
  CollectiveCost out;
  out.time_s = c.time_s;
  out.algbw = bytes / c.time_s;
  out.busbw = out.algbw * busbw_factor(op, ranks);
  out.algorithm = c.algorithm;
  out.protocol = kProtocolName[static_cast<std::size_t>(c.protocol)];
  out.latency_s = c.latency_s;
  return out;
}

void check_bytes(double bytes) {
  if (!(bytes >= 0) || !std::isfinite(bytes))
    throw InputError(fmt::format("collective size must be a non-negative number of bytes "
                                 "(got {}).",
                                 bytes));
}

} // namespace

CollectiveOp parse_collective_op(std::string_view text) {
  for (CollectiveOp op :
       {CollectiveOp::all_gather, CollectiveOp::reduce_scatter, CollectiveOp::all_reduce,
        CollectiveOp::all_to_all, CollectiveOp::send_recv})
    if (collective_op_name(op) == text)
      return op;
  throw InputError(fmt::format("unknown collective '{}'; allowed: all_gather, reduce_scatter, "
                               "all_reduce, all_to_all, send_recv.",
                               text));
}

std::string_view collective_op_name(CollectiveOp op) {
  switch (op) {
  case CollectiveOp::all_gather:
    return "all_gather";
  case CollectiveOp::reduce_scatter:
    return "reduce_scatter";
  case CollectiveOp::all_reduce:
    return "all_reduce";
  case CollectiveOp::all_to_all:
    return "all_to_all";
  case CollectiveOp::send_recv:
    return "send_recv";
  }
  return "all_reduce";
}

CollectiveAlgorithm parse_collective_algorithm(std::string_view text) {
  for (CollectiveAlgorithm a :
       {CollectiveAlgorithm::any, CollectiveAlgorithm::ring, CollectiveAlgorithm::tree,
        CollectiveAlgorithm::nvls, CollectiveAlgorithm::nvls_tree, CollectiveAlgorithm::pat,
        CollectiveAlgorithm::p2p}) {
    const std::string_view name = collective_algorithm_name(a);
    if (name.size() == text.size() &&
        std::equal(name.begin(), name.end(), text.begin(), [](char x, char y) {
          return std::tolower(static_cast<unsigned char>(x)) ==
                 std::tolower(static_cast<unsigned char>(y));
        }))
      return a;
  }
  throw InputError(fmt::format("unknown collective algorithm '{}'; allowed: any, Ring, Tree, "
                               "NVLS, NVLSTree, PAT, P2P.",
                               text));
}

std::string_view collective_algorithm_name(CollectiveAlgorithm a) {
  switch (a) {
  case CollectiveAlgorithm::any:
    return "any";
  case CollectiveAlgorithm::ring:
    return "Ring";
  case CollectiveAlgorithm::tree:
    return "Tree";
  case CollectiveAlgorithm::nvls:
    return "NVLS";
  case CollectiveAlgorithm::nvls_tree:
    return "NVLSTree";
  case CollectiveAlgorithm::pat:
    return "PAT";
  case CollectiveAlgorithm::p2p:
    return "P2P";
  }
  return "any";
}

void check_group(const ClusterSpec& c, GroupShape g) {
  if (g.ranks_per_node < 1 || g.ranks_per_node > c.node.gpus_per_node)
    throw InputError(fmt::format("a group of {} ranks per node does not fit cluster '{}': ranks "
                                 "per node must be between 1 and its {} GPUs per node.",
                                 g.ranks_per_node, c.name, c.node.gpus_per_node));
  if (g.nodes < 1 || g.nodes > 1'000'000)
    throw InputError(
        fmt::format("a group must span between 1 and 1,000,000 nodes (got {}).", g.nodes));
}

GroupShape group_of(const ClusterSpec& c, int ranks, int ranks_per_node) {
  if (ranks < 1)
    throw InputError(fmt::format("--ranks must be a positive number of ranks (got {}).", ranks));
  if (ranks_per_node == 0)
    ranks_per_node = std::min(ranks, c.node.gpus_per_node);
  if (ranks_per_node < 1 || ranks_per_node > c.node.gpus_per_node)
    throw InputError(fmt::format("--ranks-per-node {} does not fit cluster '{}': it has {} GPUs "
                                 "per node.",
                                 ranks_per_node, c.name, c.node.gpus_per_node));
  if (ranks % ranks_per_node != 0)
    throw InputError(fmt::format("--ranks {} is not a multiple of --ranks-per-node {}; a group "
                                 "has the same number of ranks on every node.",
                                 ranks, ranks_per_node));
  const GroupShape g{ranks_per_node, ranks / ranks_per_node};
  check_group(c, g);
  return g;
}

double busbw_factor(CollectiveOp op, int ranks) {
  const double n = ranks;
  switch (op) {
  case CollectiveOp::all_reduce:
    return 2 * (n - 1) / n;
  case CollectiveOp::all_gather:
  case CollectiveOp::reduce_scatter:
  case CollectiveOp::all_to_all:
    return (n - 1) / n;
  case CollectiveOp::send_recv:
    return 1;
  }
  return 1;
}

CollectiveCost collective_cost(const ClusterSpec& c, const Calibration& calibration,
                               CollectiveOp op, double bytes, GroupShape group,
                               CollectiveAlgorithm algorithm) {
  check_group(c, group);
  check_bytes(bytes);
  const int n = group.ranks();
  if (n == 1 || bytes == 0)
    return CollectiveCost{0, 0, 0, "none", "", 0};
  if (algorithm == CollectiveAlgorithm::any)
    if (auto t = calibrated_collective_time_s(calibration, op, group, bytes)) {
      const double algbw = bytes / *t;
      return CollectiveCost{*t, algbw, algbw * busbw_factor(op, n), "calibrated", "", 0};
    }
  const Topology t = topology_of(c, group);
  Candidate best{nullptr, Simple, 0, std::numeric_limits<double>::infinity()};
  for_each_candidate(t, op, bytes, [&](const Candidate& cand) {
    if (allowed(algorithm, cand.algorithm) && cand.time_s < best.time_s)
      best = cand;
  });
  if (best.algorithm == nullptr) {
    std::string names;
    for_each_candidate(t, op, bytes, [&](const Candidate& cand) {
      if (names.find(cand.algorithm) == std::string::npos)
        names += (names.empty() ? "" : ", ") + std::string(cand.algorithm);
    });
    throw InputError(fmt::format("algorithm {} does not run {} on {} ranks per node × {} node{} "
                                 "of '{}'; available: {}.",
                                 collective_algorithm_name(algorithm), collective_op_name(op),
                                 group.ranks_per_node, group.nodes, group.nodes == 1 ? "" : "s",
                                 c.name, names));
  }
  return cost_of(best, op, bytes, n);
}

double hierarchical_dispatch_time_s(const ClusterSpec& c, double rdma_bytes, double nvlink_bytes,
                                    GroupShape group) {
  check_group(c, group);
  check_bytes(rdma_bytes);
  check_bytes(nvlink_bytes);
  if (group.ranks() == 1)
    return 0;
  // Across nodes DeepEP's internode kernels forward over NVLink at their share; inside one node
  // its intranode kernels move the copies GPU to GPU directly.
  const double rdma = group.nodes > 1 ? rdma_bytes / c.node.ep_rdma_bandwidth : 0;
  const double nvl = nvlink_bytes / (group.nodes > 1 ? c.node.ep_nvlink_bandwidth
                                                     : c.node.ep_nvlink_intranode_bandwidth);
  return std::max(rdma, nvl) + (group.nodes > 1 ? c.fabric.latency_s : 0);
}

std::vector<CollectiveCost> collective_candidates(const ClusterSpec& c, CollectiveOp op,
                                                  double bytes, GroupShape group) {
  check_group(c, group);
  check_bytes(bytes);
  std::vector<CollectiveCost> out;
  if (group.ranks() == 1 || bytes == 0)
    return out;
  for_each_candidate(topology_of(c, group), op, bytes, [&](const Candidate& cand) {
    out.push_back(cost_of(cand, op, bytes, group.ranks()));
  });
  std::stable_sort(out.begin(), out.end(),
                   [](const auto& a, const auto& b) { return a.time_s < b.time_s; });
  return out;
}

} // namespace mop::hw
