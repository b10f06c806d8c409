// mop validate's comparison on the shipped dataset: every row accounted for, every error held to
// the bound recorded in validation/data/bounds.json (docs/VALIDATION.md; tools/tighten-bounds
// lowers them as mop improves).
#include "common/json_io.hpp"
#include "tests/support/approx.hpp"
#include "validation/compare.hpp"
#include "workload/catalog.hpp"
#include "workload/flops.hpp"

#include <cmath>
#include <doctest/doctest.h>
#include <map>
#include <set>
#include <string>

namespace validation_compare_test {

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

// validation/data/bounds.json: per scored point, per group and per overall MAPE, the |relative
// error| recorded when the bound was last tightened and the bound itself (docs/VALIDATION.md).
const mop::Json& bounds() {
  static const mop::Json b = mop::read_json_file(MOP_SOURCE_DIR "/validation/data/bounds.json");
  return b;
}

} // namespace

TEST_CASE("every row with a time metric has one tokens/s score, scored or with a reason" *
          doctest::test_suite("plumbing")) {
  const std::vector<Row> rows = read_dataset(default_dataset_path());
  const Report r = validate(rows);
  std::size_t timed = 0;
  for (const Row& row : rows)
    for (const auto& item : row.measured.items())
      if (item.key() != "peak_mem_gib") {
        ++timed;
        break;
      }
  CHECK(r.scores.size() == timed);
  for (const Score& s : r.scores) {
    CAPTURE(s.id);
    CHECK(s.predicted.has_value() == s.reason.empty());
    if (s.predicted)
      CHECK(s.rel_error == mop::test::rel((*s.predicted - *s.measured) / *s.measured));
  }
}

TEST_CASE("every scored point stays within its recorded error bound" *
          doctest::test_suite("fitted")) {
  // A regression guard, no accuracy claim: each bound is the error recorded on this dataset plus
  // a small margin. A new row needs a bound (tools/tighten-bounds adds it); a row that stops
  // being predicted fails here too.
  const Report r = validate(read_dataset(default_dataset_path()));
  const mop::Json& points = bounds().at("points");
  std::set<std::string> seen;
  auto check = [&](const std::string& key, double rel_error) {
    CAPTURE(key);
    CAPTURE(rel_error);
    seen.insert(key);
    REQUIRE_MESSAGE(points.contains(key), "no bound recorded: run tools/tighten-bounds");
    CHECK(std::fabs(rel_error) <= points.at(key).at("bound").get<double>());
  };
  for (const Score& s : r.scores)
    if (s.predicted)
      check(s.id + "/tokens_per_sec_per_gpu", s.rel_error);
  for (const Point& p : r.points)
    if (p.predicted && !p.time_like)
      check(p.id + "/" + p.metric, p.rel_error);
  for (const auto& item : points.items()) {
    const std::string& key = item.key();
    CAPTURE(key);
    CHECK_MESSAGE(seen.contains(key), "a bounded point is no longer predicted");
  }
}

TEST_CASE("each group's MAPE stays within its recorded bound" * doctest::test_suite("fitted")) {
  const Report r = validate(read_dataset(default_dataset_path()));
  const mop::Json& groups = bounds().at("groups");
  for (const Group& g : r.groups) {
    CAPTURE(g.key);
    CAPTURE(g.mape);
    REQUIRE_MESSAGE(groups.contains(g.key), "no bound recorded: run tools/tighten-bounds");
    CHECK(g.mape <= groups.at(g.key).at("bound").get<double>());
  }
}

TEST_CASE("the groups' MAPEs are the mean of their points' absolute errors" *
          doctest::test_suite("plumbing")) {
  const Report r = validate(read_dataset(default_dataset_path()));
  double sum = 0;
  int n = 0, moe = 0;
  for (const Score& s : r.scores)
    if (s.predicted) {
      sum += std::fabs(s.rel_error);
      ++n;
      moe += s.row.moe ? 1 : 0;
    }
  REQUIRE(n > 0);
  CHECK(r.mape_time == mop::test::rel(sum / n));
  for (const Group& g : r.groups)
    if (g.key == "time/moe")
      CHECK(g.points == moe);
  // Every score sits in exactly one context band and one GPU type.
  int banded = 0, typed = 0;
  for (const Group& g : r.groups) {
    banded += g.key.starts_with("time/context/") ? g.points : 0;
    typed += g.key.starts_with("time/gpu/") ? g.points : 0;
  }
  CHECK(banded == n);
  CHECK(typed == n);
}

TEST_CASE("a full-attention FLOP count is Megatron-LM's formula, by hand: Llama 3 8B at 8K" *
          doctest::test_suite("independent")) {
  // Megatron-LM's num_floating_point_operations (before its causal correction), per token:
  // 12·L·h²·[(1 + g/a + s/h)·(q/h) + (f/h)·(3/2)] + 6·V·h, with L 32, h 4096, a 32 heads, g 8
  // KV heads, q = 4096, f 14336, V 128256, s 8192.
  const double L = 32, h = 4096, a = 32, g = 8, f = 14336, V = 128256, s = 8192;
  const double megatron =
      12 * L * h * h * ((1 + g / a + s / h) * 1.0 + (f / h) * 1.5) + 6 * V * h;
  const mop::workload::ModelSpec m = mop::workload::load_model("llama3-8b");
  const double causal = mop::workload::count_flops(m, 8192).model_flops_train_per_token;
  const double full = source_flops_per_token(m, 8192, causal, "full");
  CHECK(full == mop::test::rel(megatron, 0.01));
  CHECK(source_flops_per_token(m, 8192, causal, "causal") == causal);
  // The causal count keeps S(S+1)/2 of S² pairs: the difference is the other half, plus one.
  const double half = 3.0 * 4.0 * L * 4096 * (s * s - s * (s + 1) / 2) / s; // 4·pairs·dq, ×3
  CHECK(full - causal == mop::test::rel(half, 1e-9));
}

TEST_CASE("each source's FLOP convention agrees with its own rows that report tokens and TFLOPS" *
          doctest::test_suite("independent")) {
  // A row reporting both its throughput (tokens/s, or step time with the batch) and its TFLOPS
  // shows how its source counts FLOPs per token. Of the two conventions, the row's own must be
  // the nearer to what it published: the conventions given to the TFLOPS-only rows of the same
  // sources rest on this. (Per-model formulas differ in smaller ways: gpt-oss's source counts
  // about 17 % less than mop's model FLOPs, DeepSeek-V3's 4 % more.) For dense Llama and GPT
  // models, where the sources' formulas are Megatron-LM's, the count is within 3 %.
  const std::vector<Row> rows = read_dataset(default_dataset_path());
  int checked = 0;
  for (const Row& row : rows) {
    const mop::Json& m = row.measured;
    if (!m.contains("tflops_per_gpu"))
      continue;
    double tps = 0;
    if (m.contains("tokens_per_sec_per_gpu"))
      tps = m["tokens_per_sec_per_gpu"].get<double>();
    else if (m.contains("step_time_s") && row.global_batch_size)
      tps = *row.global_batch_size * static_cast<double>(row.seq_len) /
            m["step_time_s"].get<double>() / row.num_gpus;
    const Translation t = translate(row);
    if (tps <= 0 || !t.model)
      continue;
    CAPTURE(row.id);
    CAPTURE(row.flop_convention);
    const double published = m["tflops_per_gpu"].get<double>() * 1e12 / tps;
    const double causal =
        mop::workload::count_flops(*t.model, row.seq_len).model_flops_train_per_token;
    const double full = source_flops_per_token(*t.model, row.seq_len, causal, "full");
    const double own = row.flop_convention == "full" ? full : causal;
    const double other = row.flop_convention == "full" ? causal : full;
    CHECK(std::fabs(own - published) < std::fabs(other - published));
    if (!t.model->is_moe())
      CHECK(own == mop::test::rel(published, 0.03));
    ++checked;
  }
  CHECK(checked >= 20);
}

} // namespace validation_compare_test
