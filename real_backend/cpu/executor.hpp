#pragma once
// The CPU reference executor: plays a Plan's training step with real arithmetic on small shapes.
// Ranks are threads (real_backend/cpu/comm.hpp); each holds only its shards (TP heads and
// columns, EP experts, ETP expert columns, vocab-parallel embedding and LM head, ZeRO chunks)
// and its share of the tokens (data-parallel sequences, CP chunks, SP rows), and they talk
// through collectives with NCCL's semantics. The pipeline follows strategies/pipeline.hpp, the
// order the lowering writes into the Schedule. Every feature of a Plan therefore runs as the
// decomposition it describes, and its loss, gradients and updated parameters can be compared
// with the single-rank reference (real_backend/cpu/reference.hpp).
#include "real_backend/cpu/kernels.hpp"
#include "real_backend/cpu/tiny_model.hpp"
#include "strategies/plan.hpp"

#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace mop::real {

// Everything a checkpoint holds: parameters and AdamW moments in the layout of param_layout,
// and the optimizer steps taken so far (every parameter has taken the same number).
template <class T> struct TrainState {
  std::vector<std::vector<T>> params, adam_m, adam_v;
  std::int64_t step = 0;
};
template <class T> TrainState<T> initial_state(const TinyConfig& c, std::uint64_t seed);

struct RunOptions {
  int seq_len = 64;
  int steps = 1;
  AdamWParams adam;
  // Compare every step's loss and gradients, and the final parameters, with a single-rank
  // reference trained alongside in double precision.
  bool check = false;
};

struct OpTiming {
  std::int64_t count = 0;
  double seconds = 0; // summed over ranks, divided by the number of ranks
};

template <class T> struct RunResult {
  std::vector<double> losses;             // one per step (mean cross-entropy over the global batch)
  std::vector<double> step_time_s;        // wall time of each step
  std::map<std::string, OpTiming> ops;    // by op kind (gemm, attention_fwd, all_gather, ...)
  TrainState<T> state;                    // after the last step
  std::vector<std::vector<T>> last_grads; // the last step's reduced gradients, gathered
  // With RunOptions::check: the largest differences over all steps.
  double max_loss_rel_diff = 0;
  double max_grad_rel_diff = 0;  // per tensor: max |g - g_ref| / max |g_ref|
  double max_param_rel_diff = 0; // final parameters, same measure
};

// Throws InputError with one sentence when the executor cannot run the plan on this model and
// sequence length (a degree that does not divide the shapes, hybrid CP, ...). The plan must be
// complete (strategy::complete_plan).
void check_executable(const TinyConfig& c, const strategy::Plan& plan, int seq_len);

// Runs `options.steps` optimizer steps from `start` on plan.world threads; batch k of the run is
// data.batch(start.step + k, plan.global_batch, seq_len).
template <class T>
RunResult<T> run_plan(const TinyConfig& c, const strategy::Plan& plan, const DataSource& data,
                      const TrainState<T>& start, const RunOptions& options);

// Checkpoints of a TrainState: real_backend/cpu/checkpoint.hpp.

} // namespace mop::real
