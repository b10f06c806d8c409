#pragma once
// NCCL collectives over a group of ranks laid out on the cluster (ranks per node × nodes).
// Shaped like NCCL's own tuner (src/graph/tuning.cc): per algorithm and protocol, a latency plus
// bytes over a bandwidth, and the algorithm NCCL would pick is the one this model finds fastest.
// Sizes and bandwidths follow nccl-tests (doc/PERFORMANCE.md): `bytes` is the "size" column,
// algbw = size / time, busbw = algbw × busbw_factor(op, ranks). docs/HARDWARE.md has the formulas.
#include <string>
#include <string_view>
#include <vector>

namespace mop::hw {

struct ClusterSpec;
struct Calibration;

enum class CollectiveOp { all_gather, reduce_scatter, all_reduce, all_to_all, send_recv };

// "all_gather", "reduce_scatter", "all_reduce", "all_to_all" or "send_recv"; anything else is an
// InputError listing them.
CollectiveOp parse_collective_op(std::string_view text);
std::string_view collective_op_name(CollectiveOp op);

// NCCL_ALGO's choices that this model knows; `any` lets the model pick, as NCCL does.
enum class CollectiveAlgorithm { any, ring, tree, nvls, nvls_tree, pat, p2p };
CollectiveAlgorithm parse_collective_algorithm(std::string_view text);
std::string_view collective_algorithm_name(CollectiveAlgorithm algorithm);

struct GroupShape {
  int ranks_per_node = 1;
  int nodes = 1;
  int ranks() const { return ranks_per_node * nodes; }
};

// InputError unless 1 <= ranks_per_node <= gpus_per_node and nodes >= 1.
void check_group(const ClusterSpec& cluster, GroupShape group);
// The group of `ranks` ranks with `ranks_per_node` per node (0: min(ranks, gpus_per_node)), as
// `mop hw collective` takes it; InputError when ranks is not a multiple of ranks_per_node.
GroupShape group_of(const ClusterSpec& cluster, int ranks, int ranks_per_node);

// nccl-tests doc/PERFORMANCE.md: busbw = algbw × factor; all_reduce 2(n−1)/n, all_gather,
// reduce_scatter and all_to_all (n−1)/n, send_recv 1.
double busbw_factor(CollectiveOp op, int ranks);

struct CollectiveCost {
  double time_s = 0;
  double algbw = 0;      // bytes / time_s, bytes/s
  double busbw = 0;      // algbw × busbw_factor, bytes/s
  std::string algorithm; // "Ring", "Tree", "NVLS", "NVLSTree", "PAT", "P2P", "calibrated"
  std::string protocol;  // "LL", "LL128", "Simple" ("" when calibrated)
  double latency_s = 0;  // the size-independent part of time_s
};

// Time of one collective of `bytes` (nccl-tests size: the whole buffer per rank; for all_gather
// and reduce_scatter the gathered total) over `group`. A calibration point for the same op and
// group shape overrides the model within its measured size range. A group of one rank costs 0.
CollectiveCost collective_cost(const ClusterSpec& cluster, const Calibration& calibration,
                               CollectiveOp op, double bytes, GroupShape group,
                               CollectiveAlgorithm algorithm = CollectiveAlgorithm::any);

// A MoE dispatch or combine by DeepEP's normal kernels over `group`: each token crosses to every
// remote node holding one of its experts once (`rdma_bytes` per rank), and reaches every other
// GPU holding one once (`nvlink_bytes`), at the internode kernels' NVLink share across nodes or
// the intranode kernels' rate inside one; the slower domain sets the time, plus the fabric's
// latency across nodes (docs/HARDWARE.md "Hierarchical dispatch").
double hierarchical_dispatch_time_s(const ClusterSpec& cluster, double rdma_bytes,
                                    double nvlink_bytes, GroupShape group);

// Every algorithm/protocol the model considers for this call, fastest first
// (NCCL_DEBUG_SUBSYS=TUNING prints the same table); the calibration is not consulted.
std::vector<CollectiveCost> collective_candidates(const ClusterSpec& cluster, CollectiveOp op,
                                                  double bytes, GroupShape group);

} // namespace mop::hw
