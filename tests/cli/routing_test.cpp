// Uneven routing end to end: --routing on memory, simulate and plan, the keys it adds, and its
// refusals.
#include "common/json_io.hpp"
#include "tests/cli/run_mop.hpp"
#include "tests/support/approx.hpp"

#include <doctest/doctest.h>
#include <filesystem>
#include <fstream>

namespace cli_routing_test {

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

TEST_CASE("mop memory and simulate --rebalance least-loaded: the worst rank brought under the "
          "capacity, the copies reported, the plan refused where it cannot apply" *
          doctest::test_suite("plumbing")) {
  namespace fs = std::filesystem;
  const fs::path csv = fs::temp_directory_path() / "mop-rebalance-hist.csv";
  std::ofstream(csv) << "6,2,1,1,1,1,2,2\n"; // ranks of 2 experts: 2, .5, .5, 1 times the mean
  const std::string routed = kTiny + " --routing " + csv.string();
  const auto m = run_mop("memory" + routed + " --rebalance least-loaded --json");
  REQUIRE(m.status == 0);
  const Json j = Json::parse(m.out);
  const Json& r = j["routing"]["rebalance"];
  CHECK(r["kind"] == "least_loaded");
  CHECK(r["threshold"].get<double>() == 1.3);
  CHECK(r["worst_load_before"].get<double>() == mop::test::rel(2));
  CHECK(r["worst_load_after"].get<double>() <= 1.1 + 1e-12);
  CHECK(r["layers_rebalanced"] == 1);
  CHECK(r["most_copies_per_layer"].get<int>() >= 1);
  // The plan reserves for the rebalanced worst rank, and for the copies it may receive.
  CHECK(j["routing"]["reserved_load"].get<double>() == r["worst_load_after"].get<double>());
  CHECK(j["plan"]["moe"]["spill_copies"] == r["most_copies_per_layer"]);
  CHECK(j["plan"]["moe"]["rebalance"] == "least_loaded");
  // Above the threshold nothing moves: 2x < 2.5.
  const auto high = run_mop("memory" + routed +
                            " --rebalance least-loaded --rebalance-threshold 2.5 --json");
  REQUIRE(high.status == 0);
  CHECK(Json::parse(high.out)["routing"]["rebalance"]["layers_rebalanced"] == 0);
  const auto sim = run_mop("simulate" + routed + " --rebalance least-loaded");
  REQUIRE(sim.status == 0);
  CHECK(sim.out.find("least-loaded rebalancing (threshold 1.3, capacity 1.1): 1 of 1 MoE layers "
                     "rebalanced") != std::string::npos);
  // Refusals: a threshold below 1, a mode that does not exist, token dropping with it, and a
  // framework export says it cannot run the plan.
  const auto low = run_mop("memory" + routed + " --rebalance least-loaded --rebalance-threshold 0.5");
  CHECK(low.status == 1);
  CHECK(low.err.find("--rebalance-threshold must be between 1 and 1000") != std::string::npos);
  CHECK(run_mop("memory" + routed + " --rebalance round-robin").status == 2);
  const auto dropping =
      run_mop("memory" + routed + " --rebalance least-loaded --capacity-factor 1.2");
  CHECK(dropping.status == 1);
  CHECK(dropping.err.find("dropless") != std::string::npos);
  const auto emit = run_mop("plan --model tiny-moe --cluster h100 --nodes 1 --seq 4K --ep 4 "
                            "--rebalance least-loaded --emit megatron");
  CHECK(emit.status == 0);
  CHECK(emit.out.find("Megatron-LM has no least-loaded expert rebalancing") != std::string::npos);
  fs::remove(csv);
}

} // namespace cli_routing_test
