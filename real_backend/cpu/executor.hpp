#pragma once
// The CPU reference executor: plays a Plan's training step with real arithmetic on small shapes.
// Ranks are threads (real_backend/cpu/comm.hpp); each holds only its shards (TP heads and
// columns, EP experts, ETP expert columns, vocab-parallel embedding and LM head, ZeRO chunks)
// and its share of the tokens (data-parallel sequences, CP chunks, SP rows), and they talk
// through collectives with NCCL's semantics. The pipeline follows strategies/pipeline.hpp, the
// order the lowering writes into the Schedule. Every feature of a Plan therefore runs as the
// decomposition it describes, and its loss, gradients and updated parameters can be compared
// with the single-rank reference (real_backend/cpu/reference.hpp).
#include "real_backend/cpu/training.hpp"
#include "strategies/plan.hpp"

#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace mop::real {

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
