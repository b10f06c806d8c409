#pragma once
// What a CPU training run starts from and reports: the training state (what a checkpoint
// holds), the run's options and results, and the single-rank reference trained alongside for
// --check.
#include "real_backend/cpu/kernels.hpp"
#include "real_backend/cpu/reference.hpp"
#include "real_backend/cpu/tiny_model.hpp"
#include "sim/result.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
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
// The model's initial parameters (init_params) and zero moments, at step 0.
template <class T> TrainState<T> initial_state(const TinyConfig& c, std::uint64_t seed) {
  TrainState<T> s;
  s.params = init_params<T>(c, seed);
  for (const auto& v : s.params) {
    s.adam_m.emplace_back(v.size(), T(0));
    s.adam_v.emplace_back(v.size(), T(0));
  }
  return s;
}

struct RunOptions {
  int seq_len = 64;
  int steps = 1;
  AdamWParams adam;
  // Compare every step's loss and gradients, and the final parameters, with a single-rank
  // reference trained alongside in double precision.
  bool check = false;
  bool trace = false; // interpreter: record every rank's executed ops (RunResult::trace)
  // interpreter: when each op of the last step started and ended on every rank, and the rank's
  // live HBM bytes after it (RunResult::timeline, memory_timeline): the measured trace.
  bool timeline = false;
};

// One op as a rank ran it: its kind (op_count_key), its communicator (-1 for none) and the
// bytes it read and wrote, or for a collective moved (nccl-tests' size), from the buffers it
// actually used, counted in the Schedule's dtypes.
struct ExecutedOp {
  std::string kind;
  int group = -1;
  double bytes = 0;
  bool operator==(const ExecutedOp&) const = default;
};

struct OpTiming {
  std::int64_t count = 0;
  double seconds = 0; // summed over ranks, divided by the number of ranks
};

template <class T> struct RunResult {
  std::vector<double> losses;          // one per step (mean cross-entropy over the global batch)
  std::vector<double> step_time_s;     // wall time of each step
  std::map<std::string, OpTiming> ops; // by op kind (gemm, attention_fwd, all_gather, ...)
  // Interpreting a Schedule: how many ops of each kind the Schedule holds for the whole world
  // (beside `ops`' counts of what ran), each rank's peak live bytes (as the Schedule's dtypes
  // count them), and with RunOptions::trace each rank's executed ops in order.
  std::map<std::string, std::int64_t> scheduled;
  std::vector<double> peak_bytes;
  std::vector<std::vector<ExecutedOp>> trace;
  // Routing-dependent sizes (sim::RuntimeRows): [rank][step][tensor] the rows each runtime-rows
  // tensor of the rank's class had in that step (-1 for static tensors). Recorded with trace.
  std::vector<std::vector<std::vector<std::int64_t>>> runtime_rows;
  // With RunOptions::timeline: [rank][op of its class] the op's start and end in the last step,
  // seconds from the earliest start over all ranks (an op the step did not run, an update
  // deferred past a one-step run, stays at 0 with no duration), and [rank] the live HBM bytes
  // after each op it ran, in order.
  std::vector<std::vector<sim::OpTiming>> timeline;
  std::vector<std::vector<sim::MemorySample>> memory_timeline;
  TrainState<T> state;                    // after the last step
  std::vector<std::vector<T>> last_grads; // the last step's reduced gradients, gathered
  // With RunOptions::check: the largest differences over all steps.
  double max_loss_rel_diff = 0;
  double max_grad_rel_diff = 0;  // per tensor: max |g - g_ref| / max |g_ref|
  double max_param_rel_diff = 0; // final parameters, same measure
};

// The single-rank reference, trained alongside: reference_step for the loss and gradients, the
// same AdamW on whole tensors.
template <class T> class ReferenceTrainer {
public:
  ReferenceTrainer(const TinyConfig& c, const TrainState<T>& start, const AdamWParams& adam)
      : c_(c), state_(start), adam_(adam) {}
  double step(const Batch& batch) {
    const double loss = reference_step<T>(c_, state_.params, batch, &grads_);
    state_.step += 1;
    for (std::size_t i = 0; i < state_.params.size(); ++i)
      adamw<T>(state_.params[i].size(), adam_, state_.step, state_.params[i].data(),
               grads_[i].data(), state_.adam_m[i].data(), state_.adam_v[i].data());
    return loss;
  }
  const std::vector<std::vector<T>>& grads() const { return grads_; }
  const TrainState<T>& state() const { return state_; }

private:
  const TinyConfig& c_;
  TrainState<T> state_;
  AdamWParams adam_;
  std::vector<std::vector<T>> grads_;
};

template <class A, class B>
double max_rel_diff(const std::vector<std::vector<A>>& got,
                    const std::vector<std::vector<B>>& want) {
  double worst = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    double scale = 0, diff = 0;
    for (std::size_t k = 0; k < want[i].size(); ++k) {
      scale = std::max(scale, std::abs(static_cast<double>(want[i][k])));
      diff = std::max(diff,
                      std::abs(static_cast<double>(got[i][k]) - static_cast<double>(want[i][k])));
    }
    worst = std::max(worst, diff / std::max(scale, 1e-30));
  }
  return worst;
}

template <class T> TrainState<double> to_double(const TrainState<T>& s) {
  auto conv = [](const std::vector<std::vector<T>>& v) {
    std::vector<std::vector<double>> out;
    for (const auto& x : v)
      out.emplace_back(x.begin(), x.end());
    return out;
  };
  return {conv(s.params), conv(s.adam_m), conv(s.adam_v), s.step};
}

} // namespace mop::real
