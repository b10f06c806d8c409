#pragma once
// The CPU interpreter: runs an executable Schedule (sim/schedule.hpp) with real arithmetic, one
// thread per rank, or one process per rank (a World of processes). Each rank binds its coordinates in the Schedule's mesh, finds its rank class
// (its pipeline stage), builds its communicators from the groups' specs, binds its parameter
// slices and ZeRO shards from the full training state, and walks its class's program op by op:
// allocating and freeing tensors where the Schedule says, calling the CPU kernels
// (real_backend/cpu/kernels.hpp) and the in-process collectives (real_backend/cpu/comm.hpp);
// pipeline sends and recvs go to the rank at its place in the peer class's stage. It knows no Plan:
// what it runs is what the simulator prices.
#include "real_backend/cpu/comm.hpp"
#include "real_backend/cpu/training.hpp"
#include "sim/schedule.hpp"

namespace mop::real {

// Throws InputError with one sentence when the Schedule holds something this interpreter cannot
// run: a cost-only op (Kernel::none), or a parameter the model does not have.
void check_interpretable(const sim::Schedule& s, const TinyConfig& c);

// Runs `options.steps` optimizer steps of the Schedule from `start`; batch k of the run is
// data.batch(start.step + k, tokens.global_batch, tokens.seq_len). RunResult::ops counts what
// ran per op kind (summed over ranks), `scheduled` what the Schedule holds, and with
// options.trace every rank's executed ops. With `process` (a world of processes,
// comm.hpp), this process runs that world's rank only and the ranks gather the result over it:
// every process returns the whole result (options.trace is refused there); without it every rank
// runs as a thread of this process.
template <class T>
RunResult<T> interpret(const sim::Schedule& s, const TinyConfig& c, const DataSource& data,
                       const TrainState<T>& start, const RunOptions& options,
                       World* process = nullptr);

// The key an op is counted under: its collective's kind, or its kernel.
std::string op_count_key(const sim::Op& op);

} // namespace mop::real
