#pragma once
// Predicted against measured: each row of a dataset becomes a fixed plan (its published
// degrees), is simulated, and each measured metric is compared. Time is scored in one unit,
// tokens per second per GPU (docs/VALIDATION.md): a row's published step time or TFLOPS is
// converted with the row's own global batch or FLOP convention, so that sources counting FLOPs
// differently are scored alike and a row reporting two metrics counts once.
#include "hw_models/calibration.hpp"
#include "planner/evaluate.hpp"
#include "validation/dataset.hpp"

#include <optional>
#include <string>
#include <vector>

namespace mop::validation {

// What a point is grouped by (Report::groups).
struct RowFacts {
  bool moe = false;
  std::string framework;
  std::string gpu;
  std::int64_t seq = 0;
};

// One measured metric of a row, as published, against mop's prediction in the same unit
// (TFLOPS and MFU in mop's causal FLOP convention: informative, not scored).
struct Point {
  std::string id;
  std::string metric; // the dataset's measured key
  double measured = 0;
  std::optional<double> predicted; // in the same unit; empty when mop cannot predict the row
  double rel_error = 0;            // (predicted - measured) / measured
  std::string reason;              // why not predicted
  bool moe = false;
  bool time_like = true; // tokens/s, step time, TFLOPS, MFU; false for peak memory
  RowFacts row;
};

// A row's time score: tokens/s per GPU, measured or derived from the first of step_time_s
// (with the global batch), tflops_per_gpu (with the source's FLOP convention) and mfu (against
// the GPU's dense BF16 peak) the row reports.
struct Score {
  std::string id;
  std::string derived_from; // the measured metric converted ("tokens_per_sec_per_gpu": none)
  std::optional<double> measured; // tokens/s per GPU; empty when the metric cannot be converted
  std::optional<double> predicted;
  double rel_error = 0;
  std::string reason; // why not scored
  RowFacts row;
};

// Mean absolute percentage error of one group of scores or memory points.
struct Group {
  std::string key; // "time", "time/moe", "time/framework/torchtitan", "memory/gpu/H100", ...
  int points = 0;
  double mape = 0; // a fraction
};

struct Report {
  std::vector<Point> points;
  std::vector<Score> scores;
  std::vector<Group> groups; // every non-empty group (group_keys), in key order
  // Mean absolute percentage errors (fractions) of the time scores and the peak-memory points;
  // NaN when a group is empty.
  double mape_time = 0, mape_memory = 0;
  double mape_time_dense = 0, mape_time_moe = 0, mape_memory_dense = 0, mape_memory_moe = 0;
  int rows = 0, rows_predicted = 0;
  int rows_predicted_by_program = 0; // of rows_predicted, those the program lowering priced
};

// The groups a scored point (time) or a memory point belongs to: all, dense or MoE, the
// framework, the GPU type and the context band (≤ 8K, 16–32K, 64–128K, > 128K).
std::vector<std::string> group_keys(const std::string& kind, const RowFacts& row);

// Training FLOPs per token the way a source counts them: mop's model FLOPs (causal) plus, for
// the "full" convention, the attention score and value products of the pairs a causal (or
// windowed) mask drops. Forward and backward, no recompute.
double source_flops_per_token(const workload::ModelSpec& m, std::int64_t seq,
                              double mop_flops_per_token, const std::string& convention);

// The simulation behind a row's prediction (its translation must hold a plan): the Schedule,
// the engine's result and the step, as `validate` scores them.
planner::StepEvaluation evaluate_row(const Row& row, const Translation& t,
                                     planner::Lowering lowering = planner::Lowering::cost_only,
                                     const hw::Calibration& calibration = {});

// `lowering`: which lowering writes the Schedules the rows are predicted from; `calibration`:
// the hardware model's measured corrections (mop calibrate), none by default.
Report validate(const std::vector<Row>& rows,
                planner::Lowering lowering = planner::Lowering::cost_only,
                const hw::Calibration& calibration = {});

} // namespace mop::validation
