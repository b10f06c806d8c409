#pragma once
// The calibration overlay: measured tables (a later `mop calibrate` writes them; a hand-made
// example is configs/calibration/example-h200.json) that override the model where they have
// data and fall back to it elsewhere. Schema: docs/CALIBRATION.md. An empty Calibration (the
// default) means the model everywhere.
#include "common/json_io.hpp"
#include "hw_models/cluster.hpp"
#include "hw_models/collective.hpp"
#include "hw_models/compute.hpp"
#include "hw_models/dtype.hpp"
#include "hw_models/memory_overheads.hpp"

#include <optional>
#include <string>
#include <vector>

namespace mop::hw {

struct GemmPoint {
  Dtype dtype = Dtype::bf16;
  int groups = 1; // > 1: a grouped GEMM of `groups` experts with m rows each
  double m = 0, n = 0, k = 0;
  double time_s = 0;
};

struct AttentionPoint {
  bool backward = false;
  AttentionShape shape;
  double time_s = 0;
};

struct CollectivePoint {
  CollectiveOp op = CollectiveOp::all_reduce;
  GroupShape group;
  double bytes = 0;
  double time_s = 0;
};

struct HostAdamPoint {
  int cores = 0; // per node
  double params_per_s = 0;
};

struct Calibration {
  std::string origin; // the file it came from
  std::vector<GemmPoint> gemm;
  std::vector<AttentionPoint> attention;
  std::vector<CollectivePoint> collectives;
  std::vector<HostAdamPoint> host_adam;
  std::optional<double> hbm_bytes_per_s; // memory-bound kernels
  std::optional<double> h2d_bytes_per_s; // pinned, one direction
  std::optional<double> d2h_bytes_per_s;
  std::optional<double> pcie_duplex_factor;      // both directions at once / one direction
  std::optional<double> nvlink_copy_bytes_per_s; // GPU→GPU copy engine
  std::optional<double> host_memory_bytes_per_s; // the host's memory, all cores streaming
  std::optional<double> kernel_launch_s;         // launch: GPU time of one empty kernel in a queue
  std::optional<double> host_launch_s;           // launch: CPU time of one kernel launch call
  MemoryOverheadOverrides overheads;
  // Where it was measured (`mop calibrate`: the GPU's name, SMs, memory, clock and the library
  // versions): an object kept as read, for provenance; it changes no prediction.
  Json device = Json::object();
  bool empty() const;
};

Calibration load_calibration(const std::string& path);
Calibration calibration_from_json(const Json& json, const std::string& origin);
// The file `calibration_from_json` reads back to an equal Calibration (`description` and
// `cluster` are written when given).
Json calibration_to_json(const Calibration& calibration, const std::string& description = "",
                         const std::string& cluster = "");

// The cluster with the calibration's measured launch cost and memory overheads in place of its
// own (the tables and bandwidths are looked up where they are priced).
ClusterSpec calibrated_cluster(ClusterSpec cluster, const Calibration& calibration);

// The lookups the cost functions use; nullopt where the calibration has no data for the key or
// the size lies outside its measured range. Between two measured sizes the achieved rate (FLOP/s,
// params/s) or, for collectives, the time is interpolated linearly; at a measured size the
// measured value comes back. A GEMM is looked up along m with n and k fixed, else along k with m
// and n fixed (weight gradients: k is the tokens), else along n with m and k fixed.
std::optional<double> calibrated_gemm_time_s(const Calibration& calibration, Dtype dtype,
                                             int groups, double m, double n, double k);
std::optional<double> calibrated_attention_time_s(const Calibration& calibration, bool backward,
                                                  const AttentionShape& shape);
std::optional<double> calibrated_collective_time_s(const Calibration& calibration, CollectiveOp op,
                                                   GroupShape group, double bytes);
std::optional<double> calibrated_host_adam_params_per_s(const Calibration& calibration, int cores);

} // namespace mop::hw
