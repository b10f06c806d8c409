// mop plan, sweep and fit end to end: contract keys, nothing-fits as a result, bad input.
#include "common/json_io.hpp"
#include "tests/cli/run_mop.hpp"

#include <doctest/doctest.h>

namespace cli_plan_test {

using mop::Json;
using mop::test::count_lines;
using mop::test::run_mop;

TEST_CASE("mop plan --json ranks fitting plans best first" * doctest::test_suite("plumbing")) {
  const auto r = run_mop("plan --model tiny-moe --cluster h100 --nodes 1 --seq 4K --top 3 --json");
  REQUIRE(r.status == 0);
  const Json j = Json::parse(r.out);
  CHECK(j["candidates_evaluated"].get<int>() > 0);
  REQUIRE(j["results"].size() == 3);
  double previous = 0;
  for (const Json& res : j["results"]) {
    for (const char* key : {"plan", "fits", "step_time_s", "tokens_per_s_per_gpu", "mfu",
                            "peak_hbm_bytes", "peak_host_bytes"})
      CHECK(res.contains(key));
    CHECK(res["fits"] == true);
    // Best first: tokens per second per GPU never rises down the list.
    if (previous > 0)
      CHECK(res["tokens_per_s_per_gpu"].get<double>() <= previous * (1 + 1e-12));
    previous = res["tokens_per_s_per_gpu"].get<double>();
  }
}

TEST_CASE("when nothing fits, plan answers with an empty list and what runs out first" *
          doctest::test_suite("plumbing")) {
  const auto r = run_mop("plan --model kimi-k2 --cluster h100 --nodes 1 --seq 4K --json");
  REQUIRE(r.status == 0);
  const Json j = Json::parse(r.out);
  CHECK(j["results"].empty());
  CHECK(j["nothing_fits"].get<std::string>().find("runs out first") != std::string::npos);
  const auto text = run_mop("plan --model kimi-k2 --cluster h100 --nodes 1 --seq 4K");
  CHECK(text.status == 0);
  CHECK(text.out.find("nothing fits") != std::string::npos);
}

TEST_CASE("sweep rows and fit nodes" * doctest::test_suite("plumbing")) {
  const auto s = run_mop("sweep --model tiny-dense --cluster h100 --nodes 1 --seq 2K,4K "
                         "--family fsdp2,mop --json");
  REQUIRE(s.status == 0);
  const Json rows = Json::parse(s.out)["rows"];
  CHECK(rows.size() == 4);
  for (const Json& row : rows)
    for (const char* key : {"seq", "family", "fits", "tokens_per_s_per_gpu", "peak_hbm_bytes"})
      CHECK(row.contains(key));
  const auto csv = run_mop("sweep --model tiny-dense --cluster h100 --nodes 1 --seq 2K "
                           "--family mop --csv");
  CHECK(csv.status == 0);
  CHECK(count_lines(csv.out) == 2);
  const auto f = run_mop("fit --model tiny-dense --cluster h100 --seq 4K --json");
  REQUIRE(f.status == 0);
  CHECK(Json::parse(f.out)["nodes"] == 1);
}

TEST_CASE("plan refuses bad input with one sentence" * doctest::test_suite("plumbing")) {
  for (const char* args :
       {"plan --model tiny-moe --cluster h100 --nodes 1 --seq 4K --family zero-infinity",
        "plan --model tiny-moe --cluster h100 --nodes 1 --seq 4K --top 0",
        "sweep --model tiny-moe --cluster h100 --nodes 1 --seq 4K,0 --family mop",
        "fit --model tiny-moe --cluster h100 --seq 4K --max-nodes 0"}) {
    CAPTURE(args);
    const auto r = run_mop(args);
    CHECK(r.status == 1);
    CHECK(count_lines(r.err) == 1);
  }
}

TEST_CASE("fit gives the fewest nodes and the cheapest per token, --nodes bounding both" *
          doctest::test_suite("plumbing")) {
  const auto r = run_mop("fit --model llama3-8b --cluster h100 --seq 4K --family megatron "
                         "--nodes 2 --json");
  REQUIRE(r.status == 0);
  const Json j = Json::parse(r.out);
  const Json& c = j["cheapest_per_token"];
  CHECK(j["nodes"].get<int>() >= 1);
  CHECK(c["nodes"].get<int>() >= j["nodes"].get<int>());
  CHECK(c["nodes"].get<int>() <= 2);
  CHECK(c["tokens_per_s_per_gpu"].get<double>() >= j["tokens_per_s_per_gpu"].get<double>());
  // Fewer nodes than the model needs: nothing fits up to the bound, a result (exit 0).
  const auto none = run_mop("fit --model kimi-k2 --cluster h100 --seq 4K --nodes 1 --json");
  REQUIRE(none.status == 0);
  CHECK(Json::parse(none.out)["nodes"].is_null());
}

} // namespace cli_plan_test
