// Uneven routing end to end: --routing on memory, simulate and plan, the keys it adds, and its
// refusals.
#include "common/json_io.hpp"
#include "tests/cli/run_mop.hpp"
#include "tests/support/approx.hpp"

#include <doctest/doctest.h>
#include <filesystem>
#include <fstream>

using mop::Json;
using mop::test::run_mop;

namespace {

const std::string kTiny = " --model tiny-moe --cluster h100 --nodes 1 --seq 4K --plan mop --ep 4";

} // namespace

TEST_CASE("mop simulate --routing-imbalance: every ep rank simulated, the step waits for the "
          "hottest, percentiles over seeds" *
          doctest::test_suite("plumbing")) {
  const auto balanced = run_mop("simulate" + kTiny + " --json");
  const auto skewed =
      run_mop("simulate" + kTiny + " --routing-imbalance 2 --routing-seeds 3 --json");
  REQUIRE(balanced.status == 0);
  REQUIRE(skewed.status == 0);
  const Json b = Json::parse(balanced.out), s = Json::parse(skewed.out);
  CHECK(s["step_time_s"].get<double>() > b["step_time_s"].get<double>());
  CHECK(s["simulated_classes"].size() == 4 * b["simulated_classes"].size());
  const Json& r = s["routing"];
  CHECK(r["model"] == "imbalance:2");
  CHECK(r["reserved_load"].get<double>() > 1);
  CHECK(r["reserved_load"].get<double>() == s["plan"]["moe"]["imbalance"].get<double>());
  CHECK(r["worst_rank"]["experts"].size() == 2);
  const Json& t = r["step_time_s"];
  CHECK(t["seeds"] == 3);
  CHECK(t["p50"].get<double>() <= t["p95"].get<double>());
  CHECK(t["p95"].get<double>() <= t["max"].get<double>());
  CHECK(t["each"][0].get<double>() == mop::test::rel(s["step_time_s"].get<double>()));
  CHECK(r.contains("slowest_class"));
  CHECK(r.contains("highest_peak_class"));
  // The text names the most loaded rank and the spread.
  const auto text = run_mop("simulate" + kTiny + " --routing-imbalance 2 --routing-seeds 2");
  REQUIRE(text.status == 0);
  CHECK(text.out.find("most loaded: ep rank") != std::string::npos);
  CHECK(text.out.find("over 2 routing seeds") != std::string::npos);
}

TEST_CASE("mop memory and plan take a measured histogram, and dropping caps the reserve" *
          doctest::test_suite("plumbing")) {
  namespace fs = std::filesystem;
  const fs::path csv = fs::temp_directory_path() / "mop-routing-hist.csv";
  std::ofstream(csv) << "6,2,1,1,1,1,2,2\n"; // ranks of 2 experts: 2, .5, .5, 1 times the mean
  const auto m = run_mop("memory" + kTiny + " --routing " + csv.string() + " --json");
  REQUIRE(m.status == 0);
  const Json j = Json::parse(m.out);
  CHECK(j["routing"]["reserved_load"].get<double>() == mop::test::rel(2));
  CHECK(j["routing"]["worst_rank"]["ep_rank"] == 0);
  CHECK(j["routing"]["worst_rank"]["hottest_expert"] == 0);
  const auto capped =
      run_mop("memory" + kTiny + " --routing " + csv.string() + " --capacity-factor 1 --json");
  REQUIRE(capped.status == 0);
  CHECK(Json::parse(capped.out)["routing"]["reserved_load"].get<double>() == 1);
  const auto plan = run_mop("plan --model tiny-moe --cluster h100 --nodes 1 --seq 4K --top 1 "
                            "--routing " +
                            csv.string() + " --json");
  REQUIRE(plan.status == 0);
  CHECK(!Json::parse(plan.out)["results"].empty());
  // The reserve is mop's assumption, not a framework setting: the plan still exports.
  const auto emit = run_mop("plan --model tiny-moe --cluster h100 --nodes 1 --seq 4K --ep 4 "
                            "--routing " +
                            csv.string() + " --emit megatron");
  CHECK(emit.status == 0);
  CHECK(emit.out.find("--expert-model-parallel-size 4") != std::string::npos);
  fs::remove(csv);
}

TEST_CASE("routing options refuse what they cannot use, in one sentence" *
          doctest::test_suite("plumbing")) {
  const auto low = run_mop("memory" + kTiny + " --routing-imbalance 0.5");
  CHECK(low.status == 1);
  CHECK(low.err.find("between 1 and") != std::string::npos);
  const auto both = run_mop("memory" + kTiny + " --routing zipf:1 --routing-imbalance 2");
  CHECK(both.status == 2);
  const auto missing = run_mop("memory" + kTiny + " --routing /nonexistent/loads.json");
  CHECK(missing.status == 1);
  const auto program =
      run_mop("simulate" + kTiny + " --routing-imbalance 2 --lowering program");
  CHECK(program.status == 1);
  CHECK(program.err.find("balanced routing only") != std::string::npos);
  const auto seeds = run_mop("simulate" + kTiny + " --routing-seeds 0");
  CHECK(seeds.status == 1);
  const auto cf = run_mop("memory" + kTiny + " --capacity-factor -1");
  CHECK(cf.status == 1);
}
