#pragma once
// Predicted against measured: each row of a dataset becomes a fixed plan (its published
// degrees), is simulated, and each measured metric is compared.
#include "planner/evaluate.hpp"
#include "validation/dataset.hpp"

#include <optional>
#include <string>
#include <vector>

namespace mop::validation {

struct Point {
  std::string id;
  std::string metric; // the dataset's measured key
  double measured = 0;
  std::optional<double> predicted; // in the same unit; empty when mop cannot predict the row
  double rel_error = 0;            // (predicted - measured) / measured
  std::string reason;              // why not predicted
  bool moe = false;
  bool time_like = true; // tokens/s, step time, TFLOPS, MFU; false for peak memory
};

struct Report {
  std::vector<Point> points;
  // Mean absolute percentage errors (fractions) over predicted points; NaN when none.
  double mape_time = 0, mape_memory = 0;
  double mape_time_dense = 0, mape_time_moe = 0, mape_memory_dense = 0, mape_memory_moe = 0;
  int rows = 0, rows_predicted = 0;
  int rows_predicted_by_program = 0; // of rows_predicted, those the program lowering priced
};

// `lowering`: which lowering writes the Schedules the rows are predicted from.
Report validate(const std::vector<Row>& rows,
                planner::Lowering lowering = planner::Lowering::cost_only);

} // namespace mop::validation
