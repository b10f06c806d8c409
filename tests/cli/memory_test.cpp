// mop memory end to end: CLI.md keys, plan re-use, "does not fit" as a result, bad input.
#include "common/json_io.hpp"
#include "tests/cli/run_mop.hpp"
#include "tests/support/approx.hpp"

#include <doctest/doctest.h>
#include <filesystem>
#include <fstream>

namespace cli_memory_test {

using mop::Json;
using mop::test::count_lines;
using mop::test::run_mop;

namespace {
const char* kSmall = "--model llama3-8b --cluster h100 --nodes 1 --seq 8K";
}

TEST_CASE("mop memory --json has the contract's keys and a re-usable plan" *
          doctest::test_suite("plumbing")) {
  const auto r = run_mop(std::string("memory ") + kSmall + " --plan fsdp2 --json");
  REQUIRE(r.status == 0);
  const Json j = Json::parse(r.out);
  for (const char* key : {"fits", "peak_hbm_bytes", "hbm_capacity_bytes", "peak_host_bytes",
                          "host_capacity_bytes", "memory_breakdown", "worst_rank", "plan"})
    CHECK(j.contains(key));
  for (const char* key : {"weights", "grads", "optimizer", "activations", "comm_buffers", "other"})
    CHECK(j["memory_breakdown"].contains(key));
  CHECK(j["fits"] == true);
  // The breakdown adds up to the peak.
  double sum = 0;
  for (const auto& [k, v] : j["memory_breakdown"].items())
    sum += v.get<double>();
  CHECK(sum == mop::test::rel(j["peak_hbm_bytes"].get<double>()));
  const auto path = std::filesystem::temp_directory_path() / "mop-memory-plan.json";
  std::ofstream(path) << j["plan"].dump();
  const auto again =
      run_mop(std::string("memory ") + kSmall + " --plan " + path.string() + " --json");
  REQUIRE(again.status == 0);
  CHECK(Json::parse(again.out)["peak_hbm_bytes"] == j["peak_hbm_bytes"]);
  std::filesystem::remove(path);
}

TEST_CASE("a model that cannot fit is a result (exit 0, fits false) naming what runs out" *
          doctest::test_suite("plumbing")) {
  // Llama 3.1 405B on 8 H100: 16 bytes per parameter of state is 6.5 TB against 8 x 85 GB.
  const auto r = run_mop("memory --model llama3-405b --cluster h100 --nodes 1 --seq 8K "
                         "--plan megatron --json");
  REQUIRE(r.status == 0);
  const Json j = Json::parse(r.out);
  CHECK(j["fits"] == false);
  CHECK(j.contains("first_to_run_out"));
  const auto text = run_mop("memory --model llama3-405b --cluster h100 --nodes 1 --seq 8K "
                            "--plan megatron");
  CHECK(text.status == 0);
  CHECK(text.out.find("does not fit") != std::string::npos);
}

TEST_CASE("mop memory refuses bad input with one sentence" * doctest::test_suite("plumbing")) {
  for (const char* args :
       {"memory --model llama3-8b --cluster h100 --nodes 0 --seq 8K --plan fsdp2",
        "memory --model /nonexistent/config.json --cluster h100 --nodes 1 --seq 8K",
        "memory --model llama3-8b --cluster h100 --nodes 1 --seq 0",
        "memory --model llama3-8b --cluster h100 --nodes 1 --seq 8K --plan nosuch",
        "memory --model llama3-8b --cluster nosuch --nodes 1 --seq 8K"}) {
    CAPTURE(args);
    const auto r = run_mop(args);
    CHECK(r.status == 1);
    CHECK(count_lines(r.err) == 1);
    CHECK(r.out.empty());
  }
  CHECK(run_mop("memory --no-such-flag").status == 2);
}

} // namespace cli_memory_test
