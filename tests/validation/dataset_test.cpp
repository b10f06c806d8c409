// The shipped dataset: every row parses, translates to a fixed plan or says why not, and the
// memory model's error on the published peak memories stays within the bound measured when it
// was first run (docs/VALIDATION.md).
#include "common/error.hpp"
#include "hw_models/cluster.hpp"
#include "strategies/hardware.hpp"
#include "strategies/memory.hpp"
#include "validation/dataset.hpp"

#include <cmath>
#include <doctest/doctest.h>
#include <filesystem>
#include <fstream>
#include <set>

using namespace mop;
using namespace mop::validation;

TEST_CASE("the shipped dataset parses: 86 published rows with unique ids" *
          doctest::test_suite("plumbing")) {
  const std::vector<Row> rows = read_dataset(default_dataset_path());
  CHECK(rows.size() == 86);
  std::set<std::string> ids;
  for (const Row& r : rows)
    ids.insert(r.id);
  CHECK(ids.size() == rows.size());
}

TEST_CASE("every row becomes a fixed plan or states why it cannot yet" *
          doctest::test_suite("plumbing")) {
  int translated = 0;
  for (const Row& r : read_dataset(default_dataset_path())) {
    const Translation t = translate(r);
    CAPTURE(r.id);
    CHECK(t.plan.has_value() == t.reason.empty());
    if (r.gpu == "A100" || r.gpu == "GB200" || r.gpu == "GB300")
      CHECK(t.reason.find(r.gpu) != std::string::npos);
    translated += t.plan ? 1 : 0;
  }
  CHECK(translated >= 60);
}

TEST_CASE("a malformed line names the file and the line" * doctest::test_suite("plumbing")) {
  const auto path = std::filesystem::temp_directory_path() / "mop-bad.jsonl";
  std::ofstream(path) << "{\"id\": \"a\"}\n{broken\n";
  try {
    read_dataset(path.string());
    FAIL("accepted");
  } catch (const InputError& e) {
    CHECK(std::string(e.what()).starts_with(path.string() + ":1: field 'gpu' is missing"));
  }
  std::filesystem::remove(path);
}

TEST_CASE("peak memory against the published measurements: MAPE within the recorded bound" *
          doctest::test_suite("fitted")) {
  double sum = 0;
  int n = 0;
  for (const Row& r : read_dataset(default_dataset_path())) {
    if (!r.measured.contains("peak_mem_gib"))
      continue;
    const Translation t = translate(r);
    if (!t.plan)
      continue;
    const hw::ClusterSpec c = hw::load_cluster(t.cluster_id);
    const strategy::MemoryReport m =
        strategy::analyze_memory(*t.model, *t.plan, r.seq_len, strategy::memory_hardware(c));
    const double measured = r.measured["peak_mem_gib"].get<double>() * 1024 * 1024 * 1024;
    const double err = std::fabs(m.peak_hbm_bytes - measured) / measured;
    MESSAGE(r.id << ": measured " << measured / 1073741824.0 << " GiB, predicted "
                 << m.peak_hbm_bytes / 1073741824.0 << " GiB (" << 100 * err << " %)");
    sum += err;
    ++n;
  }
  REQUIRE(n >= 10);
  const double mape = sum / n;
  MESSAGE("peak-memory MAPE over " << n << " rows: " << 100 * mape << " %");
  // First honest measurement: 29.2 % over 14 torchtitan rows (docs/VALIDATION.md explains what
  // dominates). The bound only stops it getting worse; tighten it as the model improves.
  CHECK(mape < 0.32);
}
