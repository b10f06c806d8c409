#pragma once
// Playing a pipeline on chunks instead of ops (docs/SIMULATOR.md "Chunk replay").
//
// An interleaved 1F1B step of a deep pipeline is millions of ops (Llama-3.1-405B at PP 32 × VP 4
// with 512 micro-batches: 32 stages × 512 × 4 chunks × two passes of some 30 ops), and its
// steady state only starts about 2·pp micro-batches in, so neither extrapolation nor an in-run
// period spares simulating tens of micro-batches in full (a 1F1B pipeline's folded run still
// plays 2·pp + 4 of them). Yet a stage's chunks are made of a few
// distinct passes (a decoder layer of each kind, the embedding, the head and loss). The replay
// plays each distinct pass once on the event engine (forward and backward apart, so the ring
// hops and collectives inside a pass contend as they do in the Schedule), then plays every
// stage's chunks in its pipeline order as lower() places them:
// - a chunk lasts the sum of its passes' times, and cannot end before the stage's host has
//   issued its kernels (the host issues in program order and never waits: no host syncs);
// - a chunk that receives waits for the previous op on the stage's pipeline stream and for the
//   matching send; its send follows it on that stream;
// - after the last micro-batch's backward of a layer, its gradients' once-a-step reductions run
//   on their streams (each waiting for the one before it), then the optimizer step, then
//   ZeRO 1 and 2's parameter gathers.
// What it leaves out is contention across passes beyond the first-order slowdown it charges (a
// reduction or a send slowing the compute and the collectives it overlaps, as the engine shares
// the GPU). tests/planner/replay_test.cpp holds the step within 1 % of the full simulation.
#include "planner/evaluate.hpp"

namespace mop::planner {

// How far a replayed step (or a folded one, planner/fold.hpp) may lie from the engine's
// (tests/planner/replay_test.cpp and fold_test.cpp hold it): the search lowers such a plan's
// bound by as much, so that pruning stays exact.
inline constexpr double kReplayTolerance = 0.01;

// The plan's step, played on chunks; the plan must be strategy::chunk_replayable (1F1B or
// interleaved 1F1B, pp > 1). The result
// has no Schedule and no rank classes (the analytic memory model gives the memory):
// step_time_s, the critical stage's breakdown, the tokens and model FLOPs of the step;
// micro_batches_simulated is 0.
StepEvaluation replay_step(const strategy::Plan& plan, const strategy::LoweringContext& ctx,
                           const hw::ClusterSpec& cluster, const hw::Calibration& calibration);

// A step as the search evaluates it: replayed on chunks when strategy::chunk_replayable, else
// played on the event engine (evaluate_step with at most `max_simulated` micro-batches, no
// structural check), its repeated layers folded where they settle (fold_layers) unless `fold`
// is false. `replayed` says whether it was replayed.
StepEvaluation evaluate_for_search(const strategy::Plan& plan, const strategy::LoweringContext& ctx,
                                   const hw::ClusterSpec& cluster,
                                   const hw::Calibration& calibration, int max_simulated,
                                   bool* replayed = nullptr, bool fold = true);

// Whether evaluate_for_search may replay or fold the plan's step rather than play it whole.
bool approximated_for_search(const strategy::Plan& plan, const strategy::LoweringContext& ctx);

} // namespace mop::planner
