#pragma once
// The seed paper's claims (Mixture-of-Parallelisms), checked by mop's own predictions: for a
// model on N nodes of a cluster, (1) does a `mop`-family plan train at 1M tokens of context,
// (2) where does the best FSDP2 plan stop fitting (with torchtitan's TP and CP, and as a plain
// FSDP2 baseline runs: FSDP and EP only, one sequence per GPU), (3) the per-GPU throughput ratio of
// the best mop plan to the best FSDP2 plan at each context length where both fit, and how it moves
// with the number of nodes.
#include "hw_models/cluster.hpp"
#include "planner/search.hpp"
#include "workload/model_spec.hpp"

#include <optional>
#include <string>
#include <vector>

namespace mop::validation {

struct ClaimPoint {
  std::int64_t seq = 0;
  int nodes = 0;
  std::optional<planner::RankedPlan> mop;         // best fitting mop-family plan
  std::optional<planner::RankedPlan> fsdp2;       // best fitting fsdp2-family plan (CP allowed)
  std::optional<planner::RankedPlan> fsdp2_no_cp; // best fitting fsdp2 plan without TP or CP
  std::string fsdp2_no_cp_why;                    // what runs out first when it does not fit
};

struct ClaimsReport {
  std::string model;
  std::string cluster;
  int nodes = 0;
  std::vector<ClaimPoint> by_seq;   // at `nodes`
  std::vector<ClaimPoint> by_nodes; // at `scale_seq`
  std::int64_t scale_seq = 0;
};

struct ClaimsOptions {
  std::vector<std::int64_t> seqs = {std::int64_t{32} << 10, std::int64_t{64} << 10,
                                    std::int64_t{128} << 10, std::int64_t{256} << 10,
                                    std::int64_t{1} << 20};
  std::vector<int> scale_nodes = {4, 8, 12};
  std::int64_t scale_seq = std::int64_t{128} << 10;
  int max_simulations = 120; // per search
  int threads = 2;
};

ClaimsReport check_claims(const workload::ModelSpec& model, const hw::ClusterSpec& cluster,
                          int nodes, const ClaimsOptions& options = {});

} // namespace mop::validation
