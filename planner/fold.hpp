#pragma once
// Folding a model's repeated layers (docs/SIMULATOR.md "Folded layers").
//
// Without a pipeline, a step is one long program through every layer: Kimi-K2 at 1M tokens is
// 61 layers, 60 of them alike, some 15 K ops however few its micro-batches. Where a run of
// identical layers repeats, each further layer adds the same time once the program has
// settled: the next layer's parameters are gathered, its activations saved, offloaded and
// reloaded, its gradients reduced exactly as the previous one's, one period later. So the step
// is played on models whose run is cut to n = 2, 3 and 4 layers and extrapolated to the run's
// length R: T(R) = T(4) + (R - 4)·(T(4) - T(3)), each part of the breakdown and the model's FLOPs
// likewise. The third run checks the first two: when T(4) - T(3) differs from T(3) - T(2) the
// program has not settled in so few layers, and 3, 4 and 5 layers are tried; nor may a stream
// or the host fall behind the compute stream's pace (a queue that grows with depth). Where the
// plan has not settled, it is played in full.
//
// Memory folds the same way, but not as one number: a rank's peak is the largest of several
// moments whose heights grow at different rates with depth (a transient in the first layers
// against every layer's saved activations at the turn to backward), so the peak of a short
// model says little about the full one. The engine keeps the peak reached while each piece of
// the program allocates (sim::ClassMemory::by_layer: one layer's stretch of ops, a forward or a
// backward of a micro-batch); pieces of the layers before the run and of its first half keep
// their place counted from the model's start, those of its second half and after it from the
// end, and each such moment is linear in the run's length. The layers in the middle of the
// full run lie between its ends (each holds one more layer's state than the one before), so
// the largest extrapolated moment is the peak. tests/planner/fold_test.cpp holds step and peak
// to the full simulation.
#include "planner/evaluate.hpp"

#include <optional>

namespace mop::planner {

// The longest run of identical consecutive layers (same MLP kind and attention window).
struct LayerRun {
  int begin = 0;
  int length = 0;
};

// The run the plan's step folds, when it has one: a single pipeline stage, routing the same
// for every layer (no expert-load trace), and a run of at least 12 identical layers.
std::optional<LayerRun> foldable_layers(const strategy::Plan& plan,
                                        const strategy::LoweringContext& ctx);

// Why a step was not folded.
enum class Unfolded {
  no_run,      // no foldable run (foldable_layers)
  not_linear,  // the three short models' steps or memory pieces do not lie on a line
  drifts,      // a stream falls behind the compute stream's pace (a queue growing with depth)
  host_behind, // the host issues a layer's kernels slower than the GPU runs them
};

// The plan's step with its run of layers folded (evaluate_step on the short models, at most
// `max_simulated` micro-batches each, no structural check); std::nullopt when the plan has no
// such run or the short models show it has not settled (`why` says which). The result's
// Schedule and per-op times are those of the longest short model; step time, breakdown, model FLOPs
// and each class's memory peak (peak_hbm_bytes, at_peak, peak_host_bytes) are the full model's.
std::optional<StepEvaluation> fold_layers(const strategy::Plan& plan,
                                          const strategy::LoweringContext& ctx,
                                          const hw::ClusterSpec& cluster,
                                          const hw::Calibration& calibration, int max_simulated,
                                          Unfolded* why = nullptr);

} // namespace mop::planner
