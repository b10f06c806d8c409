#pragma once
// Least-loaded rebalancing of one MoE layer's routed tokens over its expert-parallel ranks
// (LLEP, Nguyen et al., "Least-Loaded Expert Parallelism", arXiv 2601.17111): when the most
// loaded rank holds more than `threshold` times the mean, experts are taken hottest first
// (longest processing time first) and each keeps on its owner what fits under a per-rank
// capacity of `capacity` times the mean; the rest of its tokens spill, with a copy of the
// expert's weights, to the least-loaded other ranks, the owner's node first. The math is
// unchanged: a spilled token meets the same expert's weights on another rank, and the copy's
// gradient returns to the owner.
//
// One function decides for the simulator (expected loads, real-valued tokens) and for the
// executors (counted tokens, whole numbers): every rank computes the same assignment from the
// same global counts. Experts sit in contiguous blocks of experts/ep per rank
// (strategies/routing.hpp). An expert's tokens are taken in a fixed global order (the rows
// each expert-parallel rank sends it, source rank by source rank), and the assignment cuts that
// order into contiguous ranges: the owner's first, then each helper's.
#include <cstdint>
#include <vector>

namespace mop::workload {

struct RebalanceOptions {
  double threshold = 1.3; // λ: rebalance only when max rank tokens > λ · mean
  double capacity = 1.1;  // α: a rank takes at most α · mean tokens (1 <= α)
  double min_tokens = 1024; // m: a helper's share smaller than this is avoided (one GEMM's worth)
  int ranks_per_node = 1;   // expert-parallel ranks on one node: helpers there are tried first
  bool whole = false;       // token counts are whole numbers: the capacity rounds up
};

// An expert's tokens [begin, end) in its global order, computed on `rank`.
struct Segment {
  int expert = 0;
  int rank = 0;
  double begin = 0;
  double end = 0;
  double tokens() const { return end - begin; }
};

struct Rebalanced {
  bool triggered = false;
  double capacity = 0;              // the per-rank capacity used (0 when not triggered)
  std::vector<Segment> segments;    // by expert, each expert's in token order, owner first
  std::vector<double> rank_tokens;  // per rank, after the assignment
};

// The assignment for tokens per expert `expert_tokens` (all >= 0) over `ep` ranks; the experts
// divide evenly over the ranks. Without rebalancing (not triggered), each expert with tokens is
// one segment on its owner. With it, every rank ends at or below the capacity: ⌈α · mean⌉ for
// whole counts, α · mean otherwise.
Rebalanced least_loaded(const std::vector<double>& expert_tokens, int ep,
                        const RebalanceOptions& options);

// The owner of `expert` among `ep` ranks holding `experts` experts in contiguous blocks.
inline int expert_owner(std::int64_t expert, std::int64_t experts, int ep) {
  return static_cast<int>(expert / (experts / ep));
}

} // namespace mop::workload
