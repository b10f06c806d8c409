// mop validate's comparison on the shipped dataset: every row accounted for, every error held to
// the bound recorded in validation/data/bounds.json (docs/VALIDATION.md; tools/tighten-bounds
// lowers them as mop improves).
#include "common/json_io.hpp"
#include "tests/support/approx.hpp"
#include "validation/compare.hpp"

#include <cmath>
#include <doctest/doctest.h>
#include <map>
#include <set>
#include <string>

using namespace mop::validation;

TEST_CASE("every measured value of the dataset is a point, predicted or with a reason" *
          doctest::test_suite("plumbing")) {
  const std::vector<Row> rows = read_dataset(default_dataset_path());
  const Report r = validate(rows);
  std::size_t measured = 0;
  for (const Row& row : rows)
    measured += row.measured.size();
  CHECK(r.points.size() == measured);
  for (const Point& p : r.points) {
    CAPTURE(p.id);
    CHECK(p.predicted.has_value() == p.reason.empty());
    if (p.predicted)
      CHECK(p.rel_error == mop::test::rel((*p.predicted - p.measured) / p.measured));
  }
  CHECK(r.rows_predicted >= 60);
}

namespace {

// validation/data/bounds.json: per point, per source group and per overall MAPE, the |relative
// error| recorded when the bound was last tightened and the bound itself (docs/VALIDATION.md).
const mop::Json& bounds() {
  static const mop::Json b = mop::read_json_file(MOP_SOURCE_DIR "/validation/data/bounds.json");
  return b;
}

// The same groups as tools/tighten-bounds: metric kind, dense or MoE, and the row's framework.
std::string group_of(const Point& p, const std::map<std::string, std::string>& framework) {
  return std::string(p.time_like ? "time/" : "memory/") + (p.moe ? "moe/" : "dense/") +
         framework.at(p.id);
}

} // namespace

TEST_CASE("every predicted point stays within its recorded error bound" *
          doctest::test_suite("fitted")) {
  // A regression guard, no accuracy claim: each bound is the error recorded on this dataset plus
  // a small margin. A new row needs a bound (tools/tighten-bounds adds it); a row that stops
  // being predicted fails here too.
  const Report r = validate(read_dataset(default_dataset_path()));
  const mop::Json& points = bounds().at("points");
  std::set<std::string> seen;
  for (const Point& p : r.points) {
    const std::string key = p.id + "/" + p.metric;
    CAPTURE(key);
    if (!p.predicted)
      continue;
    seen.insert(key);
    REQUIRE_MESSAGE(points.contains(key), "no bound recorded: run tools/tighten-bounds");
    const double bound = points.at(key).at("bound").get<double>();
    CAPTURE(p.rel_error);
    CHECK(std::fabs(p.rel_error) <= bound);
  }
  for (const auto& item : points.items()) {
    const std::string& key = item.key();
    CAPTURE(key);
    CHECK_MESSAGE(seen.contains(key), "a bounded point is no longer predicted");
  }
}

TEST_CASE("each source's MAPE and the overall MAPEs stay within their recorded bounds" *
          doctest::test_suite("fitted")) {
  const std::vector<Row> rows = read_dataset(default_dataset_path());
  const Report r = validate(rows);
  std::map<std::string, std::string> framework;
  for (const Row& row : rows)
    framework[row.id] = row.framework;
  std::map<std::string, std::pair<double, int>> sums;
  for (const Point& p : r.points)
    if (p.predicted) {
      auto& [sum, n] = sums[group_of(p, framework)];
      sum += std::fabs(p.rel_error);
      ++n;
    }
  std::map<std::string, double> mape;
  for (const auto& [group, sn] : sums)
    mape[group] = sn.first / sn.second;
  mape["mape_time"] = r.mape_time;
  mape["mape_time_dense"] = r.mape_time_dense;
  mape["mape_time_moe"] = r.mape_time_moe;
  mape["mape_memory"] = r.mape_memory;
  mape["mape_memory_dense"] = r.mape_memory_dense;
  const mop::Json& groups = bounds().at("groups");
  for (const auto& entry : mape) {
    const auto& group = entry.first;
    const auto& value = entry.second;
    CAPTURE(group);
    CAPTURE(value);
    if (std::isnan(value))
      continue;
    REQUIRE_MESSAGE(groups.contains(group), "no bound recorded: run tools/tighten-bounds");
    CHECK(value <= groups.at(group).at("bound").get<double>());
  }
}

TEST_CASE("dense Megatron pre-training rows land close: Llama 3 on H100 with FP8" *
          doctest::test_suite("independent")) {
  // Megatron-Bridge 25.11, DGX-H100: 8B 14,451, 70B 1,602, 405B 292 tokens/s/GPU. These are the
  // best-understood rows (no framework overheads beyond Megatron's); within 10 % each.
  const Report r = validate(read_dataset(default_dataset_path()));
  int checked = 0;
  for (const Point& p : r.points) {
    if (p.metric != "tokens_per_sec_per_gpu" || !p.predicted)
      continue;
    if (p.id == "mb2511-h100-llama3-8b-fp8cs" || p.id == "mb2511-h100-llama3-70b-fp8cs" ||
        p.id == "mb2511-h100-llama31-405b-fp8cs") {
      CAPTURE(p.id);
      CHECK(std::fabs(p.rel_error) < 0.10);
      ++checked;
    }
  }
  CHECK(checked == 3);
}
